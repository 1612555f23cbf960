"""Budget alerts (issue #17): real routers, a real Redis, the simulator and a real HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from structlog.testing import capture_logs

from backends.sim.run import running_sim
from backends.valkey import free_port
from policies.alerts_spec import thresholds_for
from policies.schema import InstanceSpec, PolicyError, parse_policy
from router.alert_webhook import Alert, WebhookSender, sign
from router.alerts import BudgetAlerts
from router.budget_store import BudgetStore, Usage
from router.metrics import RouterMetrics
from router.settings import Settings
from tests.conftest import serve_router
from tests.test_accounting import MSGS, keys, ledger, policy_text, wait_for, worst_case_units

SECRET = "whsec-test-" + "k" * 16
NOW_MS = 1_740_000_000_000   # 2025-02-19T21:20:00Z


@dataclass
class Post:
    alert_id: str
    body: dict[str, Any]
    signed: bool
    status: int
    headers: dict[str, str]


@dataclass
class Receiver:
    """Records every POST, checks its signature, and answers `fail_first` 503s per alert id first."""

    fail_first: int = 0
    fail_status: int = 503
    url: str = ""
    posts: list[Post] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        aid = request.headers.get("x-tiergate-alert-id", "")
        tries = sum(1 for p in self.posts if p.alert_id == aid)
        signed = hmac.compare_digest(request.headers.get("x-tiergate-signature", ""),
                                     "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest())
        status = self.fail_status if tries < self.fail_first else 200
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.posts.append(Post(aid, json.loads(raw), signed, status, headers))
        return web.Response(status=status)

    def delivered(self) -> list[Post]:
        return [p for p in self.posts if p.status == 200]


@contextlib.asynccontextmanager
async def receiving(fail_first: int = 0, fail_status: int = 503) -> AsyncIterator[Receiver]:
    rec = Receiver(fail_first, fail_status)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    rec.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield rec
    finally:
        await runner.cleanup()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def scrape(c: httpx.AsyncClient, *bases: str) -> str:
    return "\n".join([(await c.get(b + "/metrics")).text for b in bases])


async def test_thresholds_fire_once_under_64_concurrent_requests_on_2_replicas(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    k, max_tokens = 8, 40
    worst = worst_case_units(max_tokens)
    tenant = f"capped-{tag}"
    # a budget of exactly k worst cases: k requests fit, and as each uses all it reserved (ignore_eos; cached
    # prompt tokens at the full price), the spend reaches 100% exactly
    ptext = policy_text(tag, [], {"capped": f", budgets: {{daily_usd: {k * worst / 1e10!r}}}"},
                       prices="{input: 0.05, cached_input: 0.05, output: 0.20}",
                       extra="alerts: {thresholds: [0.5, 0.8, 1.0]}")   # the policy-wide default
    pol = parse_policy(ptext, "alerts-test.yaml")
    async with running_sim("qwen3-1.7b-fp8", time_scale=0.2) as sim, receiving(fail_first=2) as rec:
        urls = {"fast": [InstanceSpec(id=f"i-{tag}", url=sim.url)]}
        opts = {"redis_url": redis_url, "redis_timeout_s": 1.0, "accounting_timeout_s": 2.0,
                "alert_webhook_url": rec.url, "alert_webhook_secret": SECRET, "alert_webhook_backoff_s": 0.05}
        async with serve_router(pol, urls, **opts) as a, serve_router(pol, urls, **opts) as b, \
                httpx.AsyncClient(timeout=30) as c:
            auth = {"authorization": f"Bearer {keys(tag)['capped']}"}
            body = {"model": "chat", "max_tokens": max_tokens, "ignore_eos": True, "messages": MSGS}
            rs = await asyncio.gather(*(c.post((a, b)[i % 2] + "/v1/chat/completions", headers=auth, json=body)
                                        for i in range(64)))
            assert sum(r.status_code == 200 for r in rs) == k
            assert {r.status_code for r in rs} == {200, 429}

            async def settled() -> bool:
                return bool((await ledger(c, a, tenant))["requests"] == k)
            await wait_for(settled)
            assert round((await ledger(c, a, tenant))["cost_usd"] * 1e10) == k * worst   # 100% spent

            async def all_delivered() -> bool:
                text = await scrape(c, a, b)
                return metric(text, "tiergate_budget_alerts_total", result="delivered") == 3
            await wait_for(all_delivered)
            text = await scrape(c, a, b)
            for t in ("0.5", "0.8", "1"):
                for result, n in (("fired", 1), ("delivered", 1), ("failed", 0), ("dropped", 0)):
                    assert metric(text, "tiergate_budget_alerts_total", tenant=tenant, period="daily",
                                  threshold=t, result=result) == n, (t, result)

            # a third checker on the same Redis finds every threshold claimed: none fires again this period
            r = aioredis.Redis.from_url(redis_url)
            try:
                again = BudgetAlerts(r, RouterMetrics(), lambda: pol)
                again.dirty.add(tenant)
                assert await again.check()
                assert metric(again.metrics.render().decode(), "tiergate_budget_alerts_total") == 0
            finally:
                await r.aclose()

    ok = rec.delivered()
    assert sorted(p.body["threshold"] for p in ok) == [0.5, 0.8, 1.0]       # exactly one delivery each
    assert len(rec.posts) == 9                                              # two 503s, then the 200, each
    assert all(p.signed for p in rec.posts)
    for p in ok:
        tries = [q for q in rec.posts if q.alert_id == p.alert_id]
        assert len(tries) == 3 and all(q.body == p.body for q in tries)    # the same id and body on retries
        assert p.headers["content-type"] == "application/json" and p.headers["x-tiergate-timestamp"].isdigit()
        got = p.body
        assert (got["tenant"], got["period"], got["budget_usd"]) == (tenant, "daily", k * worst / 1e10)
        assert re.fullmatch(r"\d{8}", got["period_id"]) and got["at"].endswith("Z")
        assert got["spent_usd"] >= got["threshold"] * got["budget_usd"] - 1e-12
    assert len({p.alert_id for p in ok}) == 3


async def _spend(redis: aioredis.Redis, tenant: str, units: int) -> None:
    """Bill `units` to `tenant` now (an orphan settlement on an injected clock)."""
    store = BudgetStore(redis, clock_ms=lambda: NOW_MS)
    usage = Usage("fast", "i", "chat", 200, 10, 0, 10, units, units, units, 1.0, None, None, NOW_MS)
    assert await store.settle(tenant, uuid.uuid4().hex, usage) == "orphan"


def _policy(tag: str, tenant_extra: str = "", extra: str = "") -> Any:
    return parse_policy(policy_text(tag, [], {"capped": ", budgets: {daily_usd: 1.0, monthly_usd: 10.0}"
                                              + tenant_extra}, extra=extra), "alerts-test.yaml")


async def test_racing_checkers_claim_each_crossing_once_and_wait_while_redis_is_away(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    tenant = f"capped-{tag}"
    pol = _policy(tag, ", alerts: {thresholds: [0.05, 0.5, 0.8]}")
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(8)]
    down = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.2)
    try:
        await _spend(clients[0], tenant, 6 * 10**9)     # $0.60: 60% of the day, 6% of the month
        checkers = [BudgetAlerts(r, RouterMetrics(), lambda: pol, clock_ms=lambda: NOW_MS) for r in clients]
        away = BudgetAlerts(down, RouterMetrics(), lambda: pol, clock_ms=lambda: NOW_MS)
        for ch in [*checkers, away]:
            ch.settled(tenant)
        with capture_logs() as logs:
            assert all(await asyncio.gather(*(ch.check() for ch in checkers)))
            assert not await away.check()
        assert away.dirty == {tenant}                      # kept to be checked again, nothing fired
        fired = sorted((e["period"], e["threshold"]) for e in logs if e["event"] == "budget_alert")
        assert fired == [("daily", 0.05), ("daily", 0.5), ("monthly", 0.05)]
        assert all(e["tenant"] == tenant for e in logs if e["event"] == "budget_alert")
        assert [e["event"] for e in logs].count("budget_alerts_store_unavailable") == 1
        text = "\n".join(ch.metrics.render().decode() for ch in checkers)
        assert metric(text, "tiergate_budget_alerts_total", result="fired") == 3
        assert metric(text, "tiergate_budget_alerts_total", result="no_webhook") == 3   # logged and counted

        await _spend(clients[0], tenant, 3 * 10**9)     # 90% of the day: only 0.8 is new
        for ch in checkers:
            ch.settled(tenant)
        await asyncio.gather(*(ch.check() for ch in checkers))
        text = "\n".join(ch.metrics.render().decode() for ch in checkers)
        assert metric(text, "tiergate_budget_alerts_total", result="fired", threshold="0.8", period="daily") == 1
        assert metric(text, "tiergate_budget_alerts_total", result="fired") == 4
    finally:
        for r in [*clients, down]:
            await r.aclose()


async def test_webhook_gives_up_after_its_tries_and_at_once_on_a_4xx() -> None:
    results: list[tuple[str, str]] = []
    alert = Alert("t", "daily", "20250219", 0.8, 0.81, 1.0, "2025-02-19T21:20:00.000Z")
    for status, tries in ((503, 3), (400, 1)):
        async with receiving(fail_first=99, fail_status=status) as rec:
            sender = WebhookSender(rec.url, SECRET, lambda a, r: results.append((a.tenant, r)), attempts=3,
                                   backoff_s=0.01)
            try:
                with capture_logs() as logs:
                    assert not await sender.deliver(alert)
            finally:
                await sender.aclose()
            assert len(rec.posts) == tries and len({p.alert_id for p in rec.posts}) == 1
            assert all(p.signed for p in rec.posts)
            assert [e["event"] for e in logs] == ["budget_alert_undelivered"]
    assert results == [("t", "failed"), ("t", "failed")]
    assert sign("s", b"{}") == "sha256=" + hmac.new(b"s", b"{}", hashlib.sha256).hexdigest()


def test_policy_thresholds_are_validated_and_the_webhook_is_not_a_policy_field() -> None:
    tag = "p"
    bad = {", alerts: {thresholds: [0.8, 0.5]}": "sorted",
           ", alerts: {thresholds: [0.5, 0.5]}": "sorted",
           ", alerts: {thresholds: [0]}": "0 < t <= 1.5",
           ", alerts: {thresholds: [1.6]}": "0 < t <= 1.5"}
    for text, why in bad.items():
        with pytest.raises(PolicyError, match=re.escape(why)) as err:
            _policy(tag, text)
        assert err.value.path.startswith(f"$.tenants.capped-{tag}.alerts.thresholds")
    with pytest.raises(PolicyError) as err:
        _policy(tag, ', alerts: {thresholds: [0.5], webhook_url: "http://evil.example/hook"}')
    assert err.value.path == f"$.tenants.capped-{tag}.alerts.webhook_url"
    with pytest.raises(PolicyError) as err:
        _policy(tag, extra='alerts: {thresholds: [0.5], webhook_secret: "x"}')
    assert err.value.path == "$.alerts.webhook_secret"
    with pytest.raises(PolicyError, match=re.escape("budgets.daily_usd")):
        parse_policy(policy_text(tag, [], {"free": ", alerts: {thresholds: [0.5]}"}), "x.yaml")
    # the policy-wide default applies to tenants with a budget and no list of their own; [] turns it off
    pol = _policy(tag, extra="alerts: {thresholds: [0.5, 1.5]}")
    assert thresholds_for(pol, pol.tenants[f"capped-{tag}"]) == [0.5, 1.5]
    assert thresholds_for(_policy(tag, ", alerts: {thresholds: []}", "alerts: {thresholds: [0.5]}"),
                          pol.tenants[f"capped-{tag}"]) == [0.5]
    off = _policy(tag, ", alerts: {thresholds: []}", "alerts: {thresholds: [0.5]}")
    assert thresholds_for(off, off.tenants[f"capped-{tag}"]) == []


def test_a_webhook_needs_its_secret_and_an_http_url() -> None:
    pol = _policy("s")
    for url, secret in (("http://127.0.0.1:1/hook", None), ("ftp://127.0.0.1/hook", SECRET)):
        with pytest.raises(ValueError, match="alert_webhook"):
            BudgetAlerts.from_settings(Settings(alert_webhook_url=url, alert_webhook_secret=secret),
                                       aioredis.Redis(), RouterMetrics(), lambda: pol)
