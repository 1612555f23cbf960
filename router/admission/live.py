"""The admission gate on the live router's event loop (router/admission/gate.py holds the algorithm).

A request the gate queues waits on a future: the lifespan-owned `run` task sleeps until the earliest
opening of a queued tier's windows (or a new arrival's kick), walks that queue and resolves the futures
of the requests it released. A waiting request leaves at its class's `max_queue_ms` (bypass: dispatched
as last decided, or shed when its tenant is over its share) or when its client goes away (cancelled: it
leaves the queue; the caller releases its budget reservation, so it is billed nothing). A shed request
gets the gate's status with Retry-After.
The windows are shared through Redis (router/admission/window_store.py); when a call fails, this
replica's own windows answer (the in-memory twin), counted in `tiergate_window_tokens{store="local"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from policies.admission_spec import AdmissionSpec
from router.admission.gate import Gate, Take
from router.admission.ticket import Ticket
from router.errors import ApiError
from router.lifecycle.core import Lifecycle, Pending
from router.logs import get_logger
from router.metrics import RouterMetrics
from router.replay.window_twin import MemoryWindowStore


class LiveGate:
    def __init__(self, spec: AdmissionSpec, take_shared: Take | None, metrics: RouterMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.metrics = metrics
        self.gate = Gate(spec, take_shared, MemoryWindowStore(lambda: int(clock() * 1000)), on_event=self._event)
        self.gate.notify = self._shed
        self.waiters: dict[Ticket, asyncio.Future[None]] = {}
        self.log = get_logger("tiergate.admission")
        self._kick: asyncio.Event | None = None

    @property
    def kick(self) -> asyncio.Event:
        if self._kick is None:
            self._kick = asyncio.Event()
        return self._kick

    def _event(self, kind: str, key: str, value: float) -> None:
        m = self.metrics
        if kind == "window_tokens":
            tier, _, store = key.partition("|")
            m.child(m.window_tokens, tier, store).inc(value)
        elif kind == "window_budget":
            tier, _, inst = key.partition("/")
            m.child(m.window_budget, tier, inst).set(value)

    def _depth(self, t: Ticket, delta: int) -> None:
        self.metrics.child(self.metrics.queue_depth, t.tier, t.slo_class).inc(delta)

    def _shed(self, t: Ticket) -> None:
        fut = self.waiters.get(t)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def admit(self, core: Lifecycle, p: Pending) -> None:
        """Through the windows: `p.decision` may move to another instance or tier among those its
        reservation covers; ApiError when shed. Without `admission.windows`, nothing happens."""
        pol = p.view.policy
        self.gate.spec = pol.admission
        d = p.decision
        if not pol.admission.windows or d is None or d.chosen is None:
            return
        now = self.clock()
        t, go = await self.gate.admit(core, p, now)
        if not go:
            await self._wait(t)
        p.decision = t.decision
        if t.outcome:
            p.notes["queued"] = {"outcome": t.outcome, "wait_ms": round((self.clock() - now) * 1000, 3)}

    async def _wait(self, t: Ticket) -> None:
        if t.outcome == "shed":
            self._shed_error(t)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters[t] = fut
        self._depth(t, 1)
        self.kick.set()
        try:
            async with asyncio.timeout(max(0.0, t.deadline - self.clock())):
                await fut
        except TimeoutError:
            self.gate.expire(t, self.clock())
        except BaseException:
            self.gate.leave(t, "left")
            raise
        finally:
            self.waiters.pop(t, None)
            self._depth(t, -1)
            self.metrics.child(self.metrics.queue_wait, t.tier, t.outcome or "left").observe(self.clock() - t.at)
        if t.outcome == "shed":
            self._shed_error(t)

    def _shed_error(self, t: Ticket) -> None:
        self.metrics.child(self.metrics.shed, t.tier, t.slo_class).inc()
        if t.shed_reason == "over_share":
            raise ApiError(429, f"the {t.tier} tier is overloaded and this tenant sends more than its share; "
                           "retry shortly", code="over_share", headers={"Retry-After": "1"})
        raise ApiError(t.shed_status, f"the {t.tier} tier's admission queue is full; retry shortly",
                       code=t.shed_reason, headers={"Retry-After": "1"})

    async def run(self) -> None:
        """Walk each queue at its windows' openings, until cancelled (the lifespan owns this task)."""
        while True:
            now = self.clock()
            wakes = [(w, tier) for tier in self.gate.tiers() if (w := self.gate.next_wake(tier, now)) is not None]
            due = [tier for w, tier in wakes if w <= now]
            if not due:
                self.kick.clear()
                delay = min(w for w, _ in wakes) - now if wakes else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self.kick.wait()
                continue
            for tier in due:
                try:
                    released = await self.gate.release(tier, self.clock())
                except Exception:        # a bug must not stop the gate: its waiters still leave at deadline
                    self.log.exception("admission_release_failed", tier=tier)
                    await asyncio.sleep(self.gate.spec.min_window_ms / 1000)
                    continue
                for t in released:
                    fut = self.waiters.get(t)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
