"""One contract for the Redis stores and their in-memory twins (router/replay/*_twin.py), on an injected clock.

`store` fixtures are parametrized over the twin and the Redis store against a real Redis, one node and a
private Redis Cluster (tests/redis_servers.py); every test runs each through the same operations. The last
two tests drive a seeded random sequence of operations through a twin and a Redis store (one node, and the
cluster) side by side and require the same answer to every one.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from router.affinity_store import AffinityStore, index_key
from router.budget_store import BudgetStore, FlexBudget, Usage
from router.lifecycle.ports import AffinityIndex, BudgetLedger
from router.redis_pool import RedisClient, close_redis, make_redis
from router.replay.affinity_twin import MemoryAffinityStore
from router.replay.budget_twin import MemoryBudgetStore, periods

T0 = int(dt.datetime(2026, 11, 30, 23, 59, tzinfo=dt.UTC).timestamp() * 1000)   # near a day and month end


@pytest.fixture(params=["memory", "redis", "cluster"])
def kind(request: pytest.FixtureRequest) -> str:
    """The in-memory twin, the Redis store on one node, and on a Redis Cluster."""
    return str(request.param)


@pytest.fixture(params=["single", "cluster"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def redis(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[RedisClient]:
    """The router's own client (`make_redis`) of one node, or of the private cluster when the test's `kind`
    or `backend` says so."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    cluster = "cluster" in (params.get("kind"), params.get("backend"))
    client = make_redis(request.getfixturevalue("cluster_url") if cluster else redis_url, 2.0)
    yield client
    await close_redis(client)


class Clock:
    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def make_budget(kind: str, r: RedisClient, clock: Callable[[], int], keep_s: float = 7 * 86400) -> BudgetLedger:
    return BudgetStore(r, clock_ms=clock, keep_s=keep_s) if kind != "memory" else \
        MemoryBudgetStore(clock_ms=clock, keep_s=keep_s)


def make_affinity(kind: str, r: RedisClient, clock: Callable[[], int]) -> AffinityIndex:
    return AffinityStore(r, timeout_s=2.0, clock_ms=clock) if kind != "memory" else MemoryAffinityStore(clock)


def usage(cost: int, at_ms: int, prompt: int = 100, completion: int = 10, tier: str = "fast") -> Usage:
    return Usage(tier=tier, instance="i0", route="auto", status=200, prompt=prompt, cached=3, completion=completion,
                 cost=cost, base=cost * 3, nocache=cost + 7, latency_ms=12.5, ttft_ms=3.0, slo_met=True, at_ms=at_ms,
                 base_ok=True, gpu_us=cost * 11, gpu_src="engine", slo_class="interactive")


def name() -> str:
    return "c-" + uuid.uuid4().hex[:10]


async def test_budget_reserve_settle_idempotent_and_flexible(kind: str, redis: RedisClient) -> None:
    clock = Clock()
    store = make_budget(kind, redis, clock)
    t = name()
    kw: dict[str, Any] = {"rpm": None, "tpm": None, "tokens": 100, "daily": 1000, "monthly": None, "ttl_s": 60.0}
    a = await store.admit(t, "a", reserve=600, **kw)
    assert a.ok and a.kind == "ok" and a.left_units == 400 and a.used_fraction == 0.6
    assert (await store.admit(t, "a", reserve=600, **kw)).kind == "dup"            # idempotent by id
    refused = await store.admit(t, "b", reserve=600, **kw)
    assert not refused.ok and refused.detail == "daily" and refused.left_units == 400
    flex = FlexBudget(prompt_units=100, units_per_token=10, wanted=50, least=16)   # 600 wanted, 400 left
    g = await store.admit(t, "c", reserve=600, flex=flex, **kw)
    assert g.ok and g.granted == 30 and g.left_units == 0                          # 100 + 30 x 10 = 400
    again = await store.admit(t, "c", reserve=600, flex=flex, **kw)               # a retry after a timeout
    assert (again.ok, again.kind, again.detail, again.granted) == (True, "dup", "open", 30)
    assert await store.settle(t, "a", usage(250, clock.ms)) == "open"
    assert await store.settle(t, "a", usage(250, clock.ms)) == "dup"               # billed once
    st = await store.status(t)
    assert (st["spent_day"], st["reserved_day"]) == (250, 400)
    assert await store.settle(t, "never-admitted", usage(5, clock.ms)) == "orphan"
    assert await store.release(t, "c") == "released" and await store.release(t, "c") == "released"
    assert await store.release(t, "unknown") == "blocked"
    assert (await store.admit(t, "unknown", reserve=1, **kw)).kind == "dup"       # a late admission reserves none
    assert (await store.status(t))["reserved_day"] == 0
    rows = await store.ledger(t)
    assert [(f["id"], f["how"], f["cost"]) for _, f in rows] == [("a", "open", "250"),
                                                                  ("never-admitted", "orphan", "5")]
    day_hour = periods(clock.ms)[2]
    agg = await store.aggregates(t, 3, dt.date(2026, 11, 30))
    assert agg[f"{day_hour}|fast|requests"] == 2 and agg[f"{day_hour}|fast|cost"] == 255
    assert agg[f"{day_hour}|fast|nocache"] == 257 + 12
    assert [agg[f"{day_hour}|fast|{k}"] for k in ("base", "base_n", "base_na", "base_cost", "gpu_us",
                                                   "gpu_src_engine", "slo_met@interactive", "slo_n@interactive")] \
        == [255 * 3, 2, 0, 255, 255 * 11, 2, 2, 2]
    assert rows and all(f["gpu_src"] == "engine" and f["base_n"] == "1" for _, f in rows)


async def test_budget_rate_windows_expiry_and_periods(kind: str, redis: RedisClient) -> None:
    clock = Clock()
    store = make_budget(kind, redis, clock)
    t = name()
    kw: dict[str, Any] = {"tokens": 40, "reserve": 10, "daily": None, "monthly": 100, "ttl_s": 30.0}
    assert (await store.admit(t, "1", rpm=2, tpm=100, **kw)).ok
    assert (await store.admit(t, "2", rpm=2, tpm=100, **kw)).window_requests == 2
    r = await store.admit(t, "3", rpm=2, tpm=100, **kw)
    assert not r.ok and r.detail == "rpm" and r.retry_after_s == (60000 - T0 % 60000) / 1000
    r = await store.admit(t, "3", rpm=5, tpm=100, **kw)
    assert not r.ok and r.detail == "tpm"
    clock.ms += 90_000    # a new day and month; the sliding minute: half of the previous one still counts
    assert await store.sweep(t) == 2                                  # "1" and "2" ran past their 30 s TTL
    assert await store.settle(t, "1", usage(4, T0, 30, 10)) == "expired"   # billed, nothing released twice
    a = await store.admit(t, "4", rpm=5, tpm=100, **kw)
    assert a.ok and a.window_requests == 2 and a.window_tokens == 80  # 2 x 0.5 + 1 requests, 80 x 0.5 + 40 tokens
    st = await store.status(t)
    assert (st["day"], st["month"], st["reserved_month"], st["spent_month"]) == ("20261201", "202612", 10, 0)
    assert await store.sweep(t) == 0


async def test_affinity_prefix_ttl_and_capacity(kind: str, redis: RedisClient) -> None:
    clock = Clock()
    store = make_affinity(kind, redis, clock)
    tier = name()
    hs = [bytes([i]) * 8 for i in range(1, 9)]
    assert await store.record(tier, "a", hs[:6], 10.0, 100) == 6
    assert await store.record(tier, "b", hs[:2], 10.0, 100) == 2
    found = await store.lookup([(tier, ["a", "b", "c"], hs)], 10.0)
    assert found == {(tier, "a"): 6, (tier, "b"): 2, (tier, "c"): 0}
    clock.ms += 5_000
    assert await store.record(tier, "a", hs[6:], 10.0, 5) == 5        # capacity: the oldest 3 go, tail first
    assert await store.size(tier, "a") == 5
    assert await store.lookup([(tier, ["a"], hs)], 10.0) == {(tier, "a"): 3}       # the old chain's head stays
    assert await store.lookup([(tier, ["a"], hs[3:])], 10.0) == {(tier, "a"): 0}
    clock.ms += 6_000                                                 # past the TTL of the first records
    assert await store.lookup([(tier, ["a", "b"], hs)], 10.0) == {(tier, "a"): 0, (tier, "b"): 0}
    assert await store.lookup([(tier, ["a"], hs[6:])], 10.0) == {(tier, "a"): 2}
    await store.remove(tier, "a", [hs[7]])
    assert await store.lookup([(tier, ["a"], hs[6:])], 10.0) == {(tier, "a"): 1}
    await store.clear(tier, "a")
    assert await store.size(tier, "a") == 0
    await redis.delete(*(index_key(tier, i) for i in "abc"))


def _admit_args(rng: random.Random) -> dict[str, Any]:
    wanted = rng.randint(1, 60)
    least = rng.choice([0, 0, 16, 1])
    return {"rpm": rng.choice([None, 3, 8]), "tpm": rng.choice([None, 400, 2000]), "tokens": rng.randint(1, 300),
            "reserve": rng.randint(0, 500), "daily": rng.choice([None, 2000, 5000]),
            "monthly": rng.choice([None, 4000, 20000]), "ttl_s": rng.choice([1.0, 30.0, 120.0]),
            "flex": FlexBudget(rng.randint(0, 50), rng.randint(0, 20), wanted, min(least, wanted)) if least else None}


async def outcome(coro: Any) -> Any:
    try:
        return await coro
    except Exception:
        return "error"


async def test_budget_twin_answers_as_redis(backend: str, redis: RedisClient) -> None:
    """A seeded random sequence through the twin and Redis: every answer the same."""
    rng = random.Random(13)
    clock = Clock()
    keep = 365 * 86400.0     # ids stay known for the whole run (Redis expires keys on its own clock)
    twin, real = make_budget("memory", redis, clock, keep), make_budget(backend, redis, clock, keep)
    tenants = [name() for _ in range(2)]
    ids: list[str] = []
    for step in range(400):
        t = rng.choice(tenants)
        op = rng.random()
        if op < 0.4:
            rid = f"r{step}"
            ids.append(rid)
            args = _admit_args(rng)
            got = [await s.admit(t, rid, **args) for s in (twin, real)]
        elif op < 0.7 and ids:
            u = usage(rng.randint(0, 600), clock.ms - rng.randint(0, 90_000_000), rng.randint(0, 200),
                      rng.randint(0, 200), rng.choice(["fast", "long"]))
            rid = rng.choice(ids)
            got = [await outcome(s.settle(t, rid, u)) for s in (twin, real)]   # a blocked id errors in both
        elif op < 0.78 and ids:
            rid = rng.choice([*ids, "x" + str(step)])
            got = [await s.release(t, rid) for s in (twin, real)]
        elif op < 0.85:
            limit = rng.choice([1, 500])
            got = [await s.sweep(t, limit) for s in (twin, real)]
        elif op < 0.9:
            got = [await s.status(t) for s in (twin, real)]
        else:
            clock.ms += rng.choice([1, 500, 20_000, 61_000, 3_600_000, 30 * 3_600_000])
            continue
        assert got[0] == got[1], (step, got)
    for t in tenants:
        a, b = await twin.ledger(t, 10_000), await real.ledger(t, 10_000)
        assert [f for _, f in a] == [f for _, f in b] and a
        today = dt.datetime.fromtimestamp(clock.ms / 1000, dt.UTC).date()
        assert await twin.aggregates(t, 30, today) == await real.aggregates(t, 30, today)


async def test_affinity_twin_answers_as_redis(backend: str, redis: RedisClient) -> None:
    """Records, lookups, removals and trims in one millisecond and across TTLs: every answer the same."""
    rng = random.Random(7)
    clock = Clock()
    twin, real = make_affinity("memory", redis, clock), make_affinity(backend, redis, clock)
    tier = name()
    pool = [rng.randbytes(8) for _ in range(40)]
    recorded: dict[str, int] = {}   # instance -> last record time (Redis expires keys on its own clock)
    for step in range(300):
        inst = rng.choice("abcd")
        op = rng.random()
        ttl = 60.0   # one TTL, as one tier has (key expiry runs on Redis' own clock, entries' age on ours)
        if op < 0.4:
            start = rng.randint(0, 30)
            hashes = pool[start:start + rng.randint(1, 10)]
            cap = rng.choice([3, 8, 1000])
            got = [await s.record(tier, inst, hashes, ttl, cap) for s in (twin, real)]
            recorded[inst] = clock.ms
        elif op < 0.75:
            start = rng.choice([0, 0, rng.randint(0, 30)])
            hashes = pool[start:start + rng.randint(1, 12)]
            got = [await s.lookup([(tier, list("abcd"), hashes)], ttl) for s in (twin, real)]
        elif op < 0.82:
            hashes = rng.sample(pool, 3)
            for s in (twin, real):
                await s.remove(tier, inst, hashes)
            continue
        elif op < 0.9:
            if clock.ms - recorded.get(inst, clock.ms) >= 60_000:
                continue
            got = [await s.size(tier, inst) for s in (twin, real)]
        else:
            clock.ms += rng.choice([0, 2, 200, 20_000, 70_000])   # even: never 1 ms past a key's expiry, where
            # Redis' own clock (the key) and the injected one (the entries' age) would disagree
            continue
        assert got[0] == got[1], (step, got)
    await redis.delete(*(index_key(tier, i) for i in "abcd"))
