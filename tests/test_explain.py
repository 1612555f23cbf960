"""Explain, dry-run, shadow and decision records (router/explain.py, router/shadow.py,
router/decision_records.py, router/decision_routes.py), against simulators and Redis over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from structlog.testing import capture_logs

from backends.registry import Registry
from backends.sim.run import start_sim
from backends.tokenization import TokenizerCache
from backends.valkey import EmbeddedValkey, free_port
from policies.schema import InstanceSpec, parse_policy
from policies.types import Candidate, RoutingDecision
from router.explain import HEADER_LIMIT, decision_doc, header_value
from router.lifecycle.core import Lifecycle, chosen
from router.lifecycle.records import MemoryRecordSink
from router.live_policy import build_view
from router.metrics import RouterMetrics
from router.relay import Outcome
from router.schemas import Usage
from router.shadow import Shadow
from tests.conftest import DEMO_KEY, FAST_ONLY_KEY, serve_router
from tests.test_policies import DEMO_TEXT

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
ADMIN = {"authorization": "Bearer sk-tiergate-admin"}
EXPLAIN = {"x-tiergate-explain": "1"}
SYSTEM = "You are a careful assistant. " * 40      # a shared prefix of a few hundred tokens
# the demo, with each tier's prefill rate seeded, so TTFT is predicted from the first request on
TEXT = DEMO_TEXT.replace("    block_size: 16\n", "    block_size: 16\n    prefill_tokens_per_s: 40000\n")


def chat(content: str = "hello there", **kw: object) -> dict[str, Any]:
    return {"model": "auto", "max_tokens": 8, "messages": [{"role": "system", "content": SYSTEM},
                                                          {"role": "user", "content": content}], **kw}


@contextlib.asynccontextmanager
async def cluster() -> AsyncIterator[dict[str, list[tuple[str, str]]]]:
    """One simulator per demo tier, and a second balanced instance that is down (the `healthy` filter
    removes it). Instance ids are unique per use, so affinity keys in the shared Redis db never collide."""
    tag = uuid.uuid4().hex[:6]
    sims = [await start_sim(p, time_scale=0.05) for p in ("qwen3-1.7b-fp8", "qwen3-4b-mixed", "qwen3-4b-256k")]
    try:
        yield {"fast": [(f"f-{tag}", sims[0].url)],
               "balanced": [(f"b-{tag}", sims[1].url), (f"bdown-{tag}", f"http://127.0.0.1:{free_port()}")],
               "long": [(f"l-{tag}", sims[2].url)]}
    finally:
        for s in sims:
            await s.close()


def same_decision(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Everything the decision is made of, request id and the served candidate aside."""
    skip = {"request_id", "served"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- dry-run -------------------------------------------------------------------------------------
async def test_dry_run_returns_the_decision_the_live_path_takes(redis_url: str) -> None:
    async with cluster() as urls, serve_router(parse_policy(TEXT), urls, redis_url=redis_url) as url, \
            httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
        served = None
        for turn in range(3):
            body = chat(f"question {turn}")
            if served is not None:   # the last turn's prefix: its affinity record lands off the request path
                plan = (await c.post("/v1/route", json=body)).json()
                for _ in range(200):
                    if next(x for x in plan["candidates"] if x["key"] == served)["inputs"]["cached_tokens"]:
                        break
                    plan = (await c.post("/v1/route", json=body)).json()
            dry = await c.post("/v1/route", json=body)
            assert dry.status_code == 200, dry.text
            plan = dry.json()
            again = (await c.post("/v1/route", json=body)).json()
            same_decision(plan, again)             # a dry-run changes nothing: no admission, no load
            live = await c.post("/v1/chat/completions", json=body, headers=EXPLAIN)
            assert live.status_code == 200, live.text
            took = json.loads(live.headers["x-tiergate-explain"])
            same_decision(plan, took)
            served = took["served"]
            assert served == plan["chosen"] == "/".join(live.headers[h] for h in ("x-tiergate-tier",
                                                                                  "x-tiergate-instance"))
            by_status = {c["status"] for c in plan["candidates"]}
            assert by_status == {"chosen", "ranked", "rejected"}
            rejected = [c for c in plan["candidates"] if c["status"] == "rejected"]
            assert [(c["instance"][:5], c["rejected_by"]) for c in rejected] == [("bdown", "healthy")]
            for cand in plan["candidates"]:
                if cand["status"] != "rejected":
                    est = cand["est"]
                    assert est["usd"] == pytest.approx(est["usd_tokens"] + est["usd_gpu"] + est["usd_miss"])
                    assert 0 <= est["p_miss"] <= 1 and est["ttft_ms"] > 0 and "expected_money" in cand["scores"]
            assert plan["ranking"][0] == plan["chosen"] and len(plan["ranking"]) == 3
            assert plan["slo"]["class"] == "interactive" and plan["prompt_tokens"]["fast"] > 200
            cached = next(x for x in plan["candidates"] if x["key"] == served)["inputs"]["cached_tokens"]
            assert (cached > 0) == (turn > 0)      # from the second turn on, both saw the shared prefix cached


async def test_dry_run_who_and_bad_input() -> None:
    async with cluster() as urls, serve_router(parse_policy(TEXT), urls) as url, \
            httpx.AsyncClient(base_url=url, timeout=60) as c:
        # completions, inferred from `prompt`; the admin key as a named tenant
        r = await c.post("/v1/route", json={"model": "qwen3-1.7b", "prompt": "hi", "max_tokens": 4},
                         headers={**ADMIN, "x-tiergate-tenant": "fast-only"})
        assert r.status_code == 200, r.text
        assert r.json()["tenant"] == "fast-only" and r.json()["chosen"].startswith("fast/")
        assert r.json()["slo"]["class"] == "relaxed"          # the tenant's default class, as live
        r = await c.post("/v1/route", json=chat())
        assert r.status_code == 200 and r.json()["tenant"] == "local"   # no key: the anonymous tenant, as live
        errors = [
            (ADMIN, chat(), 400, "x-tiergate-tenant"),                                   # admin is no tenant
            ({**ADMIN, "x-tiergate-tenant": "nobody"}, chat(), 404, "x-tiergate-tenant"),
            ({"authorization": f"Bearer {FAST_ONLY_KEY}", "x-tiergate-tenant": "demo"}, chat(), 403,
             "x-tiergate-tenant"),
            (AUTH, {"model": "auto"}, 400, "messages"),
            (AUTH, {**chat(), "prompt": "x"}, 400, "kind"),
            (AUTH, chat(model="nope"), 404, "model"),
            (AUTH, chat(temperature=9), 400, "temperature"),
            (AUTH, chat(max_tokens=0), 400, "max_tokens"),
        ]
        for headers, body, status, param in errors:
            r = await c.post("/v1/route", json=body, headers=headers)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"
        r = await c.post("/v1/route?kind=sideways", json=chat(), headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "kind"
        r = await c.post("/v1/route", content=b"{not json", headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        # a valid request no candidate can serve: 200, the refusal the live path would answer
        huge = chat(max_tokens=300_000)
        r = await c.post("/v1/route", json=huge, headers=AUTH)
        assert r.status_code == 200 and r.json()["chosen"] is None
        live = await c.post("/v1/chat/completions", json=huge, headers=AUTH)
        assert r.json()["error"]["status"] == live.status_code == 400
        assert r.json()["error"]["code"] == live.json()["error"]["code"] == "context_length_exceeded"
        assert {c["rejected_by"] for c in r.json()["candidates"]} <= {"context_fits", "healthy"}


# --- explain ---------------------------------------------------------------------------------------
async def test_explain_chunk_in_streams_parsed_by_the_openai_sdk() -> None:
    async with cluster() as urls, serve_router(parse_policy(TEXT), urls) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=DEMO_KEY, max_retries=0)
        try:
            for usage in (False, True):
                stream = await client.chat.completions.create(
                    model="auto", stream=True, max_tokens=12, messages=[{"role": "user", "content": "count"}],
                    extra_headers=EXPLAIN, **({"stream_options": {"include_usage": True}} if usage else {}))
                text, explains, ids, usage_seen = "", [], set(), False
                async for chunk in stream:
                    ids.add(chunk.id)
                    extra = chunk.model_extra or {}
                    if "tiergate_explain" in extra:
                        assert chunk.choices == [] and chunk.object == "chat.completion.chunk"
                        explains.append(extra["tiergate_explain"])
                    elif chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                    usage_seen |= chunk.usage is not None
                assert text and len(explains) == 1 and len(ids) == 1 and usage_seen == usage
                doc = explains[0]
                assert doc["object"] == "tiergate.decision" and doc["chosen"] == doc["served"] == doc["ranking"][0]
            # without the header: no extra chunk; completions streams carry it too
            plain = await client.chat.completions.create(model="auto", stream=True, max_tokens=4,
                                                         messages=[{"role": "user", "content": "count"}])
            assert all("tiergate_explain" not in (ch.model_extra or {}) for ch in [x async for x in plain])
            comp = await client.completions.create(model="qwen3-1.7b", prompt="once", max_tokens=6, stream=True,
                                                   extra_headers=EXPLAIN)
            got = [ch async for ch in comp]
            assert "tiergate_explain" in (got[-1].model_extra or {}) and got[-1].object == "text_completion"
            assert "".join(ch.choices[0].text for ch in got if ch.choices)
        finally:
            await client.close()


async def test_a_client_leaving_an_explained_stream_aborts_it_and_bills_it_once() -> None:
    """The explain wrapper hands a client's departure on to the relay (abort upstream, bill what was sent)."""
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=1.0)
    try:
        async with serve_router(parse_policy(TEXT), {"fast": [("x", sim.url)]}) as url:
            with capture_logs() as logs:
                async with httpx.AsyncClient(base_url=url, headers={**AUTH, **EXPLAIN}) as c, \
                        c.stream("POST", "/v1/chat/completions",
                                 json=chat(model="qwen3-1.7b", max_tokens=5000, stream=True, ignore_eos=True)) as r:
                    got = 0
                    async for _ in r.aiter_raw():
                        got += 1
                        if got >= 3:
                            break
                for _ in range(500):
                    if sim.server.engine.stats.success["abort"] == 1 and any(e.get("event") == "request"
                                                                             for e in logs):
                        break
                    await asyncio.sleep(0.02)             # the abort and the close-out run on the loop
            assert sim.server.engine.stats.success["abort"] == 1
            lines = [e for e in logs if e.get("event") == "request"]
            assert len(lines) == 1 and lines[0]["error"] == "client disconnected"
            assert 0 < lines[0]["completion_tokens"] < 5000 and lines[0]["cost_usd"] > 0
    finally:
        await sim.close()


def wide_decision(n: int) -> tuple[RoutingDecision, list[Candidate], Any]:
    from tests.test_money import MONEY, cand, req
    cands = [cand(("fast", "balanced", "long")[i % 3], str(i), running=i % 7) for i in range(n)]
    return MONEY.decide(req(), cands), cands, req()


def test_explain_header_is_bounded_and_says_what_it_left_out() -> None:
    decision, cands, rreq = wide_decision(300)
    doc = decision_doc(decision, cands, rreq, profile="money", max_candidates=300)
    assert len(doc["candidates"]) == 300 and "truncated" not in doc
    value = header_value(doc)
    assert len(value) <= HEADER_LIMIT and value.isascii()
    small = json.loads(value)
    kept = len(small["candidates"])
    assert 0 < kept < 300 and small["truncated"]["candidates_omitted"] == 300 - kept
    assert [c["key"] for c in small["candidates"]] == small["ranking"][:kept]   # the best ones stay
    capped = decision_doc(decision, cands, rreq, max_candidates=5)
    assert len(capped["candidates"]) == 5 and capped["truncated"]["candidates_omitted"] == 295
    assert len(header_value(capped)) < HEADER_LIMIT


# --- shadow ----------------------------------------------------------------------------------------
SHADOW_LONG = TEXT.replace("    tiers: [fast, balanced, long]\n    profile: money",
                                "    tiers: [long]\n    profile: money")


async def test_shadow_never_changes_serving_and_reports_the_difference(tmp_path: Path) -> None:
    assert SHADOW_LONG != DEMO_TEXT
    shadow = tmp_path / "shadow.yaml"
    shadow.write_text(SHADOW_LONG)            # the shadow sends `auto` to the dearest tier only
    bodies = [chat(f"q{i}", temperature=0) for i in range(4)]
    served: dict[bool, list[tuple[str, str, str]]] = {}
    async with cluster() as urls:
        for with_shadow in (False, True):
            extra = {"shadow_policy_path": str(shadow)} if with_shadow else {}
            async with serve_router(parse_policy(TEXT), urls, **extra) as url, \
                    httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
                with capture_logs() as logs:
                    got = []
                    for b in bodies:
                        r = await c.post("/v1/chat/completions", json=b)
                        assert r.status_code == 200, r.text
                        got.append((r.headers["x-tiergate-tier"], r.headers["x-tiergate-instance"],
                                    r.json()["choices"][0]["message"]["content"]))
                    served[with_shadow] = got
                    prom = (await c.get("/metrics")).text
                lines = [e for e in logs if e.get("event") == "request"]
                assert len(lines) == len(bodies)
                for e in lines:
                    assert e["est_cost_usd"] > 0 and e["pred_ttft_ms"] > 0
                    assert e["pred_tpot_ms"] is None and e["tpot_ms"] is None   # nothing streamed: no TPOT
                    assert e["cost_usd"] > 0 and e["ttft_ms"] > 0
                    if with_shadow:
                        assert e["shadow_chosen"].startswith("long/") and e["tier"] != "long"
                        assert e["shadow_cost_delta_usd"] > 0     # long costs more than what served
                    else:
                        assert "shadow_chosen" not in e
        assert metric(prom, "tiergate_shadow_decisions_total", agree="false") == len(bodies)
        assert metric(prom, "tiergate_shadow_decisions_total", agree="true") == 0
        delta = metric(prom, "tiergate_shadow_cost_delta_usd")
        assert delta > 0 and delta == pytest.approx(
            metric(prom, "tiergate_shadow_estimated_cost_usd_total", policy="shadow")
            - metric(prom, "tiergate_shadow_estimated_cost_usd_total", policy="live"))
    assert served[True] == served[False]       # same tiers, instances and answers with the shadow on


def core_request(policy_text: str = TEXT) -> tuple[Lifecycle, Any, Any, Registry]:
    """A request through the core's start, gather and decide, in process (no sockets: nothing is sent)."""
    pol = parse_policy(policy_text)
    specs = {t: [InstanceSpec(id=f"{t[0]}0", url=f"http://127.0.0.1:{9 + i}")] for i, t in enumerate(pol.tiers)}
    registry = Registry(pol, specs)
    view = build_view(pol, registry, TokenizerCache(), ThreadPoolExecutor(1), None)
    return Lifecycle(registry, records=MemoryRecordSink(8)), view, pol, registry


async def test_shadow_failures_are_counted_and_isolated(tmp_path: Path) -> None:
    core, view, _, _ = core_request()
    p = core.start(view, "r1", "demo", "auto", ("fast", "balanced", "long"), None,
                   {"fast": 500, "balanced": 500, "long": 500}, 64, ("interactive", 1.0, 0.05), 0.0)
    await core.gather(p, {})
    live = core.decide(p)
    metrics = RouterMetrics()
    path = tmp_path / "shadow.yaml"
    path.write_text("version: 1\ntiers: {oops")
    shadow = Shadow(path, metrics, ThreadPoolExecutor(1), interval_s=3600)
    with capture_logs() as logs:
        shadow.load_now()                       # invalid at start: off, counted, logged
        shadow.observe(p, live)
        assert shadow.policy is None and "shadow_chosen" not in p.notes
        path.write_text(SHADOW_LONG)
        assert await shadow.check() == "reloaded"   # hot reload (parsed in a child process)
        shadow.observe(p, live)
        assert p.notes["shadow_chosen"] == "long/l0"

        class Boom:
            def decide(self, *_: object) -> RoutingDecision:
                raise RuntimeError("a plugin bug")

        shadow.profiles = {**shadow.profiles, "money": Boom()}  # type: ignore[dict-item]
        shadow.observe(p, live)                 # raises nothing
        assert p.decision is live and live.chosen is not None and live.chosen.tier == "fast"
        path.write_text("version: 1\n")
        assert await shadow.check() == "invalid" and shadow.policy is not None   # the last good one stays
    prom = metrics.render().decode()
    assert metric(prom, "tiergate_shadow_failures_total", reason="policy_invalid") == 2
    assert metric(prom, "tiergate_shadow_failures_total", reason="error") == 1
    events = [e["event"] for e in logs]
    assert events.count("shadow_policy_rejected") == 2 and events.count("shadow_failed") == 1
    failed = next(e for e in logs if e["event"] == "shadow_failed")
    assert failed["error"] == "RuntimeError" and "a plugin bug" not in json.dumps(failed)


# --- decision records ------------------------------------------------------------------------------
async def test_core_writes_decision_records_through_its_sink() -> None:
    """The replay driver passes an in-memory sink; the live one a Redis stream: the core writes either."""
    core, view, _, registry = core_request()
    p = core.start(view, "rec-1", "demo", "auto", ("fast", "balanced", "long"), None,
                   {"fast": 500, "balanced": 500, "long": 500}, 64, ("interactive", 1.0, 0.05), 10.0)
    await core.gather(p, {})
    decision = core.decide(p)
    await core.admit(p, 64)
    assert decision.chosen is not None
    out = Outcome()
    chosen(out, decision.chosen, 200, 10.2)
    out.first_token_at = 10.25
    out.usage = Usage(prompt_tokens=500, completion_tokens=41)
    core.clock = lambda: 10.65
    core.close_out(p, out)
    sink = core.records
    assert isinstance(sink, MemoryRecordSink) and len(sink) == 1
    rec = sink.lookup("rec-1")
    assert rec is not None and rec.decision is decision and rec.tier == decision.chosen.tier
    est = decision.estimates[decision.chosen.key]
    assert rec.est_cost_usd == est["usd"] and rec.pred_ttft_ms == pytest.approx(est["ttft_s"] * 1000)
    assert rec.ttft_ms == pytest.approx(250.0) and rec.tpot_ms == pytest.approx(400 / 40)
    assert rec.cost_usd > 0 and rec.completion_tokens == 41 and sink.lookup("other") is None
    assert registry.find(rec.tier, rec.instance or "") is not None


async def lookup(c: httpx.AsyncClient, rid: str) -> httpx.Response:
    """The record is written off the request path: ask until it is there (bounded)."""
    r = await c.get(f"/admin/decisions/{rid}", headers=ADMIN)
    for _ in range(200):
        if r.status_code != 404:
            return r
        await c.get("/health")                  # a round trip, then ask again
        r = await c.get(f"/admin/decisions/{rid}", headers=ADMIN)
    return r


async def test_decision_records_by_request_id_admin_only(redis_url: str) -> None:
    rid = "rec-" + uuid.uuid4().hex
    async with cluster() as urls, serve_router(parse_policy(TEXT), urls, redis_url=redis_url) as url, \
            httpx.AsyncClient(base_url=url, timeout=60) as c:
        warm = await c.post("/v1/chat/completions", json=chat("warm up", stream=True), headers=AUTH)
        assert warm.status_code == 200           # a streamed answer teaches the tier its TPOT
        r = await c.post("/v1/chat/completions", json=chat(stream=True), headers={**AUTH, "x-request-id": rid})
        assert r.status_code == 200
        got = await lookup(c, rid)
        assert got.status_code == 200, got.text
        rec = got.json()
        assert rec["object"] == "tiergate.decision_record" and rec["request_id"] == rid and rec["tenant"] == "demo"
        assert rec["tier"] == r.headers["x-tiergate-tier"] and rec["status"] == 200
        for est, actual in (("est_cost_usd", "cost_usd"), ("pred_ttft_ms", "ttft_ms"), ("pred_tpot_ms", "tpot_ms")):
            assert rec[est] > 0 and rec[actual] > 0, (est, actual)
        assert rec["decision"]["chosen"] == f"{rec['tier']}/{rec['instance']}"
        assert SYSTEM[:40] not in got.text                     # never the prompt
        assert (await c.get(f"/admin/decisions/{rid}", headers=AUTH)).status_code == 403
        assert (await c.get(f"/admin/decisions/{rid}")).status_code == 401
        missing = await c.get("/admin/decisions/no-such-request", headers=ADMIN)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "request_id"


async def test_decision_records_fail_open_when_redis_goes_down(tmp_path: Path) -> None:
    server = EmbeddedValkey(tmp_path / "valkey", appendfsync=None)
    server.start()
    try:
        async with cluster() as urls, serve_router(parse_policy(TEXT), urls, redis_url=server.url) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
            rid = "up-" + uuid.uuid4().hex
            assert (await c.post("/v1/chat/completions", json=chat(), headers={"x-request-id": rid})).status_code == 200
            assert (await lookup(c, rid)).status_code == 200
            server.stop()
            t = time.perf_counter()
            for i in range(3):
                r = await c.post("/v1/chat/completions", json=chat(f"down {i}"))
                assert r.status_code == 200, r.text                # served regardless
            failed = 0.0
            for _ in range(200):                                   # the writer counts the failed batch
                failed = metric((await c.get("/metrics")).text, "tiergate_decision_records_total", result="failed")
                if failed:
                    break
                await c.get("/health")
            assert failed >= 1, f"no failure counted after {time.perf_counter() - t:.1f} s"
            down = await c.get(f"/admin/decisions/{rid}", headers=ADMIN)
            assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
    finally:
        server.stop()


def test_every_new_endpoint_is_documented() -> None:
    from router.openapi import document
    paths = document()["paths"]
    assert paths["/v1/route"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/RouteDecision")
    assert re.search("x-tiergate-explain", json.dumps(paths["/v1/chat/completions"]))
    assert "/admin/decisions/{request_id}" in paths
