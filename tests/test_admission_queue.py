"""The admission queue (router/admission/queue.py): priority, fair shares, batch holding, shedding."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.admission.queue import AdmissionQueue, Waiting

ANY = lambda w: True  # noqa: E731


def w(name: str, tenant: str = "a", priority: int = 0, cost: int = 100, weight: float = 1.0,
      batch: bool = False) -> Waiting[str]:
    return Waiting(name, tenant, priority, cost, weight, batch)


def drain(q: AdmissionQueue[str], fits=ANY) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    while (x := q.pop(fits)) is not None:
        out.append(x.payload)
    return out


def test_higher_priority_first_and_fifo_within_a_tenant() -> None:
    q: AdmissionQueue[str] = AdmissionQueue()
    for x in (w("r1"), w("r2"), w("i1", priority=1), w("i2", priority=1)):
        assert q.push(x) is None
    assert q.depth() == {(False, 0): 2, (False, 1): 2}
    assert drain(q) == ["i1", "i2", "r1", "r2"]


def test_work_conserving_a_lower_class_goes_when_no_higher_one_fits() -> None:
    q: AdmissionQueue[str] = AdmissionQueue()
    q.push(w("big", priority=1, cost=50_000))
    q.push(w("small", priority=0, cost=100))
    assert q.pop(lambda x: x.cost < 1000).payload == "small"   # type: ignore[union-attr]
    assert q.pop(lambda x: x.cost < 1000) is None and len(q) == 1


def test_batch_waits_while_anything_else_is_queued_even_what_cannot_go() -> None:
    q: AdmissionQueue[str] = AdmissionQueue()
    q.push(w("b", priority=-1, batch=True))
    q.push(w("r", priority=0, cost=50_000))
    assert q.pop(lambda x: x.cost < 1000) is None              # r can't go, and b is held behind it
    assert drain(q) == ["r", "b"]


def test_a_flooding_tenant_does_not_delay_anothers_new_request() -> None:
    q: AdmissionQueue[str] = AdmissionQueue()
    for k in range(100):
        q.push(w(f"flood{k}", tenant="flood"))
    order = [q.pop(ANY).payload for _ in range(3)]   # type: ignore[union-attr]
    q.push(w("polite", tenant="polite"))
    nxt = [q.pop(ANY).payload for _ in range(2)]     # type: ignore[union-attr]
    assert order == ["flood0", "flood1", "flood2"] and "polite" in nxt   # not behind the flood's 97


@pytest.mark.parametrize(("wa", "wb", "ca", "cb"), [(1, 1, 100, 100), (2, 1, 100, 100), (1, 1, 1000, 100),
                                                    (3, 1, 500, 2000)])
def test_backlogged_tenants_get_tokens_in_proportion_to_their_weights(wa: float, wb: float, ca: int, cb: int) -> None:
    q: AdmissionQueue[str] = AdmissionQueue(max_queued=10_000)
    for k in range(2000):
        q.push(w(f"a{k}", tenant="a", cost=ca, weight=wa))
        q.push(w(f"b{k}", tenant="b", cost=cb, weight=wb))
    tokens: Counter[str] = Counter()
    for _ in range(1000):     # a busy period: both stay backlogged
        x = q.pop(ANY)
        assert x is not None
        tokens[x.tenant] += x.cost
    assert tokens["a"] / tokens["b"] == pytest.approx(wa / wb, rel=0.05)


def test_a_full_queue_sheds_the_lowest_class_and_its_last_in_fair_order() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(max_queued=3)
    q.push(w("i1", priority=1))
    q.push(w("r-heavy", tenant="heavy", cost=5000))
    q.push(w("r-light", tenant="light", cost=100))
    shed = q.push(w("i2", priority=1))
    assert shed is not None and shed.payload == "r-heavy"      # lowest class; largest tag within it
    newcomer = w("r-late", tenant="heavy", cost=5000)
    assert q.push(newcomer) is newcomer                         # the newcomer is the one a fair order serves last
    assert drain(q) == ["i1", "i2", "r-light"]


def test_remove_takes_a_request_out_once() -> None:
    q: AdmissionQueue[str] = AdmissionQueue()
    x, y = w("x"), w("y")
    q.push(x)
    q.push(y)
    assert q.remove(x) and not q.remove(x) and len(q) == 1
    assert drain(q) == ["y"]
    with pytest.raises(ValueError):
        q.push(w("z", weight=0))


ops = st.lists(st.tuples(st.sampled_from(["push", "pop", "remove"]), st.integers(-1, 2), st.sampled_from("abc"),
                         st.integers(1, 5000), st.booleans()), max_size=120)


@settings(max_examples=150, deadline=None)
@given(ops=ops, cap=st.integers(1, 20), limit=st.integers(1, 6000))
def test_every_request_leaves_exactly_once_and_the_rules_hold(ops: list[tuple[str, int, str, int, bool]], cap: int,
                                                               limit: int) -> None:
    q: AdmissionQueue[str] = AdmissionQueue(max_queued=cap)
    queued: list[Waiting[str]] = []
    gone: list[Waiting[str]] = []
    fits = lambda x: x.cost <= limit  # noqa: E731
    for n, (op, prio, tenant, cost, batch) in enumerate(ops):
        if op == "push":
            x = w(str(n), tenant, -2 if batch else prio, cost, batch=batch)
            shed = q.push(x)
            queued.append(x)
            if shed is not None:
                assert not any(g is shed for g in gone)
                gone.append(shed)
                queued.remove(shed)
        elif op == "pop":
            x = q.pop(fits)
            if x is None:
                assert not any(fits(y) and not y.batch for y in queued) or \
                    all(y.batch for y in queued if fits(y))
                continue
            assert fits(x) and not any(g is x for g in gone)
            if x.batch:
                assert all(y.batch for y in queued)
            else:
                assert not any(fits(y) and not y.batch and y.priority > x.priority for y in queued)
            gone.append(x)
            queued.remove(x)
        elif queued:
            x = queued[cost % len(queued)]
            assert q.remove(x)
            gone.append(x)
            queued.remove(x)
        assert len(q) == len(queued) <= cap
