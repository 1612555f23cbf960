"""Prefill windows and the admission queue on a live router (#14): real sockets, a simulator, real Redis.

The simulator runs 60x slower than the H200 it models (~3,200 prefill tokens/s) and the policy seeds the
tier's prefill rate near that (3,000 tokens/s; the router then learns it from first tokens), so a 50 ms
window holds ~150 tokens: a few prompts of ~400 tokens close it for a while and the next requests queue."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.sim.run import running_sim
from backends.valkey import EmbeddedValkey
from policies.schema import Policy, parse_policy
from router.auth import hash_key
from tests.conftest import serve_router

FAST = "Qwen/Qwen3-1.7B-FP8"
SLOW = 60.0


def policy(tag: str, *, max_queued: int = 1024, rate: int = 3000, windows: bool = True, instances: int = 1,
           batch_kv: float = 0.8) -> Policy:
    return parse_policy(f"""
version: 1
tiers:
  fast:
    model: {FAST}
    max_model_len: 40960
    prices: {{input: 0.05, cached_input: 0.01, output: 0.20}}
    prefill_tokens_per_s: {rate}
    simulate: {{profile: qwen3-1.7b-fp8}}
slo_classes:
  interactive: {{ttft_ms: 20000, tpot_ms: 1000, priority: 1}}
  relaxed: {{ttft_ms: 60000, tpot_ms: 1000, priority: 0}}
  batch: {{ttft_ms: 60000, tpot_ms: 1000, priority: -1, batchable: true, price_factor: 0.5}}
tenants:
  a: {{key_sha256: [{hash_key('sk-a-' + tag)}], default_slo: interactive}}
  b: {{key_sha256: [{hash_key('sk-b-' + tag)}], default_slo: interactive}}
admission: {{windows: {str(windows).lower()}, window_ms: 50, max_queued: {max_queued}, batch_kv: {batch_kv},
             batch_max_wait_ms: 300, overdraw_ms: 0}}
routes:
  chat: {{tiers: [fast], profile: p}}
profiles:
  p:
    filters: [{{type: tier_allowed}}, {{type: context_fits}}, {{type: healthy}}]
    scorers: [{{type: expected_money}}]
    picker: {{type: max_score}}
""")


def body(n: int) -> dict[str, object]:
    """A prompt of about n tokens that shares no prefix with any other (windows count uncached tokens)."""
    return {"model": "chat", "max_tokens": 2,
            "messages": [{"role": "user", "content": uuid.uuid4().hex + " " + " ".join(["word"] * n)}]}


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_a_burst_queues_for_the_window_and_every_request_is_released(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    async with running_sim("qwen3-1.7b-fp8", time_scale=SLOW) as sim, \
            serve_router(policy(tag), {"fast": [(f"f-{tag}", sim.url)]}, redis_url=redis_url) as url, \
            httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer sk-a-{tag}"}, timeout=60) as c:
        replies = await asyncio.gather(*(c.post("/v1/chat/completions", json=body(400)) for _ in range(8)))
        assert [r.status_code for r in replies] == [200] * 8
        m = (await c.get("/metrics")).text
        released = metric(m, "tiergate_queue_wait_seconds_count", tier="fast", outcome="released")
        assert released >= 5                                 # ~400 tokens each against a 150-token window
        assert metric(m, "tiergate_window_tokens_total", tier="fast", store="shared") >= 8 * 400
        assert metric(m, "tiergate_queue_depth", tier="fast") == 0


async def test_interactive_waiting_behind_relaxed_is_released_first(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    async with running_sim("qwen3-1.7b-fp8", time_scale=SLOW) as sim, \
            serve_router(policy(tag), {"fast": [(f"f-{tag}", sim.url)]}, redis_url=redis_url) as url, \
            httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer sk-a-{tag}"}, timeout=60) as c:
        done: list[str] = []

        async def ask(name: str, cls: str, n: int) -> None:
            r = await c.post("/v1/chat/completions", json=body(n), headers={"x-tiergate-slo-class": cls})
            assert r.status_code == 200, r.text
            done.append(name)

        first = asyncio.create_task(ask("doc", "relaxed", 3000))   # ~1 s of window debt
        await asyncio.sleep(0.2)
        tasks = []
        for k in range(3):
            tasks.append(asyncio.create_task(ask(f"rel{k}", "relaxed", 300)))
            await asyncio.sleep(0.02)
        for k in range(3):
            tasks.append(asyncio.create_task(ask(f"int{k}", "interactive", 300)))
            await asyncio.sleep(0.02)
        await asyncio.gather(first, *tasks)
        assert done[0] == "doc" and set(done[1:4]) == {"int0", "int1", "int2"}, done


async def test_a_full_queue_sheds_with_openai_errors_and_a_queued_client_that_leaves_is_billed_nothing(
        redis_url: str) -> None:
    tag = uuid.uuid4().hex[:8]
    async with running_sim("qwen3-1.7b-fp8", time_scale=SLOW) as sim, \
            serve_router(policy(tag, max_queued=1), {"fast": [(f"f-{tag}", sim.url)]}, redis_url=redis_url) as url, \
            httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer sk-a-{tag}"}, timeout=60) as c:
        doc = asyncio.create_task(c.post("/v1/chat/completions", json=body(3000)))   # ~1 s of window debt
        await asyncio.sleep(0.15)
        rel = asyncio.create_task(c.post("/v1/chat/completions", json=body(300),
                                         headers={"x-tiergate-slo-class": "relaxed"}))
        await asyncio.sleep(0.1)
        inter = asyncio.create_task(c.post("/v1/chat/completions", json=body(300)))
        shed = await rel                                       # the lower class makes room
        assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded" and shed.json()["error"]["type"]
        await asyncio.sleep(0.1)
        full = await c.post("/v1/chat/completions", json=body(300))
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        assert (await inter).status_code == 200 and (await doc).status_code == 200
        before = metric((await c.get("/metrics")).text, "tiergate_tokens_total", kind="prompt")
        # a client that gives up while queued: nothing billed, nothing left queued
        doc = asyncio.create_task(c.post("/v1/chat/completions", json=body(3000)))   # debt again
        await asyncio.sleep(0.15)
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/chat/completions", json=body(300), timeout=0.3)
        assert (await doc).status_code == 200
        await asyncio.sleep(0.3)
        m = (await c.get("/metrics")).text
        after = metric(m, "tiergate_tokens_total", kind="prompt")
        assert metric(m, "tiergate_queue_wait_seconds_count", outcome="left") == 1
        assert metric(m, "tiergate_queue_depth", tier="fast") == 0
        assert 3000 <= after - before < 3300                  # the second document only


async def test_a_tenant_flooding_its_class_does_not_hold_back_another_tenants_request(redis_url: str) -> None:
    """Weighted fair queueing within a class: tenant a queues 6 requests behind a document, then tenant b
    queues one; b's request is released right after a's first (its finish tag is one request's cost past
    the virtual time), not behind a's whole backlog."""
    tag = uuid.uuid4().hex[:8]
    async with running_sim("qwen3-1.7b-fp8", time_scale=SLOW) as sim, \
            serve_router(policy(tag), {"fast": [(f"f-{tag}", sim.url)]}, redis_url=redis_url) as url, \
            httpx.AsyncClient(base_url=url, timeout=60) as c:
        done: list[str] = []

        async def ask(tenant: str, name: str, n: int) -> None:
            r = await c.post("/v1/chat/completions", json=body(n),
                             headers={"authorization": f"Bearer sk-{tenant}-{tag}"})
            assert r.status_code == 200, r.text
            done.append(name)

        first = asyncio.create_task(ask("a", "doc", 3000))       # ~1 s of window debt
        await asyncio.sleep(0.2)
        flood = []
        for k in range(6):
            flood.append(asyncio.create_task(ask("a", f"a{k}", 300)))
            await asyncio.sleep(0.02)
        other = asyncio.create_task(ask("b", "b", 300))
        await asyncio.gather(first, other, *flood)
        assert done[0] == "doc" and "b" in done[1:3], done


async def test_a_gathered_batch_goes_to_one_instance_and_is_billed_at_its_price_factor(redis_url: str) -> None:
    """Six batch-class requests sharing a document, over two instances, arrive within the gathering window:
    all six are served by one instance, and each is billed at half the tier's prices."""
    tag = uuid.uuid4().hex[:8]
    doc = uuid.uuid4().hex + " " + " ".join(["paragraph"] * 300)
    async with running_sim("qwen3-1.7b-fp8", time_scale=2.0) as s0, \
            running_sim("qwen3-1.7b-fp8", time_scale=2.0) as s1, \
            serve_router(policy(tag, batch_kv=1.0), {"fast": [(f"f0-{tag}", s0.url), (f"f1-{tag}", s1.url)]},
                         redis_url=redis_url) as url, \
            httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer sk-a-{tag}"}, timeout=60) as c:
        async def ask(k: int, cls: str) -> httpx.Response:
            msgs = [{"role": "system", "content": doc}, {"role": "user", "content": f"question {k} " + "why " * 20}]
            return await c.post("/v1/chat/completions", headers={"x-tiergate-slo-class": cls},
                                json={"model": "chat", "max_tokens": 4, "messages": msgs})
        async def totals() -> dict[str, float]:       # tenant a's ledger (other tests bill an "a" too)
            return dict((await c.get("/v1/usage", params={"days": 1})).json()["totals"])
        before = await totals()
        replies = await asyncio.gather(*(ask(k, "batch") for k in range(6)))
        assert [r.status_code for r in replies] == [200] * 6
        assert len({r.headers["x-tiergate-instance"] for r in replies}) == 1
        full = await ask(99, "interactive")                      # the same shape at full price
        assert full.status_code == 200
        m = (await c.get("/metrics")).text
        assert metric(m, "tiergate_queue_wait_seconds_count", tier="fast", outcome="released") >= 6
        want = sum(usd(r.json()["usage"], 0.5) for r in replies) + usd(full.json()["usage"], 1.0)
        after = await totals()
        for _ in range(100):                                     # settlement is off the request path
            if after["requests"] - before["requests"] >= 7:
                break
            await asyncio.sleep(0.05)
            after = await totals()
        assert after["requests"] - before["requests"] == 7
        assert after["cost_usd"] - before["cost_usd"] == pytest.approx(want, abs=2e-9)   # 10 decimals each


def usd(u: dict[str, Any], factor: float) -> float:
    """The usage's cost at the test policy's fast prices, times the class's price factor."""
    cached = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    prompt, out = int(u["prompt_tokens"]), int(u["completion_tokens"])
    return factor * ((prompt - cached) * 0.05 + cached * 0.01 + out * 0.20) / 1e6


@pytest.mark.skipif(os.name != "posix", reason="SIGSTOP")
async def test_windows_fail_open_to_local_windows_when_redis_is_paused_then_killed(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    server = EmbeddedValkey(tmp_path / "v")
    server.start()
    assert server.proc is not None
    try:
        async with running_sim("qwen3-1.7b-fp8", time_scale=0.01) as sim, \
                serve_router(policy(tag, rate=200_000), {"fast": [(f"f-{tag}", sim.url)]}, redis_url=server.url,
                             redis_timeout_s=0.05, accounting_timeout_s=0.05) as url, \
                httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer sk-a-{tag}"}, timeout=60) as c:
            async def burst() -> None:
                rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=body(200)) for _ in range(4)))
                assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]

            await burst()
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                await burst()
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            server.stop()
            await burst()
            m = (await c.get("/metrics")).text
            assert metric(m, "tiergate_window_tokens_total", store="shared") >= 4 * 200
            assert metric(m, "tiergate_window_tokens_total", store="local") >= 8 * 200
    finally:
        server.stop()
