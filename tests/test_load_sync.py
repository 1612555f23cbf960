"""Per-instance load shared between router replicas through a real Redis (router/load_sync.py)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis

from backends.registry import Registry
from backends.sim.run import start_sim
from backends.valkey import free_port
from policies.schema import InstanceSpec, load_policy
from router.load_sync import KEY, LoadSync
from tests.conftest import DEMO_KEY, serve_router
from tests.test_affinity import policy
from tests.test_policies import DEMO

URLS = {"fast": [InstanceSpec(id=f"i{k}", url=f"http://127.0.0.1:{9100 + k}") for k in range(2)]}


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    await r.delete(KEY)
    yield r
    await r.delete(KEY)
    await r.aclose()


def fast(reg: Registry, k: int) -> object:
    return reg.tiers["fast"].instances[k]


def cand(reg: Registry, key: str) -> tuple[int, int, int]:
    c = next(c for c in reg.candidates(("fast",)) if c.key == key)
    return c.in_flight, c.pending_requests, c.pending_tokens


async def test_each_replica_sees_the_sum_of_the_others_counts(redis: aioredis.Redis) -> None:
    regs = [Registry(load_policy(DEMO), URLS) for _ in range(3)]
    syncs = [LoadSync(redis, r, f"replica-{k}") for k, r in enumerate(regs)]
    a0, b0 = regs[0].tiers["fast"].instances[0], regs[1].tiers["fast"].instances[0]
    a0.in_flight, a0.pending_requests, a0.pending_tokens = 3, 2, 5000
    b0.in_flight, b0.pending_requests, b0.pending_tokens = 1, 1, 700
    for s in syncs:
        assert await s.sync_once()
    assert await syncs[0].sync_once()  # replica 0 now has seen replica 1's write too
    assert cand(regs[2], "fast/i0") == (4, 3, 5700)        # replica 2: both peers, none of its own
    assert cand(regs[0], "fast/i0") == (3 + 1, 2 + 1, 5000 + 700)  # its own plus replica 1's
    assert cand(regs[2], "fast/i1") == (0, 0, 0)
    a0.in_flight = a0.pending_requests = a0.pending_tokens = 0  # replica 0 finishes its requests
    assert await syncs[0].sync_once() and await syncs[2].sync_once()
    assert cand(regs[2], "fast/i0") == (1, 1, 700)
    await syncs[1].leave()                                   # a clean shutdown removes its counts at once
    assert await syncs[2].sync_once()
    assert cand(regs[2], "fast/i0") == (0, 0, 0)


async def test_a_silent_replica_ages_out_by_redis_time(redis: aioredis.Redis) -> None:
    reg = Registry(load_policy(DEMO), URLS)
    # a replica that crashed long ago: its last write is stamped at Redis time 1000 ms
    await redis.hset(KEY, "crashed", "1000|" + json.dumps({"fast/i1": [9, 9, 9000]}))
    sync = LoadSync(redis, reg, "me", stale_s=2.0)
    assert await sync.sync_once()
    assert cand(reg, "fast/i1") == (0, 0, 0)
    assert not await redis.hexists(KEY, "crashed")           # and the script removed it


async def test_sync_fails_open_to_local_counts_and_drops_stale_peers() -> None:
    now = [100.0]
    reg = Registry(load_policy(DEMO), URLS)
    dead = aioredis.Redis(port=free_port(), socket_timeout=0.05, socket_connect_timeout=0.05, retry=None)
    results: list[str] = []
    sync = LoadSync(dead, reg, "me", timeout_s=0.05, stale_s=2.0, on_result=results.append, clock=lambda: now[0])
    i0 = reg.tiers["fast"].instances[0]
    sync.apply([json.dumps({"fast/i0": [5, 1, 100]}).encode()])  # what the last good sync brought
    sync.last_ok = now[0]
    i0.in_flight = 2
    assert not await sync.sync_once()                        # Redis away: keep the recent peer counts
    assert cand(reg, "fast/i0") == (7, 1, 100)
    now[0] += 2.5                                            # past stale_s: peers no longer count
    assert not await sync.sync_once()
    assert cand(reg, "fast/i0") == (2, 0, 0)
    assert results == ["error", "error"]
    await dead.aclose()


async def test_malformed_peer_payload_is_ignored(redis: aioredis.Redis) -> None:
    reg = Registry(load_policy(DEMO), URLS)
    sync = LoadSync(redis, reg, "me")
    sync.apply([b"not json", json.dumps({"fast/i1": [1, 0, 0]}).encode()])
    assert cand(reg, "fast/i1") == (1, 0, 0)


async def test_two_routers_see_each_others_streams(redis_url: str) -> None:
    """Replica A holds streams open on one instance; replica B's decision ranks that instance lower."""
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=20.0)
    other = await start_sim("qwen3-1.7b-fp8", time_scale=1.0)
    tag = uuid.uuid4().hex[:6]
    busy = InstanceSpec(id=f"busy-{tag}", url=sim.url)
    free = InstanceSpec(id=f"free-{tag}", url=other.url)
    auth = {"authorization": f"Bearer {DEMO_KEY}"}
    body = {"model": "chat", "max_tokens": 400, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with serve_router(policy(), {"fast": [busy]}, redis_url=redis_url) as a, \
                serve_router(policy(), {"fast": [busy, free]}, redis_url=redis_url,
                             expose_decision_header=True) as b, \
                httpx.AsyncClient(headers=auth, timeout=30) as c:

            async def totals() -> dict[str, float]:
                r = await c.post(b + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 1})
                assert r.status_code == 200, r.text
                return dict(json.loads(r.headers["x-tiergate-decision"])["totals"])

            idle = await totals()
            assert idle[f"fast/{busy.id}"] == idle[f"fast/{free.id}"]
            streams = [asyncio.create_task(c.post(a + "/v1/chat/completions", json=body)) for _ in range(4)]
            await asyncio.sleep(0.3)                          # a few sync intervals (50 ms each)
            loaded = await totals()
            assert loaded[f"fast/{busy.id}"] < loaded[f"fast/{free.id}"], loaded
            assert all(r.status_code == 200 for r in await asyncio.gather(*streams))
            await asyncio.sleep(0.3)
            after = await totals()
            assert after[f"fast/{busy.id}"] == after[f"fast/{free.id}"], after
    finally:
        await sim.close()
        await other.close()


async def test_the_sync_loop_always_honours_its_cancel(redis: aioredis.Redis) -> None:
    """Shutdown cancels the loop at any point, even as a Redis reply lands (redis-py 8 and 3.11 wait_for lose some)."""
    reg = Registry(load_policy(DEMO), URLS)
    sync = LoadSync(redis, reg, "replica-cancel", interval_s=0.0)
    lost = 0
    for k in range(300):
        task = asyncio.create_task(sync.run())
        for _ in range(k % 7):                    # cancel at varying points of the loop
            await asyncio.sleep(0)
        await asyncio.sleep(0.0005 * (k % 3))
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=1.0)
        lost += not done
        while not done:                           # swallowed: ask again until it stops
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=0.3)
        if lost >= 3:
            break
    assert lost == 0, f"{lost} cancels were swallowed (at trial {k})"


async def test_the_sync_loop_stops_on_cancel_wherever_the_cancel_lands(tmp_path: object) -> None:
    """Shutdown cancels the loop; a cancel that lands inside a Redis call against a frozen server (where
    the call's own short timeout races it) must still stop the loop, never leave it running."""
    import os
    import signal
    from pathlib import Path

    from backends.valkey import EmbeddedValkey
    from router.redis_pool import close_redis, make_redis
    server = EmbeddedValkey(Path(str(tmp_path)) / "v", appendfsync=None)
    server.start()
    r = make_redis(server.url, 0.05)
    reg = Registry(load_policy(DEMO), URLS)
    try:
        assert await LoadSync(r, reg, "me").sync_once()
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)                # every call now waits for its timeout
        try:
            for k in range(40):
                task = asyncio.create_task(LoadSync(r, reg, f"me{k}", interval_s=0.001, timeout_s=0.05).run())
                await asyncio.sleep(0.002 * (k % 30))           # inside the call, at its timeout, or between
                task.cancel()
                done, _ = await asyncio.wait([task], timeout=2.0)
                assert done, f"cancel {k} was swallowed: the loop still runs"
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    finally:
        await close_redis(r)
        server.stop()


async def test_an_idle_replica_skips_redis_until_it_or_idle_s_says_otherwise(redis: aioredis.Redis) -> None:
    now = [100.0]
    regs = [Registry(load_policy(DEMO), URLS) for _ in range(2)]
    results: list[str] = []
    idle = LoadSync(redis, regs[0], "idle", idle_s=1.0, clock=lambda: now[0], on_result=results.append)
    busy = LoadSync(redis, regs[1], "busy")
    assert await idle.sync_once() and results == ["ok"]         # the first tick always asks
    assert await idle.sync_once() and results == ["ok"]         # nothing sent, nothing heard: skipped
    b0 = regs[1].tiers["fast"].instances[0]
    b0.in_flight, b0.pending_requests, b0.pending_tokens = 2, 1, 300
    assert await busy.sync_once()
    now[0] += 0.5
    assert await idle.sync_once() and cand(regs[0], "fast/i0") == (0, 0, 0) and results == ["ok"]
    now[0] += 0.6                                                # idle_s passed: it asks, and hears the peer
    assert await idle.sync_once() and cand(regs[0], "fast/i0") == (2, 1, 300) and results == ["ok", "ok"]
    assert await idle.sync_once() and results == ["ok"] * 3     # it heard load: every tick asks again
    b0.in_flight = b0.pending_requests = b0.pending_tokens = 0
    assert await busy.sync_once() and await idle.sync_once() and results == ["ok"] * 4
    assert cand(regs[0], "fast/i0") == (0, 0, 0)
    assert await idle.sync_once() and results == ["ok"] * 4     # quiet again: skipped
    regs[0].tiers["fast"].instances[1].in_flight = 1             # its own first dispatch: the next tick asks
    assert await idle.sync_once() and results == ["ok"] * 5


async def test_a_request_at_an_idle_replica_refreshes_the_peers_load_once(redis: aioredis.Redis) -> None:
    now = [100.0]
    regs = [Registry(load_policy(DEMO), URLS) for _ in range(2)]
    results: list[str] = []
    idle = LoadSync(redis, regs[0], "idle", interval_s=0.05, idle_s=1.0, clock=lambda: now[0],
                    on_result=results.append)
    busy = LoadSync(redis, regs[1], "busy")
    assert await idle.sync_once() and not idle.needs_refresh()   # quiet, but the sync is fresh
    b0 = regs[1].tiers["fast"].instances[0]
    b0.in_flight = 3
    assert await busy.sync_once()
    now[0] += 0.2
    assert await idle.sync_once() and results == ["ok"]          # a tick: skipped
    assert idle.needs_refresh()                                  # a request arrives: it asks once
    await idle.refresh()
    assert results == ["ok", "ok"] and cand(regs[0], "fast/i0") == (3, 0, 0) and not idle.needs_refresh()
