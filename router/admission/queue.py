"""The admission queue of one tier: which waiting request is released next when capacity appears.

Algorithm:
  * Strict priority between SLO classes: the queue releases from the highest `priority` level that has
    a request able to go now (`fits`); a lower level is tried only when no request of a higher level
    can go (work-conserving), except batch requests (`batch=True`, a `batchable` class), which are
    never released while any request that is not batch waits in the queue.
  * Within a level, tenants share by weight with self-clocked fair queueing (SCFQ, Golestani 1994):
    a request of cost c (tokens: its uncached prefill) queued by tenant t gets the finish tag
        F = max(V, F_t) + c / weight_t
    where F_t is the tag of t's previous request in this level (0 when t has none queued) and V the
    level's virtual time, the tag of the request it released last. The request with the least tag among
    those that fit goes first; ties go to the earlier request. Over any busy period each tenant gets
    tokens in proportion to its weight, whatever its request sizes, and a tenant that sends 10x its share
    pushes only its own tags into the future: another tenant's new request is tagged V + c / w and
    overtakes the flood's backlog.
  * Bounded: at most `max_queued` requests. A request that arrives at a full queue competes with those
    queued: the victim is in the lowest priority level (batch lowest of all), and within it the request
    with the largest tag (the one a fair order would serve last). The victim is shed (the caller answers
    it 429/503 with Retry-After); it may be the newcomer itself.
  * `remove`: a request whose client left (or whose deadline passed) leaves the queue at once.
Parameters:
  max_queued (int >= 1, default 1024): requests the queue holds.
Costs: push, pop and remove are O(queued tenants + the tenant's own queue); nothing is per token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class Waiting(Generic[T]):
    """One queued request; `payload` is the driver's (a future, a replay flight)."""

    payload: T
    tenant: str
    priority: int
    cost: int                   # tokens it will prefill (>= 1 counted)
    weight: float = 1.0         # its tenant's share weight (> 0)
    batch: bool = False
    at: float = 0.0             # when it was queued (the driver's clock)
    tag: float = field(default=0.0, init=False)
    seq: int = field(default=0, init=False)


class _Level(Generic[T]):
    def __init__(self) -> None:
        self.tenants: dict[str, deque[Waiting[T]]] = {}
        self.vtime = 0.0
        self.n = 0


class AdmissionQueue(Generic[T]):
    def __init__(self, max_queued: int = 1024) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be >= 1")
        self.max_queued = max_queued
        self.levels: dict[tuple[bool, int], _Level[T]] = {}   # (not batch, priority) -> level
        self.n = 0
        self.batch_n = 0
        self.tokens = 0              # the queued requests' costs
        self._seq = 0

    def __len__(self) -> int:
        return self.n

    def depth(self) -> dict[tuple[bool, int], int]:
        """Queued requests per (batch, priority)."""
        return {(not k[0], k[1]): lv.n for k, lv in self.levels.items() if lv.n}

    def push(self, w: Waiting[T]) -> Waiting[T] | None:
        """Queue `w`; -> the request shed to make room (possibly `w` itself), or None."""
        if w.weight <= 0:
            raise ValueError("weight must be > 0")
        key = (not w.batch, w.priority)
        lv = self.levels.get(key)
        if lv is None:
            lv = self.levels[key] = _Level()
        q = lv.tenants.get(w.tenant)
        last = q[-1].tag if q else 0.0
        w.tag = max(lv.vtime, last) + max(w.cost, 1) / w.weight
        self._seq += 1
        w.seq = self._seq
        shed = None
        if self.n >= self.max_queued:
            shed = self._victim(key, w)
            if shed is w:
                return w
            self.remove(shed)
        lv.tenants.setdefault(w.tenant, deque()).append(w)
        lv.n += 1
        self.n += 1
        self.batch_n += w.batch
        self.tokens += w.cost
        return shed

    def _victim(self, key: tuple[bool, int], w: Waiting[T]) -> Waiting[T]:
        """The lowest level's request with the largest tag, the newcomer included."""
        low = min((k for k, lv in self.levels.items() if lv.n or k == key))
        if low != key:
            best = max((q[-1] for q in self.levels[low].tenants.values() if q), key=lambda x: (x.tag, x.seq))
        else:
            tails = [q[-1] for q in self.levels[key].tenants.values() if q]
            best = max([*tails, w], key=lambda x: (x.tag, x.seq))
        return best

    def remove(self, w: Waiting[T]) -> bool:
        """Take `w` out (shed, or its client left); False if it is not queued."""
        lv = self.levels.get((not w.batch, w.priority))
        q = lv.tenants.get(w.tenant) if lv is not None else None
        if lv is None or q is None or w not in q:
            return False
        q.remove(w)
        if not q:
            del lv.tenants[w.tenant]
        lv.n -= 1
        self.n -= 1
        self.batch_n -= w.batch
        self.tokens -= w.cost
        return True

    def pop(self, fits: Callable[[Waiting[T]], bool]) -> Waiting[T] | None:
        """The next request to release (see the module doc), taken out. `fits(w)`: it can go now."""
        best = self.peek(fits)
        if best is not None:
            self.release(best)
        return best

    def peek(self, fits: Callable[[Waiting[T]], bool] = lambda w: True) -> Waiting[T] | None:
        """The next request to release, left in the queue."""
        for key in sorted(self.levels, reverse=True):
            lv = self.levels[key]
            if not lv.n:
                continue
            if not key[0] and self.n > self.batch_n:
                return None          # batch waits while anything else is queued
            best = self._least_fitting(lv, fits)
            if best is not None:
                return best
        return None

    def release(self, w: Waiting[T]) -> None:
        """Take `w` out as released: its level's virtual time advances to its tag."""
        lv = self.levels[(not w.batch, w.priority)]
        if self.remove(w):
            lv.vtime = max(lv.vtime, w.tag)

    @staticmethod
    def _least_fitting(lv: _Level[T], fits: Callable[[Waiting[T]], bool]) -> Waiting[T] | None:
        """Least (tag, seq) among each tenant's first request that fits (a tenant's requests keep their
        order only as far as they fit: one that can't go now doesn't hold back a later one that can)."""
        best: Waiting[T] | None = None
        for q in lv.tenants.values():
            for w in q:
                if best is not None and (w.tag, w.seq) >= (best.tag, best.seq):
                    break        # tags only grow along a tenant's queue
                if fits(w):
                    best = w
                    break
        return best
