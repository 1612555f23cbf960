"""HTTP handlers for usage and cost: GET /v1/usage, GET /admin/usage, GET /dashboard (+ its CSS).

* `/v1/usage`: the calling tenant's own usage by day and tier (`?days=1..400`,
  `?format=csv`), with its budget state. A tenant key sees only its own tenant.
* `/admin/usage`: every tenant (or `?tenant=`), behind an admin key; tenant keys get 403.
* `/dashboard`: a tenant key shows that tenant; an admin key shows every tenant and any
  one of them (`?tenant=`). Browsers authenticate with HTTP Basic (the key as password).

Failed key checks on all three are throttled per client address (router/throttle.py): 429 with
Retry-After. `days` is parsed strictly: ASCII digits only (`'²'.isdigit()` is true, and `int()`
refuses it), at most 3 of them, then the bounds; anything else is a 400 naming the parameter.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response, get

from policies.schema import Policy
from router import dashboard
from router.accounting import Accountant, baseline_tier
from router.auth import KeyIndex
from router.errors import ApiError
from router.lifecycle.ports import BudgetLedger
from router.throttle import FailureThrottle
from router.usage import budget_view, report, to_csv

_enc = msgspec.json.Encoder()
_SECURITY = {"Content-Security-Policy": dashboard.CSP, "X-Content-Type-Options": "nosniff",
             "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def int_param(request: Request[Any, Any, Any], name: str, lo: int, hi: int, default: int) -> int:
    """A query parameter that must be an integer in [lo, hi]: ASCII digits only, bounded before `int()`."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    digits = len(str(hi))
    if not (0 < len(raw) <= digits and raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
        raise ApiError(400, f"query parameter '{name}' must be an integer from {lo} to {hi}", param=name,
                       code="invalid_value")
    return int(raw)


def client_host(request: Request[Any, Any, Any]) -> str | None:
    return request.client.host if request.client is not None else None


def usage_handlers(current: Callable[[], tuple[Policy, KeyIndex]], accountant: Accountant,
                   today: Callable[[], dt.date] | None = None, throttle: FailureThrottle | None = None) -> list[Any]:
    """`current`: the running policy and its key index (a reload swaps them; each request takes them once).
    `throttle`: failed key checks per client address (router/throttle.py); default: its defaults."""
    store: BudgetLedger | None = accountant.store
    day = today or (lambda: dt.datetime.now(dt.UTC).date())
    guard = throttle if throttle is not None else FailureThrottle()   # (an empty one is falsy: it has a len)

    def err(exc: ApiError) -> Response[bytes]:
        return Response(content=exc.body(), status_code=exc.status, media_type="application/json",
                        headers=exc.headers)

    def days_param(request: Request[Any, Any, Any], default: int = 30) -> int:
        return int_param(request, "days", 1, 400, default)

    def fmt_param(request: Request[Any, Any, Any]) -> str:
        f = request.query_params.get("format", "json")
        if f not in ("json", "csv"):
            raise ApiError(400, "query parameter 'format' must be 'json' or 'csv'", param="format",
                           code="invalid_value")
        return f

    async def tenant_report(policy: Policy, tenant: str, days: int) -> dict[str, Any]:
        if store is None:
            raise ApiError(503, "usage needs Redis, which is not configured", code="accounting_unavailable")
        try:
            async with asyncio.timeout(2.0):
                agg, status = await asyncio.gather(store.aggregates(tenant, days, day()), store.status(tenant))
        except Exception:
            raise ApiError(503, "the usage store is unavailable; retry shortly", code="accounting_unavailable",
                           headers={"Retry-After": "2"}) from None
        b = policy.tenants[tenant].budgets
        return report(tenant, agg, days, day(), budget_view(b.daily_usd, b.monthly_usd, status),
                      {name: t.gpu_cost_per_hour for name, t in policy.tiers.items()})

    def reply(reports: list[dict[str, Any]], fmt: str, single: bool) -> Response[bytes]:
        if fmt == "csv":
            return Response(content=to_csv(reports).encode(), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": 'attachment; filename="tiergate-usage.csv"'})
        body = reports[0] if single else {"object": "list", "data": reports}
        return Response(content=_enc.encode(body), media_type="application/json")

    @get("/v1/usage", summary="The calling tenant's usage by day and tier (JSON or CSV)")
    async def my_usage(request: Request[Any, Any, Any]) -> Response[bytes]:
        policy, keys = current()
        try:
            guard.check(client_host(request))
            auth = request.headers.get("authorization")
            tenant = keys.tenant_for(auth)
            if tenant is None:
                guard.fail_if_sent(client_host(request), auth)
                raise ApiError(401, "missing or invalid API key", code="invalid_api_key")
            return reply([await tenant_report(policy, tenant, days_param(request))], fmt_param(request), True)
        except ApiError as exc:
            return err(exc)

    @get("/admin/usage", summary="Every tenant's usage (admin key)")
    async def admin_usage(request: Request[Any, Any, Any]) -> Response[bytes]:
        policy, keys = current()
        try:
            guard.check(client_host(request))
            auth = request.headers.get("authorization")
            if not keys.is_admin(auth):
                if keys.tenant_for(auth) is not None:
                    raise ApiError(403, "this endpoint needs an admin key; tenant keys may use /v1/usage",
                                   code="admin_only")
                guard.fail_if_sent(client_host(request), auth)
                raise ApiError(401, "missing or invalid admin key", code="invalid_api_key")
            wanted = request.query_params.get("tenant")
            if wanted is not None and wanted not in policy.tenants:
                raise ApiError(404, f"unknown tenant '{wanted}'", param="tenant", code="tenant_not_found")
            names = [wanted] if wanted else list(policy.tenants)
            days = days_param(request)
            reports = list(await asyncio.gather(*(tenant_report(policy, t, days) for t in names)))
            return reply(reports, fmt_param(request), False)
        except ApiError as exc:
            return err(exc)

    @get("/dashboard.css", summary="Dashboard stylesheet", include_in_schema=False)
    async def css() -> Response[bytes]:
        return Response(content=dashboard.CSS.encode(), media_type="text/css",
                        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})

    @get(["/favicon.svg", "/favicon.ico"], summary="Dashboard icon", include_in_schema=False)
    async def icon() -> Response[bytes]:
        return Response(content=dashboard.FAVICON, media_type="image/svg+xml",
                        headers={"Cache-Control": "max-age=86400"})

    @get("/dashboard", summary="Cost dashboard (HTML)", include_in_schema=False)
    async def dash(request: Request[Any, Any, Any]) -> Response[bytes]:
        policy, keys = current()
        auth = request.headers.get("authorization")
        try:
            guard.check(client_host(request))
        except ApiError as exc:
            return Response(content=exc.body(), status_code=429, media_type="application/json",
                            headers={**exc.headers, **_SECURITY})
        admin = keys.is_admin(auth, allow_basic=True)
        tenant = None if admin else keys.tenant_for(auth, allow_basic=True)
        if not admin and tenant is None:
            guard.fail_if_sent(client_host(request), auth)
            return Response(content=b"sign in with your API key as the password", status_code=401,
                            media_type="text/plain", headers={"WWW-Authenticate": 'Basic realm="tiergate"',
                                                              **_SECURITY})
        try:
            days = days_param(request, 14)
            wanted = request.query_params.get("tenant")
            if admin and wanted is not None and wanted not in policy.tenants:
                raise ApiError(404, f"unknown tenant '{wanted}'", param="tenant", code="tenant_not_found")
            show = wanted if admin else tenant   # a tenant key always sees its own tenant, whatever it asks
            rep = await tenant_report(policy, show, days) if show else None
            rows = None
            if admin and not wanted:
                rows = []
                for r in await asyncio.gather(*(tenant_report(policy, name, days) for name in policy.tenants)):
                    name, t, bud = r["tenant"], r["totals"], r["budget"]
                    rows.append({"name": name, "requests": f"{t['requests']:,}",
                                 "tokens": f"{t['prompt_tokens'] + t['completion_tokens']:,}",
                                 "cost": f"{t['cost_usd']:.4f}",
                                 "today": _of(bud.get("spent_today_usd"), bud.get("daily_usd")),
                                 "month": _of(bud.get("spent_month_usd"), bud.get("monthly_usd"))})
        except ApiError as exc:
            return Response(content=exc.body(), status_code=exc.status, media_type="application/json",
                            headers=_SECURITY)
        html = dashboard.render(title=f"tenant {show}" if show else "all tenants", rep=rep, tenants=rows,
                                days=days, baseline=baseline_tier(policy), admin=admin, today=day())
        return Response(content=html.encode(), media_type="text/html; charset=utf-8", headers=_SECURITY)

    return [my_usage, admin_usage, css, icon, dash]


def _of(spent: float | None, limit: float | None) -> str:
    s = "-" if spent is None else f"${spent:.4f}"
    return s + ("" if limit is None else f" / ${limit:.2f}")
