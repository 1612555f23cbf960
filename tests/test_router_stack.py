"""Against the `make run` stack (tiergate serve, embedded valkey, three simulated tiers) over sockets."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.conftest import DEMO_KEY, FAST_ONLY_KEY, Stack

SECRET = "zebra-violet-7781"  # appears in prompts; must never reach the logs


def words(n: int) -> str:
    return "hello" + " hello" * (n - 1)  # " hello" is one Qwen3 token


async def test_openai_sdk_chat_and_completions(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key=DEMO_KEY, max_retries=0)
    r = await client.chat.completions.create(model="auto", max_tokens=6,
                                             messages=[{"role": "user", "content": f"say hi {SECRET}"}])
    assert r.choices[0].message.content and r.usage is not None and r.usage.completion_tokens == 6
    raw = await client.chat.completions.with_raw_response.create(
        model="qwen3-4b", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-tiergate-tier"] == "balanced" and raw.headers["x-tiergate-instance"] == "balanced-sim-0"
    assert float(raw.headers["x-tiergate-overhead-ms"]) >= 0
    stream = await client.chat.completions.create(model="auto", max_tokens=5, stream=True,
                                                  messages=[{"role": "user", "content": f"stream {SECRET}"}])
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert len([p for p in pieces if p]) >= 1
    stream = await client.chat.completions.create(model="auto", max_tokens=4, stream=True,
                                                  stream_options={"include_usage": True},
                                                  messages=[{"role": "user", "content": "usage please"}])
    usages = [c.usage async for c in stream if c.usage]
    assert len(usages) == 1 and usages[0].completion_tokens == 4
    comp = await client.completions.create(model="qwen3-1.7b", prompt=f"Once {SECRET}", max_tokens=3)
    assert comp.usage is not None and comp.usage.completion_tokens == 3
    parts = [c async for c in await client.completions.create(model="qwen3-1.7b", prompt="Once", max_tokens=3,
                                                                 stream=True)]
    assert sum(1 for p in parts if p.choices and p.choices[0].text) == 3
    models = await client.models.list()
    assert {m.id for m in models.data if m.id == m.root} == {"auto", "qwen3-1.7b", "qwen3-4b", "qwen3-4b-long"}
    await client.close()


async def test_streaming_without_include_usage_strips_usage_chunk(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, headers={"authorization": f"Bearer {DEMO_KEY}"}) as c:
        async with c.stream("POST", "/v1/chat/completions", json={
                "model": "auto", "max_tokens": 3, "stream": True,
                "messages": [{"role": "user", "content": "x"}]}) as r:
            body = (await r.aread()).decode()
    events = [e[6:] for e in body.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert not any('"usage"' in e for e in events)


CHOICES = {
    # model: (short, 35K, 50K); None = 400 context_length_exceeded
    "auto": ("fast", "fast", "long"),
    "qwen3-1.7b": ("fast", "fast", None),
    "qwen3-4b": ("balanced", "long", "long"),
    "qwen3-4b-long": ("long", "long", "long"),
}


@pytest.mark.parametrize("model", sorted(CHOICES))
async def test_tier_choice_by_exact_prompt_tokens(stack: Stack, model: str) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=120,
                                 headers={"authorization": f"Bearer {DEMO_KEY}"}) as c:
        for size, expected in zip((5, 35_000, 50_000), CHOICES[model], strict=True):
            r = await c.post("/v1/chat/completions", json={
                "model": model, "max_tokens": 1, "messages": [{"role": "user", "content": words(size)}]})
            if expected is None:
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert err["code"] == "context_length_exceeded"
                assert re.search(r"\b5\d{4} prompt tokens|at least 4\d{4} prompt tokens", err["message"])
                assert "40960" in err["message"]   # "at least": tokenizing stopped once past it
            else:
                assert r.status_code == 200, r.text
                assert r.headers["x-tiergate-tier"] == expected, (size, r.headers["x-tiergate-tier"])
                assert r.json()["usage"]["prompt_tokens"] >= size


def _post(stack: Stack, body: object = None, key: str | None = DEMO_KEY, path: str = "/v1/chat/completions",
          raw: bytes | None = None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(stack.url + path, content=content, headers=headers, timeout=60)


OK_BODY = {"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "param"),
    [
        ({"key": FAST_ONLY_KEY, "body": {**OK_BODY, "model": "qwen3-4b"}}, 403, "model_not_allowed", "model"),
        ({"body": {**OK_BODY, "model": "gpt-9"}}, 404, "model_not_found", "model"),
        ({"raw": b'{"model": "auto", "messages": ['}, 400, "invalid_json", None),
        ({"raw": b"[1, 2]"}, 400, "invalid_json", None),
        ({"body": {**OK_BODY, "max_tokens": "ten"}}, 400, "invalid_value", "max_tokens"),
        ({"body": {**OK_BODY, "max_tokens": 0}}, 400, "invalid_value", "max_tokens"),
        ({"body": {**OK_BODY, "messages": [{"content": "no role"}]}}, 400, "invalid_value", "messages[0]"),
        ({"body": {"model": "auto"}}, 400, "missing_field", "messages"),
        ({"body": {"messages": []}}, 400, "missing_field", "model"),
        ({"body": {"model": "auto", "max_tokens": 2}, "path": "/v1/completions"}, 400, "missing_field", "prompt"),
        ({"body": {**OK_BODY, "stream": "yes"}}, 400, "invalid_value", "stream"),
        ({"raw": b'{"model":"auto","messages":[{"role":"user","content":"' + b"a" * (5 * 1024 * 1024) + b'"}]}'},
         413, "request_too_large", None),
    ],
)
def test_errors_are_openai_shaped(stack: Stack, kwargs: dict[str, object], status: int, code: str,
                                  param: str | None) -> None:
    body = kwargs.pop("body", OK_BODY)
    r = _post(stack, body, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param)
        assert param.split("[")[0] in err["message"]


def test_context_too_long_everywhere_is_400_naming_tokens(stack: Stack) -> None:
    r = _post(stack, {"model": "auto", "max_tokens": 10, "messages": [{"role": "user", "content": words(270_000)}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    count = re.search(r"\b(\d+) prompt tokens", err["message"])  # exact, or "at least" where tokenizing stopped
    assert "262144" in err["message"] and count is not None and int(count.group(1)) > 262144


def test_unknown_paths_and_ops_endpoints(stack: Stack) -> None:
    assert httpx.get(stack.url + "/nope").json()["error"]["message"] == "no such endpoint"
    assert httpx.get(stack.url + "/v1/chat/completions").status_code == 405
    assert httpx.get(stack.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(stack.url + "/ready").json()
    assert ready["ready"] is True and ready["redis"] is True
    assert httpx.get(stack.url + "/v1/models").status_code == 200   # the demo's anonymous tenant
    schema = httpx.get(stack.url + "/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    metrics = httpx.get(stack.url + "/metrics").text
    assert "tiergate_requests_total" in metrics and "tiergate_router_overhead_seconds_bucket" in metrics


def test_logs_have_canonical_lines_and_no_secrets(stack: Stack) -> None:
    r = _post(stack, {**OK_BODY, "messages": [{"role": "user", "content": f"remember {SECRET}"}]})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    text = stack.log_text()
    assert SECRET not in text and DEMO_KEY not in text and FAST_ONLY_KEY not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{") and rid in line]
    assert len(lines) == 1
    line = lines[0]
    assert line["event"] == "request" and line["tenant"] == "demo" and line["tier"] == "fast"
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 2 and line["cost_usd"] > 0
    assert line["decision"]["chosen"] == "fast/fast-sim-0"
