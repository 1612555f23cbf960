"""The gate between decision and dispatch (router/admission/gate.py) on a virtual clock: windows, late
binding, queue time priced into the decision, priority, shedding, deadlines. The decisions are the demo's
`money` profile over hand-built candidates; the windows are the in-memory twin."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from policies.admission_spec import AdmissionSpec
from policies.types import Candidate, RoutingDecision
from router.admission.gate import Gate
from router.admission.ticket import Ticket
from router.replay.window_twin import MemoryWindowStore
from tests.test_money import MONEY, cand, req


class World:
    def __init__(self, cands: list[Candidate], **spec: object) -> None:
        self.now = 0.0
        self.cands = cands
        spec.setdefault("overdraw_ms", 0)          # no class overdraws unless a test says so
        self.gate = Gate(AdmissionSpec(windows=True, **spec), None,  # type: ignore[arg-type]
                         MemoryWindowStore(lambda: int(self.now * 1000)))
        self.shed: list[Ticket] = []
        self.gate.notify = self.shed.append

    def ticket(self, rid: str, prompt: int, cls: str = "interactive", tiers: tuple[str, ...] | None = None) -> Ticket:
        r = req(prompt, 100, cls=cls, rid=rid)

        def redecide(adjust: Callable[[list[Candidate]], list[Candidate]]) -> RoutingDecision | None:
            cands = [c for c in adjust(self.cands) if tiers is None or c.tier in tiers]
            return MONEY.decide(r, cands)
        d = redecide(lambda c: c)
        assert d is not None and d.chosen is not None
        ttft = r.ttft_target_s or 1.0
        return Ticket(rid, d.chosen.tier, prompt, self.now, self.now + ttft / 2, redecide, d,
                      cost_of=lambda c: prompt)

    async def enter(self, t: Ticket, cls: str = "interactive", tenant: str = "a") -> bool:
        prio = {"interactive": 1, "relaxed": 0}[cls]
        self.gate.top = 1
        return await self.gate.enter(t, self.now, prio, 1.0, False, tenant)


async def test_a_window_admits_a_burst_then_queues_and_releases_on_the_instance_that_opens_first() -> None:
    # two fast instances: 190K tokens/s, a 4 ms window (2 x 2 ms TPOT... clamped to 10 ms): 1,902 tokens
    w = World([cand("fast", "0"), cand("fast", "1")], min_window_ms=10, window_ms=50)
    rate, burst = w.gate.sizing(w.cands[0])  # type: ignore[misc]
    assert rate == 190_200 and burst == pytest.approx(1_902)
    go = [await w.enter(w.ticket(f"r{k}", 3_000)) for k in range(2)]   # each takes one instance into debt
    assert go == [True, True]
    t = w.ticket("late", 500)
    assert not await w.enter(t) and t.outcome == "" and len(w.gate.queues["fast"]) == 1
    wake = w.gate.next_wake("fast", w.now)
    assert wake is not None and 0.005 < wake < 0.02      # the debt of 3,000 - 1,902 tokens at 190K/s
    w.now = wake
    released = await w.gate.release("fast", w.now)
    assert released == [t] and t.outcome == "released" and t.decision.chosen is not None


async def test_queue_time_is_priced_a_cheap_tier_that_opens_soon_beats_a_dear_one_open_now() -> None:
    w = World([cand("fast", "0"), cand("balanced", "0")])
    for k in range(5):                                     # fast: 5 x 38K tokens of debt, ~1 s closed
        doc = w.ticket(f"doc{k}", 38_000, tiers=("fast",))
        assert await w.enter(doc) is (k == 0)
    short = w.ticket("chat", 800)
    assert short.decision.chosen.tier == "fast"            # type: ignore[union-attr]
    assert await w.enter(short) is True and short.decision.chosen.tier == "balanced"   # type: ignore[union-attr]
    # with the fast window closed only briefly, the chat waits for it instead
    w2 = World([cand("fast", "0"), cand("balanced", "0")])
    assert await w2.enter(w2.ticket("doc", 2_500))         # ~3 ms of debt
    chat = w2.ticket("chat", 800)
    assert await w2.enter(chat) is False and chat.tier == "fast"


async def test_interactive_is_released_before_relaxed_that_queued_first() -> None:
    w = World([cand("fast", "0")])
    assert await w.enter(w.ticket("doc", 20_000))
    relaxed = w.ticket("rel", 500, cls="relaxed")
    inter = w.ticket("int", 500)
    assert not await w.enter(relaxed, "relaxed") and not await w.enter(inter)
    w.now = w.gate.next_wake("fast", w.now) or 0.0
    out = await w.gate.release("fast", w.now)
    assert out[0] is inter


async def test_a_full_queue_sheds_the_lowest_class_and_says_which_status() -> None:
    w = World([cand("fast", "0")], max_queued=1)
    assert await w.enter(w.ticket("doc", 20_000))
    rel = w.ticket("rel", 500, cls="relaxed")
    assert not await w.enter(rel, "relaxed")
    inter = w.ticket("int", 500)
    assert not await w.enter(inter)
    assert w.shed == [rel] and rel.outcome == "shed" and rel.shed_status == 503 and inter.outcome == ""
    again = w.ticket("int2", 500)
    assert not await w.enter(again) and again.outcome == "shed" and again.shed_status == 429


async def test_leave_takes_a_waiting_request_out_and_an_unknown_rate_has_no_window() -> None:
    w = World([cand("fast", "0")])
    assert await w.enter(w.ticket("doc", 20_000))
    t = w.ticket("x", 500)
    assert not await w.enter(t)
    w.gate.leave(t, "left")
    assert t.outcome == "left" and not len(w.gate.queues["fast"])
    free = World([cand("fast", "0", known=False)])
    assert all([await free.enter(free.ticket(f"r{k}", 20_000)) for k in range(5)])


async def test_the_top_class_overdraws_a_window_the_classes_below_wait_for() -> None:
    w = World([cand("fast", "0")], overdraw_ms=40)            # 40 ms at 190,200 tokens/s: 7,608 tokens of debt
    assert await w.enter(w.ticket("r0", 4_000))               # ~2,100 tokens of debt
    assert await w.enter(w.ticket("r1", 4_000))               # interactive: above -4 bursts, admitted
    rel = w.ticket("rel", 500, cls="relaxed")
    assert not await w.enter(rel, "relaxed")                  # relaxed needs a positive window
    assert await w.enter(w.ticket("r2", 4_000))               # ~-6,100 is still above -7,608: admitted
    late = w.ticket("r3", 500)
    assert not await w.enter(late)                            # ~-10,100: past the overdraw
    w.now = w.gate.next_wake("fast", w.now) or 0.0
    out = await w.gate.release("fast", w.now)
    assert out and out[0] is late and rel not in out          # the top class first, relaxed still waits


async def test_an_instance_without_room_holds_even_the_top_class_until_a_slot_frees() -> None:
    # the top class may overdraw 10 s of windows, but fast/f0 runs its max_num_seqs already: it waits in
    # the router's queue (fair order) instead of the engine's, and goes once the instance has a slot again
    w = World([cand("fast", "0", in_flight=4)], overdraw_ms=10_000)
    w.gate.seqs = {"fast": 4}
    t = w.ticket("r", 500)
    assert not await w.enter(t) and t.outcome == ""
    w.now = w.gate.next_wake("fast", w.now) or 0.0
    assert await w.gate.release("fast", w.now) == []          # still full
    w.cands = [cand("fast", "0", in_flight=3)]
    w.now = w.gate.next_wake("fast", w.now) or 0.0
    assert await w.gate.release("fast", w.now) == [t] and t.outcome == "released"


async def test_one_walk_counts_its_own_releases_against_the_room() -> None:
    # 2 seats free on f0; 3 requests wait: one walk releases 2 (the candidates' in_flight only grows when
    # the driver dispatches them, after the walk), the third waits for the next slot
    w = World([cand("fast", "0", in_flight=4)], overdraw_ms=10_000)
    w.gate.seqs = {"fast": 4}
    ts = [w.ticket(f"r{k}", 500) for k in range(3)]
    assert [await w.enter(t) for t in ts] == [False] * 3
    w.cands = [cand("fast", "0", in_flight=2)]
    w.now = w.gate.next_wake("fast", w.now) or 0.0
    assert await w.gate.release("fast", w.now) == ts[:2] and ts[2].outcome == ""


async def test_at_its_deadline_a_flooding_tenant_is_shed_and_the_other_is_spread_over_the_tier() -> None:
    w = World([cand("fast", "0", in_flight=4), cand("fast", "1", in_flight=6)], overdraw_ms=10_000)
    w.gate.seqs = {"fast": 4}
    for _ in range(10):                                        # alice sends 10x bob's requests
        w.gate.shares.arrive(("fast", 1), "alice", 1.0, w.now)
    w.gate.shares.arrive(("fast", 1), "bob", 1.0, w.now)
    a, b = w.ticket("a", 500), w.ticket("b", 500)
    assert not await w.enter(a, tenant="alice") and not await w.enter(b, tenant="bob")
    w.now = a.deadline
    w.gate.expire(a, w.now)
    assert a.outcome == "shed" and a.shed_status == 429 and a.shed_reason == "over_share"
    w.gate.expire(b, w.now)
    assert b.outcome == "bypassed" and b.decision.chosen is not None
    assert b.decision.chosen.instance_id == "f0"               # the tier's instance with the least in flight
    assert not len(w.gate.queues["fast"])
