"""Clients written for a bare vLLM work unchanged, and no request can spend past its tenant's budget.

The client patterns run against the `make run` stack (demo policy: anonymous tenant on), exactly as
their authors write them against vLLM: `api_key="EMPTY"`, vLLM's model names, no max_tokens.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from structlog.testing import capture_logs

from backends.sim.run import start_sim
from policies.schema import parse_policy
from tests.conftest import Stack, serve_router
from tests.test_accounting import MSGS, ledger, policy_text, wait_for, worst_case_units

VLLM_NAMES = ["Qwen/Qwen3-4B-Instruct-2507", "qwen3-4b-instruct-2507", "Qwen/Qwen3-1.7B-FP8", "Qwen3-1.7B"]


async def test_chainlit_style_async_stream_with_empty_key(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="EMPTY", max_retries=0)
    for model in VLLM_NAMES:
        stream = await client.chat.completions.create(model=model, stream=True, temperature=0,
                                                      messages=[{"role": "user", "content": "Tell me a story"}])
        text = ""
        async for part in stream:                       # Chainlit indexes choices[0] on every chunk
            if token := part.choices[0].delta.content or "":
                text += token
        assert text, model
    await client.close()


def test_openai_sdk_sync_stream_and_reply_with_vllm_names(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="EMPTY", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="Qwen/Qwen3-4B-Instruct-2507", messages=[{"role": "user", "content": "hi"}])
    reply = raw.parse()
    assert raw.headers["x-tiergate-tier"] in ("balanced", "long")
    assert reply.choices[0].message.content and reply.usage is not None
    # no max_tokens: the anonymous tenant's completion budget (2048) was reserved and forwarded
    assert reply.usage.completion_tokens <= 2048
    assert int(raw.headers["x-ratelimit-limit-requests"]) == 1200
    assert 0 <= int(raw.headers["x-ratelimit-remaining-requests"]) < 1200
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="QWEN3-1.7B", stream=True, messages=[{"role": "user", "content": "stream"}]) if c.choices]
    assert "".join(pieces)
    ids = {m.id.lower() for m in client.models.list().data}    # names match case-insensitively
    assert {n.lower() for n in VLLM_NAMES} <= ids and {"auto", "qwen3-4b"} <= ids
    client.close()


def test_langchain_chat_openai_unchanged(stack: Stack) -> None:
    llm = ChatOpenAI(model="Qwen3-1.7B", base_url=stack.url + "/v1", api_key="EMPTY", max_retries=0)
    answer = llm.invoke("Say hello")
    assert isinstance(answer.content, str) and answer.content
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream("Count to three"))
    assert "".join(str(c.content) for c in chunks)


async def test_aiohttp_benchmark_loop(stack: Stack) -> None:
    """The shape of vLLM's benchmark client: completions, streamed, usage asked for, ignore_eos."""
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            payload = {"model": "Qwen/Qwen3-1.7B-FP8", "prompt": "Once upon a time", "max_tokens": 12,
                       "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            async with session.post(stack.url + "/v1/completions", json=payload,
                                    headers={"Authorization": "Bearer EMPTY"}) as resp:
                assert resp.status == 200
                text, usage, done = "", None, False
                async for raw in resp.content:
                    chunk = raw.strip().decode()
                    if not chunk:
                        continue
                    chunk = chunk.removeprefix("data: ")
                    if chunk == "[DONE]":
                        done = True
                        continue
                    data = json.loads(chunk)
                    if data["choices"]:
                        text += data["choices"][0]["text"]
                    if data.get("usage"):
                        usage = data["usage"]
            assert done and text and usage is not None and usage["completion_tokens"] == 12


def test_unknown_model_and_error_dialect(stack: Stack) -> None:
    r = httpx.post(stack.url + "/v1/chat/completions", json={"model": "gpt-9", "messages": MSGS})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "model_not_found" and err["param"] == "model"
    assert "qwen3-4b" in err["message"]


async def test_without_anonymous_a_401_says_how_to_get_a_key_and_logs_no_tenant(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    pol = parse_policy(policy_text(tag, [], {"free": ""}), "t.yaml")
    async with serve_router(pol, redis_url=redis_url) as base, httpx.AsyncClient(base_url=base) as c:
        for headers in ({}, {"authorization": "Bearer EMPTY"}):
            r = await c.post("/v1/chat/completions", headers=headers, json={"model": "chat", "messages": MSGS})
            assert r.status_code == 401
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key"
            assert "tiergate keys new" in err["message"] and "anonymous" in err["message"]
            assert r.headers["x-should-retry"] == "false"
        r = await c.get("/v1/models", headers={"authorization": "Bearer EMPTY"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


async def test_anonymous_tenant_gets_model_ids_and_aliases(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    pol = parse_policy(policy_text(tag, [sim.url], {"free": ", allowed_tiers: [fast], allowed_models: [chat]"},
                                   extra="anonymous: {tenant: free-" + tag + "}"), "t.yaml")
    try:
        async with serve_router(pol, redis_url=redis_url) as base, httpx.AsyncClient(base_url=base) as c:
            r = await c.post("/v1/chat/completions", json={"model": "QWEN/qwen3-1.7b-fp8", "max_tokens": 3,
                                                           "messages": MSGS})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            models = (await c.get("/v1/models")).json()["data"]
            assert {m["id"] for m in models} == {"chat", "Qwen/Qwen3-1.7B-FP8", "Qwen3-1.7B-FP8"}
            assert all(m["root"] == "chat" and m["object"] == "model" for m in models)

            async def billed_to_anonymous() -> bool:
                return bool((await ledger(c, base, f"free-{tag}"))["requests"] == 1)
            await wait_for(billed_to_anonymous)
    finally:
        await sim.close()


async def test_rejected_requests_with_a_valid_key_log_their_tenant(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    pol = parse_policy(policy_text(tag, [], {"free": ", allowed_models: [chat]", "capped": ""}).replace(
        "  chat: {tiers: [fast], profile: p}", "  chat: {tiers: [fast], profile: p}\n  other: {tiers: [fast], "
        "profile: p}"), "t.yaml")
    async with serve_router(pol, redis_url=redis_url) as base, httpx.AsyncClient(base_url=base) as c:
        with capture_logs() as logs:
            r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer sk-free-{tag}"},
                             json={"model": "other", "messages": MSGS})
            assert r.status_code == 403 and r.json()["error"]["type"] == "invalid_request_error"
            assert r.headers["x-should-retry"] == "false"
            r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer sk-capped-{tag}"},
                             json={"model": "chat", "messages": MSGS, "max_tokens": 0})
            assert r.status_code == 400
    lines = [e for e in logs if e["event"] == "request"]
    assert [(e["tenant"], e["status"]) for e in lines] == [(f"free-{tag}", 403), (f"capped-{tag}", 400)]


@pytest.mark.parametrize("with_max_tokens", [True, False])
async def test_no_budget_overshoot_64_concurrent_through_2_replicas(redis_url: str, with_max_tokens: bool) -> None:
    """A budget for 5.5 worst cases; 64 concurrent requests that would each generate to the end of the
    context (ignore_eos). With max_tokens, exactly 5 fit. Without it the tenant's completion budget
    (64) is reserved and forwarded as max_tokens, and the last half worst case still buys a shorter
    answer. The bill never passes the budget."""
    tag = uuid.uuid4().hex[:6]
    k, budget_tokens = 5, 64
    worst = worst_case_units(budget_tokens)
    daily = (k * worst + worst // 2) / 1e10
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    pol = parse_policy(policy_text(tag, [sim.url], {
        "capped": f", budgets: {{daily_usd: {daily!r}}}, completion_tokens: {budget_tokens}"}), "t.yaml")
    auth = {"authorization": f"Bearer sk-capped-{tag}"}
    body: dict[str, object] = {"model": "chat", "messages": MSGS, "ignore_eos": True}
    if with_max_tokens:
        body["max_tokens"] = budget_tokens
    try:
        # 64 requests, two routers, the simulator and the client share one event loop here: Redis timeouts
        # long enough that a busy loop is not mistaken for a Redis outage (that path has its own tests)
        patient = {"redis_url": redis_url, "redis_timeout_s": 1.0, "accounting_timeout_s": 2.0}
        async with serve_router(pol, **patient) as a, serve_router(pol, **patient) as b, \
                httpx.AsyncClient(timeout=60) as c:
            rs = await asyncio.gather(*(c.post((a, b)[i % 2] + "/v1/chat/completions", headers=auth, json=body)
                                        for i in range(64)))
            ok = [r.json() for r in rs if r.status_code == 200]
            assert {r.status_code for r in rs} == {200, 429}
            refused = next(r for r in rs if r.status_code == 429)
            assert refused.json()["error"]["code"] == "insufficient_quota"
            assert refused.json()["error"]["type"] == "insufficient_quota"
            assert refused.headers["x-should-retry"] == "false"
            lengths = sorted(o["usage"]["completion_tokens"] for o in ok)
            assert all(o["choices"][0]["finish_reason"] == "length" for o in ok)
            if with_max_tokens:
                assert lengths == [budget_tokens] * k
            else:   # five full budgets, then one shrunk to what the last half worst case pays for
                assert len(lengths) == k + 1 and lengths[1:] == [budget_tokens] * k
                assert 16 <= lengths[0] < budget_tokens

            async def settled() -> bool:
                return bool((await ledger(c, a, f"capped-{tag}"))["requests"] == len(ok))
            await wait_for(settled)
            tot = await ledger(c, a, f"capped-{tag}")
            assert tot["completion_tokens"] == sum(lengths)
            assert tot["cost_usd"] <= daily                       # overshoot <= 0
    finally:
        await sim.close()


async def test_stream_without_max_tokens_stops_at_the_forwarded_cap_with_length(redis_url: str) -> None:
    """A stream with no max_tokens that would run to the end of the context (ignore_eos) stops at the
    tenant's completion budget, which the router forwarded: its last choice says finish_reason "length",
    its usage chunk counts exactly the cap, and the ledger bills exactly that."""
    tag = uuid.uuid4().hex[:6]
    cap = 48
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    tenants = {"capped": f", budgets: {{daily_usd: 5.0}}, completion_tokens: {cap}"}
    pol = parse_policy(policy_text(tag, [sim.url], tenants), "t.yaml")
    try:
        async with serve_router(pol, redis_url=redis_url) as base, httpx.AsyncClient(timeout=60) as c, \
                openai.AsyncOpenAI(base_url=base + "/v1", api_key=f"sk-capped-{tag}", max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="chat", messages=MSGS, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})
            finish, usage, text = None, None, ""
            async for part in stream:
                if part.choices:
                    text += part.choices[0].delta.content or ""
                    finish = part.choices[0].finish_reason or finish
                if part.usage is not None:
                    usage = part.usage
            assert text and finish == "length"
            assert usage is not None and usage.completion_tokens == cap

            async def settled() -> bool:
                return bool((await ledger(c, base, f"capped-{tag}"))["requests"] == 1)
            await wait_for(settled)
            assert (await ledger(c, base, f"capped-{tag}"))["completion_tokens"] == cap
    finally:
        await sim.close()


async def test_rate_limit_headers_and_429_dialect(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    pol = parse_policy(policy_text(tag, [sim.url], {"capped": ", limits: {rpm: 3, tpm: 100000}"}), "t.yaml")
    try:
        async with serve_router(pol, redis_url=redis_url) as base, httpx.AsyncClient(base_url=base) as c:
            auth = {"authorization": f"Bearer sk-capped-{tag}"}
            remaining = []
            for _ in range(3):
                r = await c.post("/v1/chat/completions", headers=auth,
                                 json={"model": "chat", "max_tokens": 4, "messages": MSGS})
                assert r.status_code == 200
                assert r.headers["x-ratelimit-limit-requests"] == "3"
                assert r.headers["x-ratelimit-limit-tokens"] == "100000"
                remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
                assert int(r.headers["x-ratelimit-remaining-tokens"]) < 100000
                assert r.headers["x-ratelimit-reset-requests"].endswith("s")
            assert remaining == [2, 1, 0]
            r = await c.post("/v1/chat/completions", headers=auth,
                             json={"model": "chat", "max_tokens": 4, "messages": MSGS})
            assert r.status_code == 429
            err = r.json()["error"]
            assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
            assert r.headers["x-ratelimit-remaining-requests"] == "0" and "retry-after" in r.headers
            assert "x-should-retry" not in r.headers        # a rate limit passes: the SDK may retry
    finally:
        await sim.close()


def test_anonymous_must_name_a_declared_tenant() -> None:
    with pytest.raises(ValueError, match=r"anonymous\.tenant.*unknown tenant 'ghost'"):
        parse_policy(policy_text("x", [], {"free": ""}, extra="anonymous: {tenant: ghost}"), "t.yaml")


def test_alias_clashes_are_refused_naming_both() -> None:
    text = policy_text("x", [], {"free": ""}).replace(
        "  chat: {tiers: [fast], profile: p}",
        "  chat: {tiers: [fast], profile: p}\n  Other: {tiers: [fast], profile: p, aliases: [CHAT]}")
    with pytest.raises(ValueError, match=r"aliases\[0\].*'CHAT' is already route 'chat'"):
        parse_policy(text, "t.yaml")
