"""Dashboard sign-in (#17 item 6): a key becomes a signed, HttpOnly, SameSite session cookie; sign-out ends it
server-side; sessions expire (on an injected clock); failed sign-ins are throttled per address; keys and
cookies never reach the logs; HTTP Basic is refused."""

from __future__ import annotations

import base64
from datetime import timedelta

import httpx
import pytest
import redis.asyncio as aioredis
from litestar import Litestar
from litestar.stores.memory import MemoryStore

from policies.schema import Policy
from router.auth import KeyIndex, hash_key
from router.budget_store import BudgetStore
from router.dashboard.routes import dashboard_router
from router.dashboard.session import session_config
from router.throttle import FailureThrottle
from router.usage_routes import UsageSource
from tests.conftest import serve_router
from tests.dashboard_seed import ADMIN, keys, letters_tag, policy, seed
from tests.test_exposure import from_address


def cookie_of(r: httpx.Response) -> str:
    """`name=value` of the response's session cookie."""
    return r.headers["set-cookie"].split(";", 1)[0]


def attributes(r: httpx.Response) -> set[str]:
    return {a.strip().lower() for a in r.headers["set-cookie"].split(";")[1:]}


async def test_sign_in_view_and_sign_out(redis: aioredis.Redis, redis_url: str,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    tag = letters_tag()
    k = keys(tag)
    await seed(redis, tag)
    async with serve_router(policy(tag), redis_url=redis_url, session_secret="secret-" + tag) as base, \
            httpx.AsyncClient(base_url=base) as c:
        first = await c.get("/dashboard")
        assert first.status_code == 303 and first.headers["location"] == "/dashboard/login"
        assert "www-authenticate" not in first.headers                      # no browser Basic prompt
        form = await c.get("/dashboard/login")
        assert form.status_code == 200 and 'type="password"' in form.text and 'autocomplete="off"' in form.text
        wrong = await c.post("/dashboard/login", data={"key": "sk-wrong"})
        assert wrong.status_code == 401 and "not recognised" in wrong.text and "set-cookie" not in wrong.headers

        ok = await c.post("/dashboard/login", data={"key": k["demo"]})
        assert ok.status_code == 303 and ok.headers["location"] == "/dashboard"
        assert {"httponly", "samesite=lax", "path=/", "max-age=28800"} <= attributes(ok)
        assert "secure" not in attributes(ok) and k["demo"] not in ok.headers["set-cookie"]
        jar = {"cookie": cookie_of(ok)}
        page = await c.get("/dashboard", headers=jar)
        assert page.status_code == 200 and f"tenant demo-{tag}" in page.text and "Sign out" in page.text
        assert "set-cookie" not in page.headers                             # a view does not extend the session
        name, value = cookie_of(ok).split("=", 1)
        forged = f"{name}={value.split('.')[0]}.{'A' * 43}"
        assert (await c.get("/dashboard", headers={"cookie": forged})).status_code == 303

        stored = [await redis.get(key) for key in await redis.keys("tiergate:session:*")]
        assert any(hash_key(k["demo"]).encode() in (s or b"") for s in stored)
        assert all(k["demo"].encode() not in (s or b"") for s in stored)   # the digest is kept, never the key

        for cross in ({"sec-fetch-site": "cross-site"}, {"origin": "https://evil.example"}):
            assert (await c.post("/dashboard/logout", headers={**jar, **cross})).status_code == 403
        assert (await c.get("/dashboard", headers=jar)).status_code == 200   # still signed in
        out = await c.post("/dashboard/logout", headers={**jar, "sec-fetch-site": "same-origin"})
        assert out.status_code == 303 and out.headers["location"] == "/dashboard/login"
        assert "max-age=0" in attributes(out)
        assert (await c.get("/dashboard", headers=jar)).status_code == 303   # the old cookie is dead server-side

        admin = await c.post("/dashboard/login", data={"key": ADMIN})
        assert admin.headers["location"] == "/dashboard/admin"
        fleet = await c.get("/dashboard/admin", headers={"cookie": cookie_of(admin)})
        assert fleet.status_code == 200 and f"demo-{tag}" in fleet.text
        basic = "Basic " + base64.b64encode(f"me:{k['demo']}".encode()).decode()
        assert (await c.get("/dashboard", headers={"authorization": basic})).status_code == 401
        cookies = [cookie_of(ok), cookie_of(admin)]
    logs = "".join(capfd.readouterr())
    assert "dashboard_sign_in" in logs and "invalid_key" in logs and "dashboard_sign_out" in logs
    for secret in (k["demo"], ADMIN, "sk-wrong", *(c.split("=", 1)[1] for c in cookies)):
        assert secret not in logs


async def test_failed_sign_ins_are_throttled_per_address(redis_url: str) -> None:
    tag = letters_tag()
    k = keys(tag)
    async with serve_router(policy(tag), redis_url=redis_url, auth_fail_burst=3) as base, \
            from_address(base, "127.0.0.5") as guesser, from_address(base, "127.0.0.6") as other:
        for _ in range(3):
            assert (await guesser.post("/dashboard/login", data={"key": "sk-guess"})).status_code == 401
        right = await guesser.post("/dashboard/login", data={"key": k["demo"]})      # a hit is not revealed
        assert right.status_code == 429 and int(right.headers["retry-after"]) >= 1
        assert "set-cookie" not in right.headers and "Too many failed sign-ins" in right.text
        bearer = {"authorization": f"Bearer {k['demo']}"}
        assert (await guesser.get("/dashboard", headers=bearer)).status_code == 429   # one allowance, all endpoints
        for _ in range(5):                                                  # an empty form is not a guess
            assert (await other.post("/dashboard/login", data={"key": ""})).status_code == 401
        assert (await other.post("/dashboard/login", data={"key": k["demo"]})).status_code == 303


def asgi_app(pol: Policy, store: BudgetStore, now: list[float], secure: bool = False,
             holder: list[Policy] | None = None) -> Litestar:
    current = holder if holder is not None else [pol]
    sessions = session_config(b"test-secret", None, max_age_s=600, secure=secure, clock=lambda: now[0])
    return Litestar(route_handlers=[dashboard_router(lambda: (current[0], KeyIndex(current[0])), UsageSource(store),
                                                     FailureThrottle(), sessions)])


def asgi_client(app: Litestar) -> httpx.AsyncClient:
    """The app on this event loop (the Redis client belongs to it), cookies passed by hand."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dash.test")


async def test_sessions_expire_on_the_clock_and_with_their_key(redis: aioredis.Redis) -> None:
    tag = letters_tag()
    k = keys(tag)
    pol = policy(tag)
    now = [1_000_000.0]
    holder = [pol]
    async with asgi_client(asgi_app(pol, BudgetStore(redis), now, holder=holder)) as c:
        ok = await c.post("/dashboard/login", data={"key": k["demo"]})
        assert ok.status_code == 303 and "max-age=600" in attributes(ok)
        jar = {"cookie": cookie_of(ok)}
        now[0] += 599
        assert (await c.get("/dashboard", headers=jar)).status_code == 200
        now[0] += 1
        gone = await c.get("/dashboard", headers=jar)
        assert gone.status_code == 303 and gone.headers["location"] == "/dashboard/login"

        again = await c.post("/dashboard/login", data={"key": k["demo"]})
        jar = {"cookie": cookie_of(again)}
        assert (await c.get("/dashboard", headers=jar)).status_code == 200
        tenants = dict(pol.tenants)
        tenants[f"demo-{tag}"] = type(tenants[f"demo-{tag}"])(key_sha256=[hash_key("sk-rotated")])
        holder[0] = type(pol)(**{f: getattr(pol, f) for f in pol.__struct_fields__ if f != "tenants"},
                              tenants=tenants)                              # the key is revoked by a policy reload
        assert (await c.get("/dashboard", headers=jar)).status_code == 303


async def test_secure_cookies_behind_https(redis: aioredis.Redis) -> None:
    tag = letters_tag()
    async with asgi_client(asgi_app(policy(tag), BudgetStore(redis), [0.0], secure=True)) as c:
        ok = await c.post("/dashboard/login", data={"key": keys(tag)["demo"]})
        assert cookie_of(ok).startswith("__Host-tiergate_session=") and "secure" in attributes(ok)


class FlakyStore(MemoryStore):
    """A session store that can be made to fail (Redis away)."""

    broken = False

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        if self.broken:
            raise ConnectionError("store away")
        return await super().get(key, renew_for)

    async def set(self, key: str, value: str | bytes, expires_in: int | timedelta | None = None) -> None:
        if self.broken:
            raise ConnectionError("store away")
        await super().set(key, value, expires_in)


async def test_a_session_store_outage_signs_out_instead_of_failing(redis: aioredis.Redis) -> None:
    tag = letters_tag()
    pol = policy(tag)
    store = FlakyStore()
    sessions = session_config(b"s", store, max_age_s=600, secure=False)
    app = Litestar(route_handlers=[dashboard_router(lambda: (pol, KeyIndex(pol)), UsageSource(BudgetStore(redis)),
                                                    FailureThrottle(), sessions)])
    async with asgi_client(app) as c:
        ok = await c.post("/dashboard/login", data={"key": keys(tag)["demo"]})
        jar = {"cookie": cookie_of(ok)}
        store.broken = True
        page = await c.get("/dashboard", headers=jar)
        assert page.status_code == 303 and page.headers["location"] == "/dashboard/login"
        again = await c.post("/dashboard/login", data={"key": keys(tag)["demo"]})
        assert again.status_code == 303 and "set-cookie" not in again.headers
