"""Tenant budgets and exact billing end to end: routers on real sockets, a real Redis, the simulator."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import httpx
import pytest

from backends.sim.run import RunningSim, start_sim
from backends.tokenization import TierTokenizer
from backends.valkey import EmbeddedValkey, free_port
from policies.schema import InstanceSpec, Policy, parse_policy
from router.auth import hash_key
from router.budget_store import price_units
from tests.conftest import serve_router

FAST = "Qwen/Qwen3-1.7B-FP8"
ADMIN = "sk-admin-" + "x" * 8
MSGS = [{"role": "user", "content": "Summarise the tiergate design in one line."}]


def keys(tag: str) -> dict[str, str]:
    return {name: f"sk-{name}-{tag}" for name in ("capped", "free", "share", "strict")}


PRICES = "{input: 0.05, cached_input: 0.01, output: 0.20}"


def policy_text(tag: str, urls: list[str], tenants: dict[str, str], prices: str = PRICES, first: int = 0,
                extra: str = "") -> str:
    """One `fast` tier (the listed instances, ids i<k>-<tag>, or simulated when none), tenants
    `<name>-<tag>` with key `sk-<name>-<tag>` and `extra` flow-mapping fields, the admin key, one route."""
    insts = ", ".join(f'{{id: i{k}-{tag}, url: "{u}"}}' for k, u in enumerate(urls, first))
    where = f"instances: [{insts}]" if urls else "simulate: {profile: qwen3-1.7b-fp8}"
    ten = "\n".join(f"  {name}-{tag}: {{key_sha256: [{hash_key('sk-' + name + '-' + tag)}]{more}}}"
                    for name, more in tenants.items())
    return f"""
version: 1
tiers:
  fast:
    model: {FAST}
    max_model_len: 40960
    prices: {prices}
    {where}
tenants:
{ten}
admin: {{key_sha256: [{hash_key(ADMIN)}]}}
{extra}
routes:
  chat: {{tiers: [fast], profile: p}}
profiles:
  p:
    filters: [{{type: tier_allowed}}, {{type: context_fits}}, {{type: healthy}}]
    scorers: [{{type: load}}]
    picker: {{type: max_score}}
"""


def policy(tag: str, daily_usd: float = 1.0) -> Policy:
    return parse_policy(policy_text(tag, [], {
        "capped": f", budgets: {{daily_usd: {daily_usd!r}}}",
        "free": "",
        "share": ", budgets: {daily_usd: 1.0}, on_store_failure: allow_share, store_failure_share: 0.5, "
                 "limits: {rpm: 20}",
        "strict": ", budgets: {daily_usd: 1.0}, on_store_failure: reject"}), "accounting-test.yaml")


def worst_case_units(max_tokens: int) -> int:
    tok = TierTokenizer(None)
    prompt = len(tok.encode_blocking_free(tok.render_chat(MSGS)))
    return prompt * price_units(0.05) + max_tokens * price_units(0.20)


async def ledger(c: httpx.AsyncClient, base: str, tenant: str) -> dict[str, Any]:
    r = await c.get(base + "/admin/usage", params={"tenant": tenant, "days": 2},
                    headers={"authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    return dict(r.json()["data"][0]["totals"])


async def wait_for(cond: Any, limit_s: float = 15.0) -> None:
    for _ in range(int(limit_s / 0.05)):
        if await cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def chat_and_settle(c: httpx.AsyncClient, k: dict[str, str], counts: dict[str, int], max_tokens: int) -> None:
    """Send `counts[who]` chats with each tenant's key, then wait until each tenant's usage shows them."""
    for who, n in counts.items():
        for _ in range(n):
            r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer {k[who]}"},
                             json={"model": "chat", "max_tokens": max_tokens, "messages": MSGS})
            assert r.status_code == 200

    async def settled() -> bool:
        for who, n in counts.items():
            r = await c.get("/v1/usage", headers={"authorization": f"Bearer {k[who]}"})
            if r.json()["totals"]["requests"] != n:
                return False
        return True
    await wait_for(settled)


@pytest.mark.parametrize("backend", ["single", "cluster"])
@pytest.mark.parametrize("replicas", [1, 2])
async def test_concurrent_requests_admit_exactly_the_ones_that_fit(redis_url: str, replicas: int, backend: str,
                                                                   request: pytest.FixtureRequest) -> None:
    """64 concurrent requests through 1 or 2 routers on one Redis node, and on a Redis Cluster
    (`redis+cluster://`, tests/redis_servers.py): exactly the 5 that fit the daily budget are admitted."""
    if backend == "cluster":
        redis_url = request.getfixturevalue("cluster_url")
    tag = uuid.uuid4().hex[:6]
    k, max_tokens = 5, 50
    worst = worst_case_units(max_tokens)
    pol = policy(tag, daily_usd=(k * worst + worst // 2) / 1e10)
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.2)
    urls = {"fast": [InstanceSpec(id=f"i-{tag}", url=sim.url)]}
    try:
        # one event loop runs both routers, the simulator and 64 clients: Redis timeouts long enough that a
        # busy loop is not mistaken for a Redis outage (tested on its own below)
        patient = {"redis_url": redis_url, "redis_timeout_s": 1.0, "accounting_timeout_s": 2.0}
        async with serve_router(pol, urls, **patient) as a, \
                serve_router(pol, urls, **patient) as b, httpx.AsyncClient(timeout=30) as c:
            bases = [a, b][:replicas]
            auth = {"authorization": f"Bearer {keys(tag)['capped']}"}
            rs = await asyncio.gather(*(c.post(bases[i % replicas] + "/v1/chat/completions", headers=auth,
                                               json={"model": "chat", "max_tokens": max_tokens, "messages": MSGS})
                                        for i in range(64)))
            ok = [r for r in rs if r.status_code == 200]
            rejected = [r for r in rs if r.status_code != 200]
            assert len(ok) == k
            assert {r.status_code for r in rejected} == {429}
            err = rejected[0].json()["error"]
            assert err["code"] == "insufficient_quota" and "daily budget" in err["message"]
            assert "retry-after" in rejected[0].headers and "x-tiergate-budget-remaining-usd" in rejected[0].headers
            billed = sum(r.json()["usage"]["completion_tokens"] for r in ok)

            async def settled() -> bool:
                return bool((await ledger(c, a, f"capped-{tag}"))["requests"] == k)
            await wait_for(settled)
            tot = await ledger(c, a, f"capped-{tag}")
            assert tot["completion_tokens"] == billed
            assert tot["cost_usd"] <= pol.tenants[f"capped-{tag}"].budgets.daily_usd  # type: ignore[operator]
    finally:
        await sim.close()


async def test_dropped_streams_bill_exactly_what_the_backend_delivered(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=2.0)
    rng = random.Random(7)
    try:
        async with serve_router(policy(tag), {"fast": [InstanceSpec(id=f"i-{tag}", url=sim.url)]},
                                redis_url=redis_url) as base, httpx.AsyncClient(timeout=30) as c:
            auth = {"authorization": f"Bearer {keys(tag)['free']}"}

            async def one(drop_after: int | None) -> None:
                body = {"model": "chat", "max_tokens": 60, "stream": True, "ignore_eos": True, "messages": MSGS}
                async with c.stream("POST", base + "/v1/chat/completions", headers=auth, json=body) as r:
                    assert r.status_code == 200
                    n = 0
                    async for line in r.aiter_lines():
                        n += line.startswith("data: {")
                        if drop_after is not None and n >= drop_after:
                            break          # the client goes away mid-stream

            await asyncio.gather(*(one(rng.randint(1, 40) if i % 4 else None) for i in range(16)))

            async def settled() -> bool:
                return bool((await ledger(c, base, f"free-{tag}"))["requests"] == 16)
            await wait_for(settled)
            await asyncio.sleep(0.3)
            tot = await ledger(c, base, f"free-{tag}")
            stats = sim.server.engine.stats
            assert tot["completion_tokens"] == stats.delivered_tokens
            assert stats.success["abort"] >= 8              # the dropped streams really were aborted upstream
            assert tot["completion_tokens"] < 16 * 60
    finally:
        await sim.close()


async def test_redis_killed_and_restarted_loses_and_doubles_nothing(tmp_path: Any) -> None:
    tag = uuid.uuid4().hex[:6]
    k = keys(tag)
    port = free_port()
    valkey = EmbeddedValkey(tmp_path / "v", port=port, appendfsync="always")
    valkey.start()
    sim: RunningSim = await start_sim("qwen3-1.7b-fp8", time_scale=0.1)
    served = {"prompt": 0, "completion": 0}
    codes: dict[str, list[int]] = {"share": [], "strict": [], "free": []}
    try:
        # patient Redis timeouts: on a loaded machine a 50 ms timeout while Redis is still up would already
        # count the first burst against the local allow_share windows (a stopped Redis refuses at once anyway)
        async with serve_router(policy(tag), {"fast": [InstanceSpec(id=f"i-{tag}", url=sim.url)]},
                                redis_url=valkey.url, data_dir=str(tmp_path / "router"), redis_timeout_s=1.0,
                                accounting_timeout_s=2.0, affinity_timeout_s=1.0) as base, \
                httpx.AsyncClient(timeout=30) as c:

            async def burst(n: int) -> None:
                for who in ("share", "strict", "free"):
                    rs = await asyncio.gather(*(c.post(base + "/v1/chat/completions",
                                                       headers={"authorization": f"Bearer {k[who]}"},
                                                       json={"model": "chat", "max_tokens": 8, "messages": MSGS})
                                                for _ in range(n)))
                    for r in rs:
                        codes[who].append(r.status_code)
                        if r.status_code == 200:
                            served["prompt"] += r.json()["usage"]["prompt_tokens"]
                            served["completion"] += r.json()["usage"]["completion_tokens"]

            await burst(4)                 # Redis up: everything admitted and settled
            valkey.stop()
            await burst(15)                # Redis down
            down = {w: codes[w][4:] for w in codes}
            assert set(down["strict"]) == {503}                   # on_store_failure: reject
            assert down["share"].count(200) == 10                 # allow_share: 50% of rpm 20 on this replica
            assert set(down["share"]) == {200, 429}
            assert set(down["free"]) == {200}                     # no limits: served, billed via the journal
            valkey = EmbeddedValkey(tmp_path / "v", port=port, appendfsync="always")
            valkey.start()                 # the same data dir: the append-only file brings back what was there

            async def replayed() -> bool:
                try:
                    t = [await ledger(c, base, f"{w}-{tag}") for w in ("share", "strict", "free")]
                except AssertionError:
                    return False
                return sum(x["requests"] for x in t) == sum(v.count(200) for v in codes.values())
            await wait_for(replayed, 30)
            tots = [await ledger(c, base, f"{w}-{tag}") for w in ("share", "strict", "free")]
            assert sum(t["prompt_tokens"] for t in tots) == served["prompt"]
            assert sum(t["completion_tokens"] for t in tots) == served["completion"]
            assert sim.server.engine.stats.delivered_tokens == served["completion"]
    finally:
        await sim.close()
        valkey.stop()


async def test_usage_api_scopes_tenants_and_admin(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    k = keys(tag)
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.1)
    try:
        async with serve_router(policy(tag), {"fast": [InstanceSpec(id=f"i-{tag}", url=sim.url)]},
                                redis_url=redis_url) as base, httpx.AsyncClient(base_url=base, timeout=30) as c:
            await chat_and_settle(c, k, {"free": 1, "capped": 1}, 4)
            mine = (await c.get("/v1/usage", headers={"authorization": f"Bearer {k['free']}"})).json()
            assert mine["tenant"] == f"free-{tag}" and mine["totals"]["requests"] == 1
            csv = await c.get("/v1/usage?format=csv", headers={"authorization": f"Bearer {k['free']}"})
            assert csv.headers["content-type"].startswith("text/csv") and f"free-{tag}," in csv.text
            assert f"capped-{tag}" not in csv.text
            assert (await c.get("/admin/usage", headers={"authorization": f"Bearer {k['free']}"})).status_code == 403
            assert (await c.get("/admin/usage")).status_code == 401
            bad = await c.get("/v1/usage?days=0", headers={"authorization": f"Bearer {k['free']}"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "days"
            # a tenant key asking for another tenant's dashboard still sees only its own
            d = await c.get(f"/dashboard?tenant=capped-{tag}", headers={"authorization": f"Bearer {k['free']}"})
            assert d.status_code == 200 and f"tenant free-{tag}" in d.text and f"capped-{tag}" not in d.text
            assert "script-src" not in d.headers["content-security-policy"]
            assert "default-src 'none'" in d.headers["content-security-policy"]
            assert (await c.get("/dashboard")).status_code == 303           # to the sign-in form
            admin = await c.get("/dashboard/admin", headers={"authorization": f"Bearer {ADMIN}"})
            assert admin.status_code == 200 and f"capped-{tag}" in admin.text and f"free-{tag}" in admin.text
    finally:
        await sim.close()


def test_grafana_dashboard_queries_only_metrics_the_router_exports() -> None:
    import json
    import re
    from pathlib import Path

    from router.metrics import RouterMetrics

    dash = json.loads((Path(__file__).resolve().parent.parent / "deploy/grafana/tiergate-tenants.json").read_text())
    exported = {s.name for fam in RouterMetrics().registry.collect() for s in fam.samples} | \
               {fam.name + "_total" for fam in RouterMetrics().registry.collect()} | \
               {fam.name for fam in RouterMetrics().registry.collect()}
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"\b(tiergate_[a-z_]+)", t["expr"])}
    assert used and used <= exported, used - exported
    assert {"tiergate_cost_usd_total", "tiergate_budget_remaining_usd", "tiergate_admissions_total"} <= used
