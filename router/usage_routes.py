"""HTTP handlers for usage and cost: GET /v1/usage and GET /admin/usage (the dashboard: router/dashboard/).

* `/v1/usage`: the calling tenant's own usage by day and tier (`?days=1..400`,
  `?format=csv`), with its budget state. A tenant key sees only its own tenant.
* `/admin/usage`: every tenant (or `?tenant=`), behind an admin key; tenant keys get 403.

Both take `Authorization: Bearer <key>` only. Failed key checks are throttled per client address
(router/throttle.py): 429 with Retry-After. `days` is parsed strictly: ASCII digits only (`'²'.isdigit()`
is true, and `int()` refuses it), at most 3 of them, then the bounds; anything else is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response, get

from policies.schema import Policy
from router.accounting import Accountant, baseline_tier
from router.auth import KeyIndex
from router.errors import ApiError
from router.lifecycle.ports import BudgetLedger
from router.throttle import FailureThrottle
from router.usage import budget_view, report, to_csv

_enc = msgspec.json.Encoder()


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


def choice_param(request: Request[Any, Any, Any], name: str, options: tuple[str, ...], default: str) -> str:
    value = request.query_params.get(name, default)
    if value not in options:
        raise ApiError(400, f"query parameter '{name}' must be one of: {', '.join(options)}", param=name,
                       code="invalid_value")
    return value


def client_host(request: Request[Any, Any, Any]) -> str | None:
    return request.client.host if request.client is not None else None


def baseline_allowed(policy: Policy, tenant: str) -> bool:
    """The tenant may use the baseline tier (else no request of its has an alternative there)."""
    allowed = policy.tenants[tenant].allowed_tiers
    return "*" in allowed or baseline_tier(policy) in allowed


class UsageSource:
    """Tenant usage reports from the ledger, for the usage API, the dashboard and the fleet views."""

    def __init__(self, store: BudgetLedger | None, today: Callable[[], dt.date] | None = None) -> None:
        self.store = store
        self.today = today or (lambda: dt.datetime.now(dt.UTC).date())

    async def tenant(self, policy: Policy, tenant: str, days: int) -> dict[str, Any]:
        if self.store is None:
            raise ApiError(503, "usage needs Redis, which is not configured", code="accounting_unavailable")
        today = self.today()
        try:
            async with asyncio.timeout(2.0):
                agg, status = await asyncio.gather(self.store.aggregates(tenant, days, today),
                                                   self.store.status(tenant))
        except Exception:
            raise ApiError(503, "the usage store is unavailable; retry shortly", code="accounting_unavailable",
                           headers={"Retry-After": "2"}) from None
        b = policy.tenants[tenant].budgets
        return report(tenant, agg, days, today, budget_view(b.daily_usd, b.monthly_usd, status),
                      baseline=baseline_tier(policy), baseline_allowed=baseline_allowed(policy, tenant),
                      gpu_per_hour={t: s.gpu_cost_per_hour for t, s in policy.tiers.items()})

    async def tenants(self, policy: Policy, names: list[str], days: int) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.tenant(policy, t, days) for t in names)))


def err(exc: ApiError, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(content=exc.body(), status_code=exc.status, media_type="application/json",
                    headers={**exc.headers, **(headers or {})})


def usage_handlers(current: Callable[[], tuple[Policy, KeyIndex]], accountant: Accountant,
                   today: Callable[[], dt.date] | None = None, throttle: FailureThrottle | None = None) -> list[Any]:
    """`current`: the running policy and its key index (a reload swaps them; each request takes them once).
    `throttle`: failed key checks per client address (router/throttle.py); default: its defaults."""
    source = UsageSource(accountant.store, today)
    guard = throttle if throttle is not None else FailureThrottle()   # (an empty one is falsy: it has a len)

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
            days = int_param(request, "days", 1, 400, 30)
            fmt = choice_param(request, "format", ("json", "csv"), "json")
            return reply([await source.tenant(policy, tenant, days)], fmt, True)
        except ApiError as exc:
            return err(exc)

    @get("/admin/usage", summary="Every tenant's usage (admin key)")
    async def admin_usage(request: Request[Any, Any, Any]) -> Response[bytes]:
        policy, keys = current()
        try:
            check_admin(guard, keys, request)
            wanted = request.query_params.get("tenant")
            if wanted is not None and wanted not in policy.tenants:
                raise ApiError(404, f"unknown tenant '{wanted}'", param="tenant", code="tenant_not_found")
            days = int_param(request, "days", 1, 400, 30)
            fmt = choice_param(request, "format", ("json", "csv"), "json")
            return reply(await source.tenants(policy, [wanted] if wanted else list(policy.tenants), days), fmt, False)
        except ApiError as exc:
            return err(exc)

    return [my_usage, admin_usage]


def check_admin(guard: FailureThrottle, keys: KeyIndex, request: Request[Any, Any, Any]) -> None:
    """An admin bearer key, else 401 (counted as a failed check when a key was sent) or 403 for a tenant key."""
    guard.check(client_host(request))
    auth = request.headers.get("authorization")
    if keys.is_admin(auth):
        return
    if keys.tenant_for(auth) is not None:
        raise ApiError(403, "this endpoint needs an admin key; tenant keys may use /v1/usage", code="admin_only")
    guard.fail_if_sent(client_host(request), auth)
    raise ApiError(401, "missing or invalid admin key", code="invalid_api_key")
