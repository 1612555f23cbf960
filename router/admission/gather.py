"""Batch gathering: the windows in which a `batchable` class's requests are collected (issue #14).

The router-side form of "collect requests for ~100 ms, then run them as one batch", for work that is not
interactive (reports, moderation). Sans-I/O: the gate (router/admission/gate.py) calls it on both drivers.

Algorithm:
  group     a batch request joins the open group of its tier and prefix key (the hash of its prompt's
            `GROUP_DEPTH`-th full block, or its last full block when shorter; "" when the tier samples no
            hashes): requests that share a document or a long system prompt gather together.
  window    the group opened by the first request closes at `opened + window`, or at once when it holds
            `batch_size` requests. The window follows the tier's batch arrival rate lambda (an EWMA of the
            gaps between batch arrivals, weight `ALPHA`):
                expected = lambda x batch_max_wait_ms            (arrivals expected within the bound)
                window   = 0                   if expected < 1 (nothing would join: waiting buys no batch)
                         = clamp((batch_size - 1) / lambda, min_window_ms, batch_max_wait_ms) otherwise
                           (the tier's first batch request, with no rate yet: batch_max_wait_ms)
  close     a closed group enters the tier's queue as one batch entry of its prefill cost (each member
            after the first pays only what it does not share with it). The queue releases it only while
            no request of another class waits; then the gate sends it whole to the best-ranked instance
            whose window is open and which is under the utilization threshold (KV-cache use < `batch_kv`
            and nothing waiting in its engine), so the shared prefix is prefilled once and its members
            share the engine's steps.
  leave     a member whose client goes away (or whose class's `max_queue_ms` passes) leaves its group;
            an emptied group is dropped.
Parameters (policies/admission_spec.py, `admission:`): batch_max_wait_ms (default 100), batch_size
(default 8), batch_kv (default 0.8). A batch request never delays a higher class: a running one keeps
running, but none is released while another class waits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

GROUP_DEPTH = 8      # blocks: the prefix two requests must share to gather in one group
ALPHA = 0.2          # EWMA weight of the newest gap between batch arrivals


@dataclass(eq=False)
class Group(Generic[T]):
    tier: str
    key: bytes
    opened: float
    closes: float
    members: list[T] = field(default_factory=list)


@dataclass
class Gatherer(Generic[T]):
    batch_size: int = 8
    max_wait_s: float = 0.1
    min_wait_s: float = 0.01
    groups: dict[tuple[str, bytes], Group[T]] = field(default_factory=dict)
    gap: dict[str, float] = field(default_factory=dict)       # tier -> EWMA seconds between batch arrivals
    last: dict[str, float] = field(default_factory=dict)      # tier -> the last batch arrival

    def window_s(self, tier: str) -> float:
        """The gathering window of the tier's next group (module doc)."""
        if self.batch_size <= 1:
            return 0.0
        gap = self.gap.get(tier)
        if gap is None:                      # the tier's first batch request: no rate yet
            return self.max_wait_s
        if gap > self.max_wait_s:            # lambda x max_wait < 1: nothing would join in time
            return 0.0
        return min(self.max_wait_s, max(self.min_wait_s, (self.batch_size - 1) * gap))

    def _arrival(self, tier: str, now: float) -> None:
        last = self.last.get(tier)
        self.last[tier] = now
        if last is not None:
            g = max(0.0, now - last)
            old = self.gap.get(tier)
            self.gap[tier] = g if old is None else (1 - ALPHA) * old + ALPHA * g

    def add(self, item: T, tier: str, key: bytes, now: float) -> Group[T] | None:
        """Gather `item`; -> its group when that group closes now (full, or a zero window), else None."""
        self._arrival(tier, now)
        g = self.groups.get((tier, key))
        if g is None:
            g = self.groups[(tier, key)] = Group(tier, key, now, now + self.window_s(tier))
        g.members.append(item)
        if len(g.members) >= self.batch_size or g.closes <= now:
            del self.groups[(tier, key)]
            return g
        return None

    def due(self, tier: str, now: float) -> list[Group[T]]:
        """The tier's groups whose window has ended, taken out, oldest first."""
        out = [g for (t, _), g in self.groups.items() if t == tier and g.closes <= now]
        for g in out:
            del self.groups[(g.tier, g.key)]
        return sorted(out, key=lambda g: g.opened)

    def next_close(self, tier: str) -> float | None:
        ends = [g.closes for (t, _), g in self.groups.items() if t == tier]
        return min(ends) if ends else None

    def tiers(self) -> set[str]:
        return {t for t, _ in self.groups}

    def remove(self, item: T) -> bool:
        """Take `item` out of the group it waits in; an emptied group is dropped."""
        for k, g in self.groups.items():
            if any(m is item for m in g.members):
                g.members = [m for m in g.members if m is not item]
                if not g.members:
                    del self.groups[k]
                return True
        return False


def group_key(hashes: list[bytes]) -> bytes:
    """The prefix a batch request gathers by: its `GROUP_DEPTH`-th sampled hash (dense sampling covers
    the leading blocks one by one), or its last when shorter; b"" without hashes."""
    if not hashes:
        return b""
    return hashes[min(len(hashes), GROUP_DEPTH) - 1]
