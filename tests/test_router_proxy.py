"""Proxy behaviour with simulators over real sockets: retries, broken streams, disconnects, body rewriting."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgspec

from backends.sim.faults import Faults
from backends.sim.run import start_sim
from backends.valkey import free_port
from policies.schema import Policy, load_policy
from router.gateway import forward_body
from tests.conftest import DEMO_KEY, serve_router
from tests.test_policies import DEMO

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
FAST = "Qwen/Qwen3-1.7B-FP8"


def fast_only_policy() -> Policy:
    return load_policy(DEMO)


def body(**kw: object) -> dict[str, object]:
    return {"model": "qwen3-1.7b", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **kw}


async def test_connect_error_and_5xx_retry_on_the_next_instance() -> None:
    broken = await start_sim("qwen3-1.7b-fp8", time_scale=0.1, faults=Faults(error_rate=1.0, error_status=503))
    good = await start_sim("qwen3-1.7b-fp8", time_scale=0.1)
    dead = f"http://127.0.0.1:{free_port()}"
    urls = {"fast": [("a-dead", dead), ("b-broken", broken.url), ("c-good", good.url)]}
    try:
        async with serve_router(fast_only_policy(), urls, max_attempts=3) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH) as c:
            seen = set()
            for i in range(6):
                r = await c.post("/v1/chat/completions", json=body(messages=[{"role": "user", "content": f"q{i}"}]))
                assert r.status_code == 200, r.text
                seen.add(r.headers["x-tiergate-instance"])
            assert seen == {"c-good"}
    finally:
        await broken.close()
        await good.close()


async def test_all_candidates_failing_is_503_with_retry_after() -> None:
    broken = await start_sim("qwen3-1.7b-fp8", time_scale=0.1, faults=Faults(error_rate=1.0, error_status=500))
    try:
        async with serve_router(fast_only_policy(), {"fast": [("x", broken.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH) as c:
            r = await c.post("/v1/chat/completions", json=body())
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "upstream_unavailable"
    finally:
        await broken.close()


async def test_backend_400_passes_through_without_retry() -> None:
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.1, max_model_len=4096)
    try:
        # The policy believes 40960 tokens fit; the backend (4096) says no: its 400 reaches the client.
        async with serve_router(fast_only_policy(), {"fast": [("x", sim.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH) as c:
            r = await c.post("/v1/chat/completions", json=body(max_tokens=8000))
            assert r.status_code == 400
            assert "maximum context length is 4096" in r.json()["error"]["message"]
    finally:
        await sim.close()


async def test_stream_cut_after_first_byte_ends_with_error_event() -> None:
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.1, faults=Faults(cut_after_chunks=3))
    try:
        async with serve_router(fast_only_policy(), {"fast": [("x", sim.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH) as c:
            async with c.stream("POST", "/v1/chat/completions", json=body(max_tokens=50, stream=True)) as r:
                assert r.status_code == 200
                text = (await r.aread()).decode()
        events = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
        assert len(events) >= 2
        last = json.loads(events[-1])
        assert last["error"]["code"] == "upstream_stream_error"
    finally:
        await sim.close()


async def test_client_disconnect_cancels_the_upstream_request() -> None:
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=1.0)
    try:
        async with serve_router(fast_only_policy(), {"fast": [("x", sim.url)]}) as url:
            async with httpx.AsyncClient(base_url=url, headers=AUTH) as c, \
                    c.stream("POST", "/v1/chat/completions",
                             json=body(max_tokens=5000, stream=True, ignore_eos=True)) as r:
                got = 0
                async for _ in r.aiter_raw():
                    got += 1
                    if got >= 3:
                        break
            for _ in range(200):
                if sim.server.engine.stats.success["abort"] == 1:
                    break
                await asyncio.sleep(0.02)
            assert sim.server.engine.stats.success["abort"] == 1
            assert not sim.server.engine.running and not sim.server.engine.waiting
    finally:
        await sim.close()


def test_forward_body_rewrites_model_keeps_unknown_fields_and_drops_hosts() -> None:
    raw = {"model": "auto", "messages": [], "temperature": 0.2, "my_vendor_field": {"a": 1},
           "base_url": "http://evil", "api_base": "http://evil", "stream": True}
    out = msgspec.json.decode(forward_body(raw, FAST, stream=True))
    assert out["model"] == FAST and out["temperature"] == 0.2 and out["my_vendor_field"] == {"a": 1}
    assert "base_url" not in out and "api_base" not in out
    assert out["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert raw["model"] == "auto"  # the client's body is not mutated


async def test_router_with_external_redis_records_policy_version(redis_url: str) -> None:
    import redis.asyncio as aioredis

    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.1)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.delete("tiergate:policy:version")
        async with serve_router(fast_only_policy(), {"fast": [("x", sim.url)]}, redis_url=redis_url) as url, \
                httpx.AsyncClient(base_url=url) as c:
            ready = (await c.get("/ready")).json()
            assert ready["redis"] is True
            assert (await client.get("tiergate:policy:version")).decode() == ready["policy_version"]
    finally:
        await client.aclose()
        await sim.close()


async def test_backend_context_rejection_falls_back_to_the_next_tier_whose_context_fits() -> None:
    from policies.schema import parse_policy

    text = DEMO.read_text().replace("max_model_len: 40960", "max_model_len: 100000")  # the policy overstates fast
    policy = parse_policy(text, "demo-overstated.yaml")
    fast = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)          # really 40,960 tokens
    long = await start_sim("qwen3-4b-256k", time_scale=0.05, served_model_name="Qwen/Qwen3-4B-Instruct-2507")
    urls = {"fast": [("fast-0", fast.url)], "long": [("long-0", long.url)], "balanced": [("bal-0", long.url)]}
    prompt = "hello " * 45_000
    try:
        async with serve_router(policy, urls) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
            r = await c.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": prompt}]})
            assert r.status_code == 200, r.text
            assert r.headers["x-tiergate-tier"] == "long"  # fast refused it as too long; balanced (32K) is skipped
            r = await c.post("/v1/chat/completions", json={"model": "qwen3-1.7b", "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": prompt}]})
            assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    finally:
        await fast.close()
        await long.close()
