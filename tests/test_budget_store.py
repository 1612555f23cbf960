"""Admission, settlement, sweeping and the ledger against a real Redis, on an injected clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
import redis.asyncio as aioredis

from router.budget_store import BudgetStore, FlexBudget, Usage, price_units, tag, usd

T0 = int(dt.datetime(2026, 11, 22, 10, 0, tzinfo=dt.UTC).timestamp() * 1000)


def tenant() -> str:
    return "t-" + uuid.uuid4().hex[:8]


def usage(cost: int, prompt: int = 100, completion: int = 10, at_ms: int = T0, tier: str = "fast") -> Usage:
    return Usage(tier=tier, instance="i0", route="auto", status=200, prompt=prompt, cached=0, completion=completion,
                 cost=cost, base=cost * 3, nocache=cost, latency_ms=12.5, ttft_ms=3.0, slo_met=True, at_ms=at_ms)


async def admit(store: BudgetStore, t: str, rid: str, reserve: int, **kw: object) -> object:
    args: dict[str, object] = {"rpm": None, "tpm": None, "tokens": 110, "reserve": reserve, "daily": None,
                               "monthly": None, "ttl_s": 60.0}
    args.update(kw)
    return await store.admit(t, rid, **args)  # type: ignore[arg-type]


def test_price_units_are_exact_integers() -> None:
    assert price_units(0.05) == 500 and price_units(0.15) == 1500 and price_units(1.2) == 12000
    assert usd(1_000_000 * price_units(0.15)) == pytest.approx(0.15)


@pytest.mark.parametrize("when", [
    dt.datetime(2026, 1, 1, 0, 0, 0), dt.datetime(2026, 2, 28, 23, 59, 59), dt.datetime(2028, 2, 29, 12),
    dt.datetime(2026, 12, 31, 23, 59, 59), dt.datetime(2000, 3, 1), dt.datetime(2100, 2, 28, 5),
])
async def test_periods_follow_the_utc_calendar(redis: aioredis.Redis, when: dt.datetime) -> None:
    ms = int(when.replace(tzinfo=dt.UTC).timestamp() * 1000)
    store = BudgetStore(redis, clock_ms=lambda: ms)
    st = await store.status(tenant())
    assert (st["day"], st["month"]) == (when.strftime("%Y%m%d"), when.strftime("%Y%m"))
    t = tenant()
    a = await admit(store, t, "x", 10, daily=5)
    nxt_day = dt.datetime(when.year, when.month, when.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    assert a.retry_after_s == pytest.approx(nxt_day.timestamp() - ms // 1000)  # type: ignore[attr-defined]
    a = await admit(store, t, "y", 10, monthly=5)
    nm = dt.datetime(when.year + (when.month == 12), when.month % 12 + 1, 1, tzinfo=dt.UTC)
    assert a.retry_after_s == pytest.approx(nm.timestamp() - ms // 1000)  # type: ignore[attr-defined]


async def test_concurrent_admissions_admit_exactly_the_ones_that_fit(redis: aioredis.Redis) -> None:
    store = BudgetStore(redis, clock_ms=lambda: T0)
    t = tenant()
    res = await asyncio.gather(*(admit(store, t, f"r{i}", 1000, daily=7_500) for i in range(64)))
    assert sum(1 for a in res if a.ok) == 7                      # type: ignore[attr-defined]
    rejected = [a for a in res if not a.ok]                      # type: ignore[attr-defined]
    assert all(a.kind == "budget" and a.detail == "daily" and a.left_units == 500 for a in rejected)
    st = await store.status(t)
    assert st["reserved_day"] == 7000 and st["spent_day"] == 0


async def test_admission_is_idempotent_and_settlement_is_exact_and_once(redis: aioredis.Redis) -> None:
    store = BudgetStore(redis, clock_ms=lambda: T0)
    t = tenant()
    assert (await admit(store, t, "a", 1000, daily=10_000)).kind == "ok"   # type: ignore[attr-defined]
    again = await admit(store, t, "a", 1000, daily=10_000)
    assert again.ok and again.kind == "dup"                               # type: ignore[attr-defined]
    assert (await store.status(t))["reserved_day"] == 1000
    assert await store.settle(t, "a", usage(420)) == "open"
    assert await store.settle(t, "a", usage(420)) == "dup"
    st = await store.status(t)
    assert (st["spent_day"], st["reserved_day"], st["spent_month"], st["reserved_month"]) == (420, 0, 420, 0)
    rows = await store.ledger(t)
    assert len(rows) == 1 and rows[0][1]["cost"] == "420" and rows[0][1]["tier"] == "fast"
    agg = await store.aggregates(t, 1, dt.date(2026, 11, 22))
    assert agg["2026112210|fast|cost"] == 420 and agg["2026112210|fast|requests"] == 1
    assert agg["2026112210|fast|base"] == 1260 and agg["2026112210|fast|prompt"] == 100


async def test_usage_aggregates_are_kept_per_day_for_the_retention_period(redis: aioredis.Redis) -> None:
    now = [T0]
    store = BudgetStore(redis, clock_ms=lambda: now[0], retention_days=3)
    t = tenant()
    for k, cost in enumerate((100, 200, 300)):       # three UTC days, one settlement each
        now[0] = T0 + k * 86_400_000
        assert await admit(store, t, f"r{k}", 1000) is not None
        assert await store.settle(t, f"r{k}", usage(cost, at_ms=now[0])) == "open"
    ttl = await redis.pttl(f"{tag(t)}:agg:20261122")
    assert 3 * 86_400_000 - 60_000 < ttl <= 3 * 86_400_000   # each day's key expires after the retention
    last = dt.date(2026, 11, 24)
    assert sum(v for k, v in (await store.aggregates(t, 3, last)).items() if k.endswith("|cost")) == 600
    assert sum(v for k, v in (await store.aggregates(t, 1, last)).items() if k.endswith("|cost")) == 300
    assert (await store.aggregates(t, 5, dt.date(2026, 12, 31))) == {}     # outside the window: none


async def test_rate_limits_use_a_sliding_minute(redis: aioredis.Redis) -> None:
    now = [T0 + 30_000]
    store = BudgetStore(redis, clock_ms=lambda: now[0])
    t = tenant()
    for i in range(3):
        assert (await admit(store, t, f"r{i}", 0, rpm=3)).ok      # type: ignore[attr-defined]
    a = await admit(store, t, "r3", 0, rpm=3)
    assert not a.ok and a.detail == "rpm" and a.retry_after_s == pytest.approx(30.0)  # type: ignore[attr-defined]
    now[0] += 45_000        # next minute, 15 s in: the previous minute still weighs 75%: 3 x 0.75 = 2.25
    assert not (await admit(store, t, "r4", 0, rpm=3)).ok         # type: ignore[attr-defined]
    now[0] += 30_000        # 45 s in: 3 x 0.25 = 0.75, one more fits
    assert (await admit(store, t, "r5", 0, rpm=3)).ok              # type: ignore[attr-defined]
    t2 = tenant()
    assert (await admit(store, t2, "big", 0, tpm=1000, tokens=900)).ok   # type: ignore[attr-defined]
    a = await admit(store, t2, "more", 0, tpm=1000, tokens=200)
    assert not a.ok and a.detail == "tpm"                          # type: ignore[attr-defined]
    await store.settle(t2, "big", usage(0, prompt=50, completion=10))   # settled to 60 real tokens
    assert (await admit(store, t2, "more2", 0, tpm=1000, tokens=200)).ok  # type: ignore[attr-defined]


async def test_sweeper_releases_leaked_reservations_and_a_late_settle_bills_once(redis: aioredis.Redis) -> None:
    now = [T0]
    store = BudgetStore(redis, clock_ms=lambda: now[0])
    t = tenant()
    await admit(store, t, "dead", 5000, daily=6000, ttl_s=60)
    assert not (await admit(store, t, "blocked", 5000, daily=6000)).ok  # type: ignore[attr-defined]
    now[0] += 59_000
    assert await store.sweep(t) == 0
    now[0] += 2_000
    assert await store.sweep(t) == 1
    st = await store.status(t)
    assert st["reserved_day"] == 0
    assert (await admit(store, t, "next", 5000, daily=6000)).ok       # type: ignore[attr-defined]
    assert await store.settle(t, "dead", usage(700)) == "expired"     # the slow router did finish after all
    assert await store.settle(t, "dead", usage(700)) == "dup"
    st = await store.status(t)
    assert (st["spent_day"], st["reserved_day"]) == (700, 5000)


async def test_admission_itself_releases_expired_reservations(redis: aioredis.Redis) -> None:
    """No false 429 between a reservation's TTL and the next sweep: admit releases what has expired."""
    now = [T0]
    store = BudgetStore(redis, clock_ms=lambda: now[0])
    t = tenant()
    assert (await admit(store, t, "dead", 5000, daily=6000, ttl_s=10)).ok  # type: ignore[attr-defined]
    now[0] += 9_999
    assert not (await admit(store, t, "early", 5000, daily=6000)).ok     # type: ignore[attr-defined]
    now[0] += 2
    assert (await admit(store, t, "after", 5000, daily=6000)).ok         # type: ignore[attr-defined]
    assert await store.sweep(t) == 0                                      # nothing left for the sweeper
    assert (await store.status(t))["reserved_day"] == 5000
    assert await store.settle(t, "dead", usage(700)) == "expired"         # a late settle still bills once
    assert (await store.status(t))["spent_day"] == 700


async def test_orphan_settlement_bills_at_the_request_time(redis: aioredis.Redis) -> None:
    store = BudgetStore(redis, clock_ms=lambda: T0)
    t = tenant()
    yesterday = T0 - 86_400_000
    assert await store.settle(t, "o1", usage(300, at_ms=yesterday)) == "orphan"
    assert await store.settle(t, "o1", usage(300, at_ms=yesterday)) == "dup"
    raw = await redis.hgetall(f"{tag(t)}:b")
    assert raw[b"sd:20261121"] == b"300" and b"sd:20261122" not in raw


@pytest.mark.parametrize(("daily", "monthly", "granted", "reserved"), [
    (10_000, None, None, 1_100),      # the whole budget fits: nothing shrinks
    (900, None, 80, 900),             # 100 prompt units + 80 tokens x 10 units fill the 900 left
    (905, 2_000, 80, 900),            # the tighter period decides; a partial token is not granted
    (2_000, 650, 55, 650),
    (240, None, None, 0),             # 14 tokens would fit, below the least of 16: refused
])
async def test_a_flexible_completion_budget_shrinks_to_what_is_left(
        redis: aioredis.Redis, daily: int, monthly: int | None, granted: int | None, reserved: int) -> None:
    store = BudgetStore(redis, clock_ms=lambda: T0)
    t = tenant()
    flex = FlexBudget(prompt_units=100, units_per_token=10, wanted=100, least=16)
    a = await admit(store, t, "r", 1_100, daily=daily, monthly=monthly, tokens=200, tpm=10_000, flex=flex)
    assert a.ok is (reserved > 0) and a.granted == granted        # type: ignore[attr-defined]
    st = await store.status(t)
    assert st["reserved_day"] == st["reserved_month"] == (1_100 if a.ok and granted is None else reserved)
    if a.ok:   # the rate window counts the tokens actually reserved
        assert a.window_tokens == 200 - (100 - (granted or 100))  # type: ignore[attr-defined]
        assert a.window_requests == 1                              # type: ignore[attr-defined]
