"""Bad fields get a 400 in OpenAI's error shape naming the field, from the router and from the simulator.

The router's checks (router/request_checks.py) run over a real socket in front of a simulator;
the simulator's own (backends/sim/validation.py, vLLM's rules) are hit directly, as a client of
a bare vLLM would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from backends.sim.run import start_sim
from policies.schema import load_policy
from router.errors import ApiError
from router.request_checks import MAX_DEPTH, check_nesting, check_request
from tests.conftest import DEMO_KEY, serve_router
from tests.test_policies import DEMO

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
FAST = "Qwen/Qwen3-1.7B-FP8"


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "qwen3-1.7b", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **kw}


def completion(**kw: Any) -> dict[str, Any]:
    return {"model": "qwen3-1.7b", "max_tokens": 4, "prompt": "hi", **kw}


ROUTER_CASES = [
    ("chat", chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    ("chat", chat(messages=[{"role": {}, "content": "hi"}]), "messages[0].role"),
    ("chat", chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    ("chat", chat(messages=[{"role": "user", "content": [{"text": "x"}]}]), "messages[0].content[0]"),
    ("chat", chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
     "messages[0].content[0].text"),
    ("chat", chat(messages=["hi"]), "messages[0]"),
    ("chat", chat(messages={"role": "user"}), "messages"),
    ("chat", chat(temperature=2.5), "temperature"),
    ("chat", chat(temperature="hot"), "temperature"),
    ("chat", chat(temperature=True), "temperature"),
    ("chat", chat(top_p=0), "top_p"),
    ("chat", chat(top_p=1.5), "top_p"),
    ("chat", chat(presence_penalty=-3), "presence_penalty"),
    ("chat", chat(seed=2**70), "seed"),
    ("chat", chat(top_k=-2), "top_k"),
    ("chat", chat(stop=[""]), "stop"),
    ("chat", chat(stop=5), "stop"),
    ("chat", chat(logit_bias={"x": 1}), "logit_bias"),
    ("chat", chat(tools=[{"type": "function"}]), "tools"),
    ("chat", chat(tool_choice=3), "tool_choice"),
    ("chat", chat(top_logprobs=99), "top_logprobs"),
    ("chat", chat(max_tokens="4"), "max_tokens"),
    ("chat", chat(stream="yes"), "stream"),
    ("completions", completion(prompt=[-1, 2]), "prompt"),
    ("completions", completion(prompt=[1.5]), "prompt"),
    ("completions", completion(prompt={"text": "hi"}), "prompt"),
    ("completions", completion(temperature=-0.1), "temperature"),
    ("completions", completion(logprobs=True), "logprobs"),
]


@pytest.fixture
async def router() -> AsyncIterator[httpx.AsyncClient]:
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.05, served_model_name=FAST)
    try:
        async with serve_router(load_policy(DEMO), {"fast": [("x", sim.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
            yield c
    finally:
        await sim.close()


async def test_router_answers_bad_fields_with_a_400_naming_them(router: httpx.AsyncClient) -> None:
    for kind, body, param in ROUTER_CASES:
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        r = await router.post(path, json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param, (body, err)
        assert param.split("[")[0].split(".")[0] in err["message"], err


async def test_router_refuses_deep_nesting_and_passes_unknown_fields(router: httpx.AsyncClient) -> None:
    deep = b'{"model":"qwen3-1.7b","messages":[],"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    r = await router.post("/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert f"deeper than {MAX_DEPTH}" in r.json()["error"]["message"]
    extra = chat(tiergate_test_extra={"nested": [1, {"a": "b"}]}, mirostat=3)   # fields no check knows
    r = await router.post("/v1/chat/completions", json=extra)
    assert r.status_code == 200, r.text
    fine = chat(temperature=0, top_p=1, stop=["\n"], seed=-(2**63), tool_choice="none",
                messages=[{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                          {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                          {"role": "tool", "content": "42", "tool_call_id": "c1"}])
    r = await router.post("/v1/chat/completions", json=fine)
    assert r.status_code == 200, r.text


def test_nesting_bound_counts_brackets_outside_strings_only() -> None:
    check_nesting(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    check_nesting(b'{"a":"' + b"[" * 10_000 + b'"}')                 # brackets inside a string
    check_nesting(b'{"a":"\\"' + b"{" * 500 + b'"}')                 # an escaped quote does not end it
    with pytest.raises(ApiError) as exc:
        check_nesting(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    assert exc.value.status == 400
    check_request({"messages": "not checked here"}, "completions")   # each kind checks its own fields


SIM_CASES = [
    ("/v1/chat/completions", {"temperature": 3}, "temperature"),
    ("/v1/chat/completions", {"top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"frequency_penalty": "a"}, "frequency_penalty"),
    ("/v1/chat/completions", {"stop": [""]}, "stop"),
    ("/v1/chat/completions", {"n": "1"}, "n"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages.0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
    ("/v1/chat/completions", {"tools": ["f"]}, "tools"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"seed": 2**64}, "seed"),
]


async def test_simulator_answers_invalid_input_with_a_400_like_vllm() -> None:
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    try:
        async with httpx.AsyncClient(base_url=sim.url, timeout=30) as c:
            for path, fields, param in SIM_CASES:
                base = {"model": sim.server.model, "max_tokens": 4}
                base |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
                r = await c.post(path, json=base | fields)
                assert r.status_code == 400, (fields, r.text)
                err = r.json()["error"]
                assert err["type"] == "BadRequestError" and err["code"] == 400 and err["param"] == param, err
            deep = b'{"prompt":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
            r = await c.post("/v1/completions", content=deep)
            assert r.status_code == 400
            # An explicit null max_completion_tokens leaves max_tokens in force (vLLM reads them so).
            r = await c.post("/v1/completions", json={"model": sim.server.model, "prompt": "hi", "max_tokens": 3,
                                                      "max_completion_tokens": None, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        await sim.close()
