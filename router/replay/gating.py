"""The admission gate (router/admission/gate.py) in replay: the same Gate over the in-memory windows on
the virtual clock. A queued request becomes two events: its tier's next window opening (the queue is
walked then, as the live gate's task does) and its deadline (`max_queue_ms`: dispatched as last decided).
A shed request is refused as the live router answers it (429 or 503) and its reservation released."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from policies.schema import Policy
from router.admission.gate import Gate
from router.admission.ticket import Ticket
from router.lifecycle.core import Lifecycle, Pending
from router.relay import Outcome
from router.replay.sync import run_sync
from router.replay.window_twin import MemoryWindowStore


@dataclass
class ReplayGate:
    policy: Policy
    core: Lifecycle
    wall_ms: Callable[[], int]
    push: Callable[[float, str], None]                  # schedule a gate event (time, key)
    dispatch: Callable[[Pending, Any], None]           # send a released request (its driver context)
    refuse: Callable[[int, str], None]                 # count a refusal in the results
    gate: Gate = field(init=False)
    tickets: dict[str, tuple[Ticket, Pending, Any]] = field(default_factory=dict)
    wakes: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    waited: dict[str, list[float]] = field(default_factory=dict)     # class -> waits of its dispatched requests

    def __post_init__(self) -> None:
        self.gate = Gate(self.policy.admission, None, MemoryWindowStore(self.wall_ms))
        self.gate.notify = self._shed

    def enter(self, p: Pending, ctx: Any, now: float) -> bool:
        """True: dispatch now (`p.decision` may have moved). False: queued or shed (handled here)."""
        t, go = run_sync(self.gate.admit(self.core, p, now))
        if go:
            p.decision = t.decision
            return True
        if t.outcome == "shed":
            self._refused(t, p)
            return False
        self.tickets[t.rid] = (t, p, ctx)
        self.push(t.deadline, "deadline:" + t.rid)
        self._wake(t.tier, now)
        return False

    def on_event(self, key: str, now: float) -> None:
        kind, _, name = key.partition(":")
        if kind == "deadline":
            got = self.tickets.get(name)
            if got is not None and got[0].outcome == "":
                self.gate.expire(got[0], now)
                if got[0].outcome == "shed":
                    self._shed(got[0])
                else:
                    self._go(got[0], now)
            return
        if self.wakes.get(name) != now:
            return                       # superseded
        del self.wakes[name]
        for t in run_sync(self.gate.release(name, now)):
            self._go(t, now)
        self._wake(name, now)

    def _wake(self, tier: str, now: float) -> None:
        at = self.gate.next_wake(tier, now)
        if at is None:
            return
        at = max(at, now)
        if self.wakes.get(tier, float("inf")) > at:
            self.wakes[tier] = at
            self.push(at, "wake:" + tier)

    def _go(self, t: Ticket, now: float) -> None:
        _, p, ctx = self.tickets.pop(t.rid)
        self.outcomes[t.outcome] = self.outcomes.get(t.outcome, 0) + 1
        self.waited.setdefault(t.slo_class or "none", []).append(now - t.at)
        p.decision = t.decision
        self.dispatch(p, ctx)

    def _shed(self, t: Ticket) -> None:
        got = self.tickets.pop(t.rid, None)
        if got is not None:
            self._refused(t, got[1])

    def _refused(self, t: Ticket, p: Pending) -> None:
        self.outcomes["shed"] = self.outcomes.get("shed", 0) + 1
        self.refuse(t.shed_status, t.shed_reason)
        self.core.close_out(p, Outcome(status=t.shed_status, error="shed by the admission queue"))
