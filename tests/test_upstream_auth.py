"""Upstream API keys (policies/upstream_auth.py), the simulator's vLLM-style `--api-key`
(backends/sim/auth.py) and what the router passes on: `x-request-id`, `traceparent`, `tracestate`
(router/trace_context.py). Real simulator and router over sockets."""

from __future__ import annotations

import uuid

import httpx
import pytest

from backends.sim.run import running_sim
from policies.schema import PolicyError, parse_policy
from router.trace_context import propagation, valid_traceparent
from tests.conftest import serve_router
from tests.test_accounting import FAST, MSGS, policy_text

KEY_ENV = "TG_TEST_UPSTREAM_KEY"
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def keyed_policy(tag: str, url: str, env: str = KEY_ENV) -> str:
    return policy_text(tag, [url], {"free": ""}).replace(
        "    max_model_len: 40960\n", f"    max_model_len: 40960\n    api_key_env: {env}\n", 1)


async def test_the_simulator_guards_all_but_the_public_endpoints_as_vllm_does() -> None:
    async with running_sim("qwen3-1.7b-fp8", api_keys=("k-one", "k-two")) as sim, \
            httpx.AsyncClient(base_url=sim.url, timeout=30) as c:
        body = {"model": FAST, "messages": MSGS, "max_tokens": 2}
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200
        refused = await c.post("/v1/chat/completions", json=body)
        assert refused.status_code == 401 and refused.json() == {"error": "Unauthorized"}
        assert (await c.post("/tokenize", json={"prompt": "hi"})).status_code == 401
        assert (await c.post("/v1/chat/completions", json=body,
                             headers={"authorization": "Basic k-one"})).status_code == 401
        assert (await c.post("/v1/chat/completions", json=body,
                             headers={"authorization": "Bearer k-wrong"})).status_code == 401
        for key in ("k-one", "k-two"):
            ok = await c.post("/v1/chat/completions", json=body, headers={"authorization": f"bearer {key}"})
            assert ok.status_code == 200, ok.text


async def test_the_router_sends_the_tiers_key_and_passes_on_request_id_and_trace_context(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-upstream-secret")
    tag = uuid.uuid4().hex[:6]
    async with running_sim("qwen3-1.7b-fp8", api_keys=("sk-upstream-secret",)) as sim:
        async with serve_router(parse_policy(keyed_policy(tag, sim.url), "auth.yaml")) as base, \
                httpx.AsyncClient(base_url=base, timeout=30,
                                  headers={"authorization": f"Bearer sk-free-{tag}"}) as c:
            body = {"model": FAST, "messages": MSGS, "max_tokens": 2}
            traced = await c.post("/v1/chat/completions", json=body,
                                  headers={"traceparent": TP, "tracestate": "vendor=1", "x-request-id": "req-abc"})
            assert traced.status_code == 200, traced.text
            assert traced.headers["x-request-id"] == "req-abc"
            bad = await c.post("/v1/chat/completions", json=body, headers={"traceparent": "00-xyz-01"})
            assert bad.status_code == 200, bad.text
            streamed = await c.post("/v1/chat/completions", json={**body, "stream": True})
            assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
        async with httpx.AsyncClient(base_url=sim.url, timeout=10) as direct:
            assert (await direct.get("/admin/seen")).status_code == 401     # guarded like any route
            seen = (await direct.get("/admin/seen",
                                     headers={"authorization": "Bearer sk-upstream-secret"})).json()["requests"]
    assert seen[0] == {"x-request-id": "req-abc", "traceparent": TP, "tracestate": "vendor=1"}
    assert seen[1]["traceparent"] is None and seen[1]["tracestate"] is None     # malformed: dropped
    assert seen[1]["x-request-id"] == bad.headers["x-request-id"]               # the router's own id
    assert seen[2]["x-request-id"] == streamed.headers["x-request-id"]


def test_a_policy_naming_an_unset_or_bad_variable_is_refused_naming_the_field(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(PolicyError, match=rf"tiers\.fast\.api_key_env.*{KEY_ENV} is not set"):
        parse_policy(keyed_policy("t1", "http://127.0.0.1:9"), "auth.yaml")
    with pytest.raises(PolicyError, match=r"tiers\.fast\.api_key_env.*environment variable name"):
        parse_policy(keyed_policy("t2", "http://127.0.0.1:9", env="1-bad"), "auth.yaml")
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(PolicyError, match="is not set"):
        parse_policy(keyed_policy("t3", "http://127.0.0.1:9"), "auth.yaml")


@pytest.mark.parametrize(("value", "ok"), [
    (TP, True),
    (TP.upper(), False),                                           # lower-case hex only
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
    ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01", False),
    (TP + "-extra", False),                                        # version 00 has four fields
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", True),   # a later version may add
    ("", False),
])
def test_traceparent_validation(value: str, ok: bool) -> None:
    assert valid_traceparent(value) is ok
    assert ("traceparent" in propagation("r", {"traceparent": value})) is ok


async def test_tracing_records_the_request_its_phases_and_hands_the_upstream_span_to_vllm(
        redis_url: str) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from router.tracing import Tracing

    exporter = InMemorySpanExporter()
    tag = uuid.uuid4().hex[:6]
    text = policy_text(tag, [], {"capped": ", budgets: {daily_usd: 5.0}"})
    async with running_sim("qwen3-1.7b-fp8") as sim:
        where = f'instances: [{{id: i-{tag}, url: "{sim.url}"}}]'
        pol = parse_policy(text.replace("simulate: {profile: qwen3-1.7b-fp8}", where), "trace.yaml")
        async with serve_router(pol, redis_url=redis_url, tracer=Tracing(SimpleSpanProcessor(exporter))) as base, \
                httpx.AsyncClient(base_url=base, timeout=30, headers={"authorization": f"Bearer sk-capped-{tag}"}) as c:
            r = await c.post("/v1/chat/completions", json={"model": FAST, "messages": MSGS, "max_tokens": 3},
                             headers={"traceparent": TP})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
        async with httpx.AsyncClient(base_url=sim.url) as direct:
            seen = (await direct.get("/admin/seen")).json()["requests"]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans[f"chat {FAST}"]
    assert set(spans) == {root.name, "tokenize", "decide", "admit", "upstream", "settle"}
    assert format(root.context.trace_id, "032x") == TP.split("-")[1]           # the client's trace continues
    assert root.parent is not None and format(root.parent.span_id, "016x") == TP.split("-")[2]
    for name in ("tokenize", "decide", "admit", "upstream", "settle"):
        assert spans[name].parent is not None and spans[name].parent.span_id == root.context.span_id, name
        assert root.start_time <= spans[name].start_time <= spans[name].end_time <= root.end_time, name
    up = spans["upstream"]
    want = f"00-{format(up.context.trace_id, '032x')}-{format(up.context.span_id, '016x')}-01"
    assert seen[-1]["traceparent"] == want                                       # vLLM's spans go below it
    a = root.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == FAST
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert a["gen_ai.request.max_tokens"] == 3 and a["tiergate.tenant"] == f"capped-{tag}"
    assert up.attributes["server.port"] == int(sim.url.rsplit(":", 1)[1])


def test_tracing_setting_is_checked() -> None:
    from router.tracing import Tracing

    assert Tracing.from_settings("off", 1.0) is None
    with pytest.raises(ValueError, match="off or otlp"):
        Tracing.from_settings("jaeger", 1.0)
