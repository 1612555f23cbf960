"""The simulator speaks vLLM's API: OpenAI SDK and a plain SSE parser over real sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.sim.faults import Faults
from backends.sim.run import RunningSim, start_sim

MODEL = "Qwen/Qwen3-1.7B-FP8"


@pytest.fixture
async def sim() -> AsyncIterator[RunningSim]:
    s = await start_sim("qwen3-1.7b-fp8", time_scale=0.2)
    try:
        yield s
    finally:
        await s.close()


def sdk(sim: RunningSim) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0)


async def sse_events(client: httpx.AsyncClient, path: str, body: dict[str, object]) -> list[dict[str, object] | str]:
    out: list[dict[str, object] | str] = []
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        buf = ""
        async for text in r.aiter_text():
            buf += text
            while "\n\n" in buf:
                event, buf = buf.split("\n\n", 1)
                assert event.startswith("data: ")
                data = event[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_sdk_chat_non_streaming_with_cached_tokens(sim: RunningSim) -> None:
    client = sdk(sim)
    system = "You are a careful assistant. " * 300
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "hello"}]
    first = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8)  # type: ignore[arg-type]
    again = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8)  # type: ignore[arg-type]
    assert first.usage is not None and again.usage is not None
    assert first.usage.completion_tokens == 8 and first.choices[0].finish_reason == "length"
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > 1500
    assert first.usage.prompt_tokens_details is not None and again.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
    assert first.choices[0].message.content == again.choices[0].message.content  # seeded by prompt
    await client.close()


async def test_sdk_chat_streaming_with_usage(sim: RunningSim) -> None:
    client = sdk(sim)
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=5, stream=True, stream_options={"include_usage": True})
    text, usage, reasons = "", None, []
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert usage is not None and usage.completion_tokens == 5
    assert reasons == ["length"] and len(text) > 0
    await client.close()


async def test_sdk_completions_both_modes(sim: RunningSim) -> None:
    client = sdk(sim)
    r = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert r.usage is not None and r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 4
    parts = [c async for c in await client.completions.create(model=MODEL, prompt="Once", max_tokens=3,
                                                                 stream=True)]
    assert sum(1 for p in parts if p.choices and p.choices[0].text) == 3
    await client.close()


async def test_plain_sse_without_usage_has_no_usage_chunk(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as c:
        events = await sse_events(c, "/v1/chat/completions", {"model": MODEL, "max_tokens": 3, "stream": True,
                                                              "messages": [{"role": "user", "content": "x"}]})
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events if isinstance(e, dict))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 50_000}, 400, "max_tokens"),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "messages": "not a list"}, 400, "messages"),
    ],
)
async def test_error_shapes(sim: RunningSim, body: dict[str, object], status: int, param: str) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == status and err["param"] == param and err["message"]
    if status == 400 and param == "max_tokens" and body.get("max_tokens") == 50_000:
        assert "maximum context length is 40960 tokens" in err["message"]


async def test_bad_json_is_400(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as c:
        r = await c.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


async def test_metrics_parse_with_vllm_names(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as c:
        await c.post("/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 3})
        text = (await c.get("/metrics")).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens",
                 "vllm:generation_tokens", "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:request_success"):
        assert name in fams, name
    gen = [s for s in fams["vllm:generation_tokens"].samples if s.name.endswith("_total")]
    assert gen[0].value == 3 and gen[0].labels["model_name"] == MODEL
    ok = {s.labels["finished_reason"]: s.value for s in fams["vllm:request_success"].samples
          if s.name.endswith("_total")}
    assert ok["length"] == 1


async def test_tokenize_detokenize_models_health(sim: RunningSim) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as c:
        t = (await c.post("/tokenize", json={"model": MODEL, "prompt": "hello world"})).json()
        assert t["count"] == 2 and t["max_model_len"] == 40960
        d = (await c.post("/detokenize", json={"model": MODEL, "tokens": t["tokens"]})).json()
        assert d["prompt"] == "hello world"
        chat = (await c.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}))
        assert chat.json()["count"] > 2
        models = (await c.get("/v1/models")).json()
        assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 40960
        assert (await c.get("/health")).status_code == 200


async def test_fault_injection_shapes() -> None:
    s = await start_sim("qwen3-1.7b-fp8", time_scale=0.1, faults=Faults(rate_limit_rate=1.0, retry_after_s=7))
    try:
        async with httpx.AsyncClient(base_url=s.url) as c:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "7"
            await c.post("/admin/faults", json={"error_rate": 1.0, "error_status": 503})
            assert (await c.post("/v1/completions", json=body)).status_code == 503
            await c.post("/admin/faults", json={"cut_after_chunks": 2})
            with pytest.raises(httpx.RemoteProtocolError):
                await sse_events(c, "/v1/completions", {**body, "max_tokens": 20, "stream": True})
            await c.post("/admin/faults", json={"malformed": "json"})
            r = await c.post("/v1/completions", json=body)
            with pytest.raises(json.JSONDecodeError):
                r.json()
            bad = await c.post("/admin/faults", json={"error_rate": 3})
            assert bad.status_code == 400
    finally:
        await s.close()
