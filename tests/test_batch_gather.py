"""The batch class's gathering windows (router/admission/gather.py) and how the gate queues and releases a
gathered batch (router/admission/gate.py), on a virtual clock over hand-built candidates."""

from __future__ import annotations

from router.admission.gather import GROUP_DEPTH, Gatherer, group_key
from router.admission.ticket import Ticket
from tests.test_admission_gate import World
from tests.test_money import cand

DOC = b"doc-prefix"


def test_the_window_follows_the_arrival_rate() -> None:
    g: Gatherer[str] = Gatherer(batch_size=8, max_wait_s=0.1, min_wait_s=0.01)
    assert g.window_s("t") == 0.1                       # no rate yet: the bound
    assert g.add("a", "t", b"k", 0.0) is None
    assert g.add("b", "t", b"k", 0.002) is None         # a 2 ms gap: 7 more expected in 14 ms
    assert g.window_s("t") == 0.014
    sparse: Gatherer[str] = Gatherer(batch_size=8, max_wait_s=0.1)
    sparse.add("a", "t", b"k1", 0.0)
    sparse.due("t", 1.0)
    closed = sparse.add("b", "t", b"k2", 1.0)           # one a second: nothing would join within 100 ms
    assert closed is not None and closed.members == ["b"]
    burst: Gatherer[str] = Gatherer(batch_size=8, max_wait_s=0.1)
    assert burst.window_s("t") == 0.1
    burst.add("x", "t", b"k", 0.0)
    burst.add("y", "t", b"k", 0.0)                      # simultaneous: the floor, not zero
    assert burst.window_s("t") == 0.01


def test_groups_by_tier_and_prefix_close_when_full_or_due_and_let_members_leave() -> None:
    g: Gatherer[str] = Gatherer(batch_size=3, max_wait_s=0.1)
    assert g.add("a", "fast", b"d1", 0.0) is None
    assert g.add("b", "fast", b"d2", 0.0) is None       # another document: another group
    assert g.add("c", "long", b"d1", 0.0) is None       # another tier: another group
    assert g.add("d", "fast", b"d1", 0.001) is None
    full = g.add("e", "fast", b"d1", 0.002)
    assert full is not None and full.members == ["a", "d", "e"]
    assert g.remove("b") and not g.remove("b")          # left: its emptied group is gone
    assert g.next_close("fast") is None and g.next_close("long") == 0.1
    assert g.due("long", 0.05) == [] and [x.members for x in g.due("long", 0.1)] == [["c"]]
    hashes = [bytes([k]) for k in range(20)]
    assert group_key(hashes) == hashes[GROUP_DEPTH - 1] and group_key(hashes[:3]) == hashes[2]
    assert group_key([]) == b""


def batch(w: World, rid: str, prompt: int = 800) -> Ticket:
    t = w.ticket(rid, prompt, cls="relaxed")
    w.gate.gather_batch(t, DOC, w.now, -1, 1.0, "reports")
    return t


async def test_a_gathered_batch_closes_at_its_window_and_goes_whole_to_one_instance() -> None:
    w = World([cand("fast", "0"), cand("fast", "1")], batch_size=4, batch_max_wait_ms=100)
    members = [batch(w, f"b{k}") for k in range(3)]
    assert all(m.outcome == "" and m.parent is None for m in members)   # gathering, not queued
    assert w.gate.tiers() == {"fast"} and w.gate.next_wake("fast", w.now) == 0.1
    assert await w.gate.release("fast", 0.05) == []     # the window is still open
    w.now = 0.1
    out = await w.gate.release("fast", w.now)           # it ended: one batch entry, released at once
    assert out == members and all(m.outcome == "released" for m in members)
    assert len({m.decision.chosen.key for m in members if m.decision.chosen}) == 1   # one instance
    assert not w.gate.tiers()


async def test_batch_is_held_while_a_higher_class_waits_and_while_its_instance_is_busy() -> None:
    busy = World([cand("fast", "0", kv_usage=0.95)], batch_size=2)
    members = [batch(busy, f"b{k}") for k in range(2)]       # full: queued at once
    assert members[0].parent is not None and busy.gate.next_wake("fast", 0.0) == 0.0
    assert await busy.gate.release("fast", 0.0) == []       # KV use 0.95 >= batch_kv 0.8: held
    busy.cands = [cand("fast", "0", kv_usage=0.5)]
    busy.now = 0.5
    assert await busy.gate.release("fast", busy.now) == members

    w = World([cand("fast", "0")], batch_size=2)
    assert await w.enter(w.ticket("doc", 20_000))
    inter = w.ticket("int", 500)
    assert not await w.enter(inter)
    members = [batch(w, f"c{k}") for k in range(2)]
    w.now = w.gate.next_wake("fast", w.now) or 0.0
    first = await w.gate.release("fast", w.now)
    while inter.outcome == "":
        assert not any(m.outcome for m in members)      # never released while the interactive waits
        w.now = w.gate.next_wake("fast", w.now) or w.now + 0.01
        first += await w.gate.release("fast", w.now)
    assert first[0] is inter
    while not all(m.outcome for m in members):
        w.now = w.gate.next_wake("fast", w.now) or w.now + 0.01
        first += await w.gate.release("fast", w.now)
    assert first[1:] == members


async def test_a_member_that_leaves_is_not_released_and_a_shed_batch_sheds_every_member() -> None:
    w = World([cand("fast", "0", kv_usage=0.95)], batch_size=3)
    a, b, c = (batch(w, f"m{k}") for k in range(3))
    w.gate.leave(b, "left")
    assert b.outcome == "left" and b.parent is None
    w.cands = [cand("fast", "0")]
    assert await w.gate.release("fast", 0.0) == [a, c]

    full = World([cand("fast", "0", kv_usage=0.95)], batch_size=2, max_queued=1)
    x, y = batch(full, "x"), batch(full, "y")          # one batch entry fills the queue
    assert await full.enter(full.ticket("doc", 20_000))
    inter = full.ticket("int", 500)
    assert not await full.enter(inter)                   # the batch is the lowest class: shed
    assert {id(t) for t in full.shed} == {id(x), id(y)}
    assert x.outcome == y.outcome == "shed" and x.shed_status == 503 and inter.outcome == ""


def test_price_factor_discounts_the_bill_and_a_reservation_at_the_factor_covers_it() -> None:
    from policies.schema import load_policy
    from router.accounting import cost_units, discounted
    from router.budget_store import price_units
    tier = load_policy("policies/examples/demo.yaml").tiers["fast"]
    full = cost_units(tier, 1000, 200, 300)
    half = cost_units(tier, 1000, 200, 300, 0.5)
    assert half == discounted(full - 300 * price_units(tier.prices.output), 0.5) + 300 * discounted(
        price_units(tier.prices.output), 0.5)
    assert abs(half - full / 2) <= 301                 # rounded up per output token at most
    for factor in (0.1, 0.3, 0.5, 0.77, 1.0):
        for prompt, completion, budget in ((1, 1, 1), (4096, 10, 64), (33_333, 999, 1000), (7, 0, 5)):
            reserve = cost_units(tier, prompt, 0, budget, factor)
            assert cost_units(tier, prompt, 0, completion, factor) <= reserve
            assert cost_units(tier, prompt, prompt // 2, completion, factor) <= reserve


async def test_a_batch_costs_its_window_the_shared_prefix_once() -> None:
    from router.prefix_hash import PrefixHashes
    w = World([cand("fast", "0", kv_usage=0.95)], batch_size=3)

    def ph(tail: int) -> PrefixHashes:      # 50 blocks of 16: the first 32 shared (512 tokens), then its own
        hs = [bytes([1, k]) for k in range(32)] + [bytes([2, tail, k]) for k in range(18)]
        return PrefixHashes(hs, list(range(50)), 16)
    members = []
    for k in range(3):
        t = w.ticket(f"m{k}", 800, cls="relaxed")
        t.prefix, t.cost_of = ph(k), lambda c: max(0, 800 - c.cached_tokens)
        w.gate.gather_batch(t, DOC, w.now, -1, 1.0, "reports")
        members.append(t)
    group = members[0].parent
    assert group is not None and group.members == members
    assert group.cost == 800 + 2 * (800 - 512)
    assert group.cost_of(cand("fast", "0", cached_tokens=640)) == 3 * (800 - 640)   # the cache covers more


async def test_a_batch_goes_to_the_best_instance_under_the_threshold_not_behind_a_busy_first_choice() -> None:
    w = World([cand("fast", "0", cached_tokens=600, waiting=3.0), cand("fast", "1")], batch_size=2)
    members = [batch(w, f"b{k}") for k in range(2)]          # f0 holds the prefix, but its engine has a queue
    out = await w.gate.release("fast", 0.0)
    assert out == members
    assert {m.decision.chosen.key for m in members if m.decision.chosen} == {"fast/f1"}
