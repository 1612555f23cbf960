"""Exposure and guessing (#12 item 7, and strict query integers from item 5): /metrics behind a token,
tenant names kept out of metric labels, failed key checks throttled per client address, `?days=²` a 400."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import uuid
from pathlib import Path

import httpx
import pytest

from backends.sim.run import start_sim
from policies.schema import parse_policy
from router.metrics import tenant_labeler
from router.throttle import FailureThrottle, client_key
from tests.conftest import serve_router
from tests.test_accounting import ADMIN, MSGS, policy_text

BODY = {"model": "chat", "max_tokens": 8, "messages": MSGS}
DEAD = "http://127.0.0.1:9"
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}


def from_address(base: str, address: str) -> httpx.AsyncClient:
    """A client whose connections come from `address` (a loopback address: the router sees it as the peer)."""
    assert ipaddress.ip_address(address).is_loopback
    return httpx.AsyncClient(base_url=base, timeout=30, transport=httpx.AsyncHTTPTransport(local_address=address))


def basic(password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"me:{password}".encode()).decode()}


def tenant_series(metrics: str) -> set[str]:
    return set(re.findall(r'tenant="([^"]*)"', metrics))


# ---- /metrics token ----

async def test_metrics_needs_the_token_when_one_is_set() -> None:
    token = "metrics-" + uuid.uuid4().hex
    async with serve_router(parse_policy(policy_text("m", [DEAD], {"a": ""})), metrics_token=token) as base, \
            from_address(base, "127.0.0.1") as c:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {token}"},
                        {"authorization": f"Bearer {token}x"}):
            r = await c.get("/metrics", headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"].startswith("Bearer")
            assert "tiergate_requests" not in r.text
        r = await c.get("/metrics", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200 and "tiergate_policy_info" in r.text
        assert (await c.get("/health")).status_code == 200                     # probes stay open


async def test_metrics_is_open_without_a_token() -> None:
    async with serve_router(parse_policy(policy_text("m", [DEAD], {"a": ""}))) as base, \
            httpx.AsyncClient(base_url=base) as c:
        assert (await c.get("/metrics")).status_code == 200


# ---- tenant labels ----

@pytest.mark.parametrize("mode", ["hash", "redacted"])
async def test_tenant_names_stay_out_of_metric_labels(mode: str, redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    salt = "salt-" + tag
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.2)
    pol = parse_policy(policy_text(tag, [sim.url], {"a": ", budgets: {daily_usd: 1.0}", "b": ""}))
    try:
        async with serve_router(pol, redis_url=redis_url, metrics_tenant_labels=mode, metrics_tenant_salt=salt) \
                as base, httpx.AsyncClient(base_url=base, timeout=30) as c:
            for name in ("a", "b"):
                r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer sk-{name}-{tag}"},
                                 json=BODY)
                assert r.status_code == 200, r.text
            r = await c.post("/v1/chat/completions", headers={"authorization": f"Bearer sk-a-{tag}"},
                             json={**BODY, "model": "no-such-model"})          # refused after its key was checked
            assert r.status_code == 404
            assert (await c.post("/v1/chat/completions", json=BODY)).status_code == 401
            metrics = (await c.get("/metrics")).text
    finally:
        await sim.close()
    assert f"a-{tag}" not in metrics and f"b-{tag}" not in metrics     # no tenant name anywhere
    hashed = {n: "t_" + hmac.new(salt.encode(), f"{n}-{tag}".encode(), hashlib.sha256).hexdigest()[:12]
              for n in ("a", "b")}
    if mode == "hash":
        assert tenant_series(metrics) == {*hashed.values(), "unknown"}
        assert f'tiergate_budget_remaining_usd{{period="daily",tenant="{hashed["a"]}"}}' in metrics
        assert f'tiergate_budget_limit_usd{{period="daily",tenant="{hashed["a"]}"}} 1.0' in metrics  # the budget
        assert f'tiergate_requests_total{{route="none",status="404",tenant="{hashed["a"]}",tier="none"}} 1.0' \
            in metrics
    else:
        assert tenant_series(metrics) == {"redacted", "unknown"}
        assert 'tiergate_requests_total{route="chat",status="200",tenant="redacted",tier="fast"} 2.0' in metrics
        assert "tiergate_budget_remaining_usd{" not in metrics              # a per-tenant gauge, not summable
        assert "tiergate_budget_limit_usd{" not in metrics
    assert 'tenant="unknown"' in metrics                                # the 401, before any tenant was known


def test_tenant_label_settings() -> None:
    assert tenant_labeler()("acme") == "acme"
    same, other = tenant_labeler("hash", "k"), tenant_labeler("hash", "j")
    assert same("acme") == tenant_labeler("hash", "k")("acme") != other("acme")
    assert tenant_labeler("redacted")("acme") == "redacted" and same("unknown") == "unknown"
    for mode, salt in (("hash", None), ("hash", ""), ("names", None)):
        with pytest.raises(ValueError):
            tenant_labeler(mode, salt)


# ---- throttled key guessing ----

async def test_key_guessing_is_throttled_per_address(redis_url: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(tag, [DEAD], {"a": ""}))
    pol = parse_policy(path.read_text())
    async with serve_router(pol, redis_url=redis_url, policy_path=str(path), watch_policy=True,
                            policy_reload_interval_s=0, auth_fail_burst=3, metrics_token="tok-" + tag) as base, \
            from_address(base, "127.0.0.2") as guesser, from_address(base, "127.0.0.3") as admin, \
            from_address(base, "127.0.0.4") as browser:
        wrong = {"authorization": "Bearer sk-guess"}
        assert (await guesser.get("/admin/usage", headers=wrong)).status_code == 401
        assert (await guesser.get("/dashboard", headers=basic("guess"))).status_code == 401
        assert (await guesser.post("/admin/policy/reload", headers=wrong)).status_code == 401
        for method, url, headers in (("GET", "/admin/usage", wrong), ("GET", "/admin/usage", ADMIN_AUTH),
                                     ("GET", "/v1/usage", {"authorization": f"Bearer sk-a-{tag}"}),
                                     ("GET", "/dashboard", basic(ADMIN)), ("POST", "/admin/policy/reload", ADMIN_AUTH),
                                     ("GET", "/metrics", {"authorization": f"Bearer tok-{tag}"})):
            r = await guesser.request(method, url, headers=headers)     # right keys too: a hit is not revealed
            assert r.status_code == 429, (url, r.status_code)
            assert int(r.headers["retry-after"]) >= 1
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "too_many_failed_key_checks"
        # /v1/* is not throttled (module header of router/throttle.py)
        assert (await guesser.get("/v1/models", headers={"authorization": f"Bearer sk-a-{tag}"})).status_code == 200
        # another address is unaffected
        r = await admin.get("/admin/usage", headers=ADMIN_AUTH, params={"days": 1})
        assert r.status_code == 200, r.text
        assert (await admin.post("/admin/policy/reload", headers=ADMIN_AUTH)).status_code == 200
        # no credentials at all is not a guess: a browser's first visit to the dashboard (sent to sign in)
        for _ in range(5):
            r = await browser.get("/dashboard")
            assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
        assert (await browser.get("/dashboard", headers={"authorization": f"Bearer sk-a-{tag}"})).status_code == 200
        # HTTP Basic is refused on the dashboard (router/dashboard/routes.py), and counted as a guess
        assert (await browser.get("/dashboard", headers=basic(f"sk-a-{tag}"))).status_code == 401


def test_throttle_refills_at_its_rate_with_an_injected_clock() -> None:
    now = [1000.0]
    t = FailureThrottle(burst=2, per_min=6.0, max_addresses=100, clock=lambda: now[0])   # one every 10 s
    for _ in range(2):
        assert t.retry_after("10.0.0.1") is None
        t.failed("10.0.0.1")
    assert t.retry_after("10.0.0.1") == 10 and t.retry_after("10.0.0.2") is None
    now[0] += 4
    assert t.retry_after("10.0.0.1") == 6
    with pytest.raises(Exception) as exc:
        t.check("10.0.0.1")
    assert getattr(exc.value, "headers", {})["Retry-After"] == "6"
    now[0] += 6
    assert t.retry_after("10.0.0.1") is None                              # one more guess allowed, not two
    t.failed("10.0.0.1")
    assert t.retry_after("10.0.0.1") == 10
    now[0] += 1000
    assert t.retry_after("10.0.0.1") is None
    t.fail_if_sent("10.0.0.3", None)                                      # no credentials: not counted
    t.fail_if_sent("10.0.0.3", "")
    assert len(t) == 1


def test_throttle_memory_is_bounded_and_ipv6_counts_by_64() -> None:
    now = [0.0]
    t = FailureThrottle(burst=1, per_min=1.0, max_addresses=100, clock=lambda: now[0])
    for i in range(10_000):
        t.failed(str(ipaddress.IPv4Address("10.0.0.0") + i))
        now[0] += 0.001
    assert len(t) == 100
    assert t.retry_after("10.0.39.15") is not None                        # the most recent are remembered
    t.failed("2001:db8::1")
    assert t.retry_after("2001:db8::ffff:1") is not None                  # same /64
    assert t.retry_after("2001:db8:0:1::1") is None                       # next /64
    assert client_key("::ffff:10.1.2.3") == "10.1.2.3" and client_key(None) == "unknown"


# ---- strict integers in query parameters ----

BAD_DAYS = ["²", "١٢", "0", "401", "-1", "+5", " 5", "5 ", "1e3", "0x10", "", "9" * 5000, "5.0", "0400"]


async def test_days_must_be_plain_ascii_digits_in_range(redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    async with serve_router(parse_policy(policy_text(tag, [DEAD], {"a": ""})), redis_url=redis_url) as base, \
            httpx.AsyncClient(base_url=base) as c:
        for days in BAD_DAYS:
            for url, headers in (("/v1/usage", {"authorization": f"Bearer sk-a-{tag}"}),
                                 ("/admin/usage", ADMIN_AUTH), ("/dashboard", ADMIN_AUTH)):
                r = await c.get(url, headers=headers, params={"days": days})
                assert r.status_code == 400, (days[:8], url, r.status_code, r.text[:200])
                err = r.json()["error"]
                assert err["param"] == "days" and "'days'" in err["message"]
                assert err["type"] == "invalid_request_error"
        for days in ("1", "400", "07"):
            r = await c.get("/v1/usage", headers={"authorization": f"Bearer sk-a-{tag}"}, params={"days": days})
            assert r.status_code == 200 and r.json()["days"] == int(days), r.text[:200]
