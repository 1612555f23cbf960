"""Broken backends over real sockets: hung, stalled and garbled instances, a query of death, the retry budget.

Simulators with fault flags (backends/sim/faults.py) beside healthy ones, behind an in-process router
with short deadlines set in the policy. Assertions are on statuses, counts and ejection state; the
longest client wait is printed (run with -s), never asserted.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import msgspec
import pytest
from structlog.testing import capture_logs

from backends.http_client import make_client
from backends.registry import Registry
from backends.resilience import RetryBudget
from backends.sim.faults import Faults
from backends.sim.run import RunningSim, start_sim
from policies.schema import InstanceSpec, Policy, load_policy
from policies.types import Candidate, RoutingRequest
from router.deadlines import Deadlines
from router.errors import ApiError
from router.proxy import Forwarder, Outcome
from router.sse import check_event
from tests.conftest import DEMO_KEY, serve_router
from tests.test_policies import DEMO

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
FAST = "qwen3-1.7b"   # the demo route whose only tier is `fast`


def fast_policy(**tier: Any) -> Policy:
    """The demo policy, with fields of its `fast` tier replaced (short deadlines for these tests)."""
    pol = load_policy(DEMO)
    return msgspec.structs.replace(pol, tiers={**pol.tiers, "fast": msgspec.structs.replace(pol.tiers["fast"],
                                                                                             **tier)})


async def metric(c: httpx.AsyncClient, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in (await c.get("/metrics")).text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def ask(c: httpx.AsyncClient, i: int, stream: bool, **kw: Any) -> tuple[int, float, str, str]:
    """-> (status, seconds, instance, body text)."""
    body = {"model": FAST, "max_tokens": 4, "messages": [{"role": "user", "content": f"question {i}"}],
            "stream": stream, **kw}
    t0 = time.perf_counter()
    if stream:
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            text = (await r.aread()).decode()
    else:
        r = await c.post("/v1/chat/completions", json=body)
        text = r.text
    return r.status_code, time.perf_counter() - t0, r.headers.get("x-tiergate-instance", ""), text


def served(status: int, text: str, stream: bool) -> bool:
    if status != 200:
        return False
    if not stream:
        return bool(json.loads(text)["choices"])
    events = [e for e in text.split("\n\n") if e.strip()]
    return events[-1] == "data: [DONE]" and all(check_event(e.encode() + b"\n\n") in ("ok", "done") for e in events)


async def in_turns(n: int, concurrency: int, fn: Any) -> list[Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with sem:
            return await fn(i)
    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def closing(*sims: RunningSim) -> None:
    for s in sims:
        await s.close()


async def test_hung_instance_costs_one_first_byte_deadline_then_is_ejected() -> None:
    hung = await start_sim("qwen3-1.7b-fp8", time_scale=0.05, faults=Faults(hang_before_headers_s=120))
    good = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    urls = {"fast": [("hung", hung.url), ("good", good.url)]}
    try:
        async with serve_router(fast_policy(first_byte_timeout_s=0.5), urls) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            # one at a time, each request picks either instance (ties are broken by request id), until the
            # hung one has failed three times in a row; then a concurrent burst
            results = await in_turns(24, 1, lambda i: ask(c, i, stream=i % 2 == 1))
            results += await in_turns(24, 8, lambda i: ask(c, 100 + i, stream=i % 2 == 1))
            assert [(s, inst) for s, _, inst, _ in results] == [(200, "good")] * 48
            assert all(served(s, text, i % 2 == 1) for i, (s, _, _, text) in enumerate(results))
            timeouts = await metric(c, "tiergate_upstream_faults_total", instance="hung", kind="first_byte_timeout")
            assert timeouts >= 3                                          # consecutive failures that eject
            assert await metric(c, "tiergate_instance_ejections_total", instance="hung") >= 1
            assert await metric(c, "tiergate_instance_ejections_total", instance="good") == 0
            print(f"\nhung backend: longest client wait {max(t for _, t, _, _ in results):.2f} s "
                  f"(first-byte deadline 0.5 s, non-streamed 1.1 s), {timeouts:.0f} timeouts")
    finally:
        await closing(hung, good)


async def test_stream_whose_first_event_never_comes_fails_over_before_the_200() -> None:
    hung = await start_sim("qwen3-1.7b-fp8", time_scale=0.05, faults=Faults(hang_after_headers_s=120))
    good = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    try:
        async with serve_router(fast_policy(first_byte_timeout_s=0.5), {"fast": [("hung", hung.url),
                                                                                 ("good", good.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            results = await in_turns(8, 1, lambda i: ask(c, i, stream=True))
            assert all(served(s, text, True) and inst == "good" for s, _, inst, text in results)
            assert await metric(c, "tiergate_upstream_faults_total", instance="hung", kind="first_byte_timeout") >= 1
    finally:
        await closing(hung, good)


async def test_stall_mid_stream_ends_with_an_error_event_billed_for_what_was_sent() -> None:
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.05,
                          faults=Faults(stall_between_chunks_s=60, stall_at_chunk=4))
    try:
        async with serve_router(fast_policy(stall_timeout_s=0.5), {"fast": [("x", sim.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            status, _, _, text = await ask(c, 0, True, max_tokens=200, ignore_eos=True,
                                           stream_options={"include_usage": True, "continuous_usage_stats": True})
            assert status == 200
            events = [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: ")]
            assert "data: [DONE]" not in text and events[-1]["error"]["code"] == "upstream_timeout"
            sent = max(e["usage"]["completion_tokens"] for e in events if e.get("usage"))
            assert sent >= 1
            assert await metric(c, "tiergate_requests_total", status="504") == 1        # closed out once
            assert await metric(c, "tiergate_tokens_total", kind="completion") == sent  # billed what was sent
            assert await metric(c, "tiergate_upstream_faults_total", kind="stall_timeout") == 1
    finally:
        await sim.close()


async def test_garbage_json_instance_fails_no_request_and_is_ejected() -> None:
    bad = await start_sim("qwen3-1.7b-fp8", time_scale=0.05, faults=Faults(malformed="json"))
    good = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    try:
        async with serve_router(fast_policy(), {"fast": [("bad", bad.url), ("good", good.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            results = await in_turns(40, 4, lambda i: ask(c, i, stream=False))
            failed = [r for r in results if not served(r[0], r[3], False)]
            print(f"\ngarbage JSON instance: {len(failed)}/40 requests failed")
            assert failed == [] and {inst for _, _, inst, _ in results} == {"good"}
            assert await metric(c, "tiergate_upstream_faults_total", instance="bad", kind="malformed") >= 3
            assert await metric(c, "tiergate_instance_ejections_total", instance="bad") >= 1
            assert await metric(c, "tiergate_instance_ejections_total", instance="good") == 0
    finally:
        await closing(bad, good)


async def ask_completion(c: httpx.AsyncClient, i: int) -> tuple[int, float, str, str]:
    t0 = time.perf_counter()
    async with c.stream("POST", "/v1/completions", json={"model": FAST, "prompt": f"text {i}", "max_tokens": 8,
                                                          "stream": True}) as r:
        text = (await r.aread()).decode()
    return r.status_code, time.perf_counter() - t0, r.headers.get("x-tiergate-instance", ""), text


@pytest.mark.parametrize("api", ["chat", "completions"])
async def test_garbage_sse_instance_fails_at_most_the_requests_before_its_ejection(api: str) -> None:
    """Chat: the simulator's broken event comes right after the role-only first event, before the commit
    point, so every request fails over. Completions: it follows a good first event, after the client's
    200: the stream ends with an error event, and each counts until the instance is ejected."""
    bad = await start_sim("qwen3-1.7b-fp8", time_scale=0.05, faults=Faults(malformed="sse"))
    good = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    try:
        async with serve_router(fast_policy(), {"fast": [("bad", bad.url), ("good", good.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            results = await in_turns(24, 1, lambda i: ask(c, i, stream=True, max_tokens=8) if api == "chat"
                                     else ask_completion(c, i))
            failed = [text for s, _, _, text in results if not served(s, text, True)]
            ejections = await metric(c, "tiergate_instance_ejections_total", instance="bad")
            faults = await metric(c, "tiergate_upstream_faults_total", instance="bad", kind="malformed")
            print(f"\ngarbage SSE instance ({api}): {len(failed)}/24 requests failed, {faults:.0f} malformed "
                  f"answers, {ejections:.0f} ejections")
            assert ejections >= 1 and faults >= 3
            assert await metric(c, "tiergate_instance_ejections_total", instance="good") == 0
            if api == "chat":
                assert failed == []
            else:   # sequential: 3 failures in a row eject it; a readmitted instance fails once more at most
                assert all('"code":"bad_upstream"' in text for text in failed)
                assert len(failed) <= 3 + (ejections - 1)
    finally:
        await closing(bad, good)


async def test_query_of_death_gets_502_after_two_instances_and_ejects_nothing() -> None:
    poison = "POISON-7f3a"
    sims = [await start_sim("qwen3-1.7b-fp8", time_scale=0.05, faults=Faults(fail_on_input=poison)) for _ in range(2)]
    sims.append(await start_sim("qwen3-1.7b-fp8", time_scale=0.05))
    try:
        async with httpx.AsyncClient() as admin:   # the third gets the fault at run time
            r = await admin.post(sims[2].url + "/admin/faults", json={"fail_on_input": poison})
            assert r.status_code == 200 and r.json()["fail_on_input"] == poison
        urls = {"fast": [(f"i{k}", s.url) for k, s in enumerate(sims)]}
        async with serve_router(fast_policy(), urls, max_attempts=3) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            with capture_logs() as logs:
                bad = await in_turns(6, 2, lambda i: ask(c, i, False, messages=[
                    {"role": "user", "content": f"tell me about {poison} number {i}"}]))
            for status, _, _, text in bad:
                err = json.loads(text)["error"]
                assert status == 502 and err["code"] == "query_of_death" and "two backend instances" in err["message"]
            assert await metric(c, "tiergate_upstream_retries_total", reason="500") == 12   # two tries each
            good = await in_turns(12, 3, lambda i: ask(c, i, False))
            assert all(s == 200 for s, _, _, _ in good)
            assert await metric(c, "tiergate_queries_of_death_total", tier="fast") == 6
            assert await metric(c, "tiergate_instance_ejections_total") == 0            # healthy capacity kept
        qod = [e for e in logs if e["event"] == "query_of_death"]
        assert len(qod) == 6 and all(len(e["body_sha256"]) == 16 for e in qod)
        assert len({e["body_sha256"] for e in qod}) == 6                                # six different bodies
        assert poison not in repr(logs)                                                 # never the body
    finally:
        await closing(*sims)


def budget_forwarder(broken: RunningSim, good: RunningSim, budget: RetryBudget) -> tuple[Forwarder, Registry]:
    registry = Registry(load_policy(DEMO), {"fast": [InstanceSpec(id="broken", url=broken.url),
                                                    InstanceSpec(id="good", url=good.url)]})
    return Forwarder(make_client("aiohttp"), registry, 2, lambda tier, why: None, budget=budget), registry


async def forward(fwd: Forwarder, registry: Registry, body: dict[str, Any]) -> Outcome:
    """One request, `broken` ranked first whatever its health."""
    ranked = sorted(registry.candidates(("fast",)), key=lambda c: c.instance_id != "broken")
    out = Outcome()
    raw = json.dumps({"model": "Qwen/Qwen3-1.7B-FP8", "messages": [{"role": "user", "content": "hi"}],
                      **body}).encode()
    await fwd.send(ranked, "/v1/chat/completions", lambda tier: raw, False, False, out, lambda: None)
    return out


async def test_retry_budget_never_refuses_a_single_failover_to_an_idle_sibling() -> None:
    """A budget that allows no retry slot at all: failovers to the idle sibling still all go; once the
    sibling is busy (a request waits there for its first token), the budget refuses."""
    broken = await start_sim("qwen3-1.7b-fp8", time_scale=0.05, faults=Faults(error_rate=1.0, error_status=500))
    good = await start_sim("qwen3-1.7b-fp8", time_scale=1.0)
    budget = RetryBudget(lambda: 0, budget_percent=0.0, min_retries=0)
    fwd, registry = budget_forwarder(broken, good, budget)
    try:
        outs = [await forward(fwd, registry, {"max_tokens": 2}) for _ in range(20)]
        assert [(o.status, o.instance, o.attempts) for o in outs] == [(200, "good", 2)] * 20
        assert budget.denied == 0 and budget.free == 20
        slow = asyncio.create_task(forward(fwd, registry, {"max_tokens": 2000, "ignore_eos": True}))
        inst = registry.instance("fast", "good")
        for _ in range(500):                       # bounded wait: the slow one is on `good`, still prefilling
            if inst.pending_requests:
                break
            await asyncio.sleep(0.01)
        assert inst.pending_requests == 1
        try:
            await forward(fwd, registry, {"max_tokens": 2})
            raise AssertionError("the budget let a retry into a busy instance")
        except ApiError as exc:
            assert exc.status == 503 and "retry budget exhausted" in exc.message
        assert budget.denied == 1
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
    finally:
        await fwd.client.close()
        await closing(broken, good)


def test_deadlines_follow_the_prediction_the_slo_and_the_tier() -> None:
    d = Deadlines()   # first byte: 3 x, within [5, 120] s, 2000 tok/s assumed; stall: 200 x TPOT within [15, 120] s
    cand = Candidate(tier="fast", instance_id="a", max_model_len=40960, price_input=0.0, price_cached_input=0.0,
                     price_output=0.0, prefill_tps=10_000.0)
    req = RoutingRequest(request_id="r", tenant="t", virtual_model="m", route_tiers=("fast",), tenant_tiers=None,
                         prompt_tokens={"fast": 100}, max_tokens=10, default_completion_tokens=100,
                         ttft_target_s=1.0, tpot_target_s=0.05)
    long = msgspec.structs.replace(req, prompt_tokens={"fast": 200_000})
    assert d.first_byte_s(req, cand, None) == 5.0                                  # 3 x 1 s target, floored
    assert d.first_byte_s(long, cand, None) == pytest.approx(60.0)                 # 3 x 20 s predicted
    queued = msgspec.structs.replace(cand, pending_tokens=150_000)
    assert d.first_byte_s(req, queued, None) == pytest.approx(3 * 150_100 / 10_000)  # a queue ahead of it
    assert d.first_byte_s(long, msgspec.structs.replace(cand, prefill_tps=0.0), None) == 120.0  # rate unknown
    tier = msgspec.structs.replace(load_policy(DEMO).tiers["fast"], first_byte_timeout_s=0.5, stall_timeout_s=2.0)
    assert d.first_byte_s(long, cand, tier) == 0.5 and d.stall_s(req, cand, tier) == 2.0
    assert d.body_s(req, cand, 5.0) == pytest.approx(5.0 + 10 * 0.05 * 3)          # + max_tokens x TPOT x 3
    assert d.body_s(msgspec.structs.replace(req, max_tokens=None), cand, 5.0) == 300.0  # to the context's end
    assert d.stall_s(req, cand, None) == 15.0                                      # 200 x 50 ms, floored
    assert d.stall_s(msgspec.structs.replace(req, tpot_target_s=0.2), cand, None) == pytest.approx(40.0)
    assert d.stall_s(msgspec.structs.replace(req, tpot_target_s=None), cand, None) == 30.0   # nothing known
    assert d.stall_s(None, cand, None) == 30.0


def test_sse_event_checks() -> None:
    assert check_event(b'data: {"choices":[]}\n\n') == "ok"
    assert check_event(b"data: [DONE]\n\n") == "done"
    assert check_event(b": keep-alive\n\n") == "empty"
    assert check_event(b'data: {"error": {"message": "boom"}}\n\n') == "error"
    for bad in (b'data: {"id": broken\n\n', b"data: [1, 2]\n\n", b"data: hello\n\n", b'data: {"a":1\n\n'):
        assert check_event(bad) == "malformed"
