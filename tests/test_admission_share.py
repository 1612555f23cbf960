"""Tenants' arrival shares at the gate (router/admission/share.py): who is over its weighted share."""

from __future__ import annotations

from router.admission.share import MARGIN, TAU_S, Shares

LV = ("fast", 1)


def test_a_tenant_alone_is_never_over_its_share() -> None:
    s = Shares()
    for _ in range(1000):
        s.arrive(LV, "alice", 1.0, 0.0)
    assert not s.over(LV, "alice", 0.0)
    assert not s.over(LV, "nobody", 0.0) and not s.over(("long", 1), "alice", 0.0)


def test_ten_times_the_share_is_over_and_the_other_tenant_is_not() -> None:
    s = Shares()
    for k in range(100):
        s.arrive(LV, "alice", 1.0, k * 0.01)
        if k % 10 == 0:
            s.arrive(LV, "bob", 1.0, k * 0.01)
    assert s.over(LV, "alice", 1.0) and not s.over(LV, "bob", 1.0)


def test_equal_tenants_are_not_over_and_weights_move_the_line() -> None:
    s = Shares()
    for _ in range(10):
        s.arrive(LV, "a", 1.0, 0.0)
        s.arrive(LV, "b", 1.0, 0.0)
    assert not s.over(LV, "a", 0.0) and not s.over(LV, "b", 0.0)
    w = Shares()                      # b sends 4x a's requests: over at weights 1:1 (80% > 1.5 x 50%)
    for _ in range(10):
        w.arrive(LV, "a", 1.0, 0.0)
        for _ in range(4):
            w.arrive(LV, "b", 1.0, 0.0)
    assert w.over(LV, "b", 0.0)
    v = Shares()                      # ... but not at weight 3 for b: its share is 75%
    for _ in range(10):
        v.arrive(LV, "a", 1.0, 0.0)
        for _ in range(4):
            v.arrive(LV, "b", 3.0, 0.0)
    assert not v.over(LV, "b", 0.0) and MARGIN > 1


def test_a_tenant_that_went_quiet_is_forgotten() -> None:
    s = Shares()
    for _ in range(10):
        s.arrive(LV, "bob", 1.0, 0.0)
    for _ in range(50):
        s.arrive(LV, "alice", 1.0, 0.0)
    assert s.over(LV, "alice", 0.0)
    later = 10 * TAU_S                # bob's count decays below the activity line: alice is alone again
    s.arrive(LV, "alice", 1.0, later)
    assert not s.over(LV, "alice", later) and "bob" not in s.levels[LV].v
