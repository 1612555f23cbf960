"""Prefill windows (#14 item 2): the Redis token bucket and its in-memory twin, one contract, on an
injected clock, against a real Redis."""

from __future__ import annotations

import random
import uuid

import pytest
import redis.asyncio as aioredis

from router.admission.window_store import Grant, WindowStore
from router.replay.window_twin import MemoryWindowStore
from tests.test_store_contract import Clock


def make(kind: str, r: aioredis.Redis, clock: Clock) -> WindowStore | MemoryWindowStore:
    return WindowStore(r, timeout_s=2.0, clock_ms=clock) if kind == "redis" else MemoryWindowStore(clock)


async def test_a_window_admits_while_positive_takes_the_whole_cost_and_refills(kind: str,
                                                                                redis: aioredis.Redis) -> None:
    clock, t = Clock(), f"t{uuid.uuid4().hex[:8]}"
    w = make(kind, redis, clock)
    rate, burst = 50_000, 2_500           # 50K tokens/s, a 50 ms window
    assert await w.take(t, "i", 2_000, rate, burst) == Grant(True, 500.0, 0.0)
    assert await w.take(t, "i", 100_000, rate, burst) == Grant(True, -99_500.0, 0.0)   # a document: debt
    refused = await w.take(t, "i", 10, rate, burst)
    assert refused is not None and not refused.ok and refused.wait_s == pytest.approx(1.991)
    clock.ms += 1_990
    assert not (await w.take(t, "i", 10, rate, burst)).ok        # type: ignore[union-attr]
    clock.ms += 2
    assert (await w.take(t, "i", 10, rate, burst)) == Grant(True, 90.0, 0.0)   # 2 ms x 50 tokens, less 10
    clock.ms += 60_000
    assert (await w.take(t, "i", 0, rate, burst)) == Grant(True, 2_500.0, 0.0)   # refilled to the burst only
    assert (await w.take(t, "other", 1, rate, burst)) == Grant(True, 2_499.0, 0.0)   # windows are per instance
    # floors: a class may overdraw to -2 bursts; a batch waits for a full window (floor burst - 1)
    assert (await w.take(t, "f", 7_000, rate, burst)) == Grant(True, -4_500.0, 0.0)
    assert not (await w.take(t, "f", 10, rate, burst)).ok                     # type: ignore[union-attr]
    assert (await w.take(t, "f", 10, rate, burst, -5_000)) == Grant(True, -4_510.0, 0.0)
    full = await w.take(t, "f", 10, rate, burst, 2_499)
    assert full is not None and not full.ok and full.wait_s == 0.141          # (2,499 + 4,510) / 50 per ms, + 1 ms


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_twin_and_redis_answer_a_random_sequence_alike(seed: int, redis: aioredis.Redis) -> None:
    rng = random.Random(seed)
    ca, cb = Clock(), Clock()
    t = f"t{uuid.uuid4().hex[:8]}"
    a, b = MemoryWindowStore(ca), WindowStore(redis, timeout_s=2.0, clock_ms=cb)
    for _ in range(300):
        step = rng.choice([0, 0, 1, 7, 40, 900, 5000])
        ca.ms += step
        cb.ms += step
        inst = rng.choice(["i0", "i1"])
        args = (rng.choice([0, 5, 300, 4000, 60_000]), rng.choice([1_000, 72_600.5]), rng.choice([50, 3_630]),
                rng.choice([0, 0, -200, -14_520, 3_629]))
        assert a.take_now(t, inst, *args) == await b.take(t, inst, *args)


async def test_an_unavailable_store_answers_none(tmp_path: object) -> None:
    r = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.05)
    try:
        assert await WindowStore(r, timeout_s=0.2).take("t", "i", 10, 1000, 100) is None
    finally:
        await r.aclose()
