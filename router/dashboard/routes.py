"""The dashboard's HTTP side: sign-in and sign-out, a tenant's page, the admin's fleet view and its data.

* `GET /dashboard/login`, `POST /dashboard/login` (form field `key`): a valid key becomes a session
  (router/dashboard/session.py) and a 303 to the dashboard; a wrong one is a failed key check, throttled
  per client address with every other one (router/throttle.py): 429 with Retry-After once used up.
* `POST /dashboard/logout`: ends the session (a POST, refused cross-site: no link or image can sign you out).
* `GET /dashboard`: a tenant's page (the admin: `?tenant=`; without it, a 303 to the fleet view).
* `GET /dashboard/admin`: the fleet (admin only); `?format=json|csv&view=<view>` gives its data.
* `GET /admin/fleet`: the same data for scripts, with `Authorization: Bearer <admin key>`.

Credentials: a session cookie, or `Authorization: Bearer <key>` (scripts; a browser never sends one on its
own, so it needs no CSRF defence). HTTP Basic is refused: browsers cache it with no way to sign out, offer
to save the key, and send it to every page of the origin. Keys and cookies are never logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import msgspec
from litestar import Request, Response, Router, get, post

from policies.schema import Policy
from router.accounting import baseline_tier
from router.auth import Identity, KeyIndex
from router.dashboard import fleet, pages
from router.dashboard.fleet_page import fleet_page
from router.dashboard.session import SessionConfig
from router.dashboard.style import CSP, CSS, FAVICON, tier_colours
from router.errors import ApiError
from router.logs import get_logger
from router.throttle import FailureThrottle
from router.usage_routes import UsageSource, check_admin, choice_param, client_host, err, int_param

SECURITY = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store"}
MAX_FORM_BYTES = 4096
_enc = msgspec.json.Encoder()


def html(text: str, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(content=text.encode(), status_code=status, media_type="text/html; charset=utf-8",
                    headers={**SECURITY, **(headers or {})})


def redirect(to: str) -> Response[bytes]:
    return Response(content=b"", status_code=303, headers={"Location": to, **SECURITY})


def same_origin(request: Request[Any, Any, Any]) -> bool:
    """A form POST from our own pages: Sec-Fetch-Site says so, else Origin matches Host (neither: not a browser)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")


def form_identity(body: bytes, keys: KeyIndex) -> tuple[Identity | None, bool]:
    """(whose key the sign-in form carries, whether it carried one). Kept apart so that the key is no local of
    the handler (a traceback printed with its locals shows no key). ValueError: more than 8 form fields."""
    if len(body) > MAX_FORM_BYTES:
        return None, True
    key = (parse_qs(body.decode("utf-8", "replace"), max_num_fields=8).get("key") or [""])[0].strip()
    return (keys.identify(key), True) if key else (None, False)


class Dashboard:
    def __init__(self, current: Callable[[], tuple[Policy, KeyIndex]], source: UsageSource, guard: FailureThrottle,
                 sessions: SessionConfig) -> None:
        self.current, self.source, self.guard, self.sessions = current, source, guard, sessions
        self.log = get_logger("tiergate.dashboard")

    def clock(self) -> float:
        return self.sessions.clock()

    def who(self, request: Request[Any, Any, Any], keys: KeyIndex) -> tuple[Identity | None, bool]:
        """(who is asking, whether by session). A Bearer header wins; anything else in Authorization is no one."""
        auth = request.headers.get("authorization")
        if auth:
            bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            return keys.identify(bearer), False
        data = request.session
        sub = data.get("sub") if data else None
        ident = keys.identify_digest(sub) if isinstance(sub, str) else None
        if data and ident is None:
            request.clear_session()         # its key was revoked (or the session is malformed): signed out
        return ident, ident is not None

    def gate(self, request: Request[Any, Any, Any],
             keys: KeyIndex) -> tuple[Identity | None, bool, Response[bytes] | None]:
        """Who may see the page, or the answer instead: 429 (throttled), 401 (a wrong key), 303 (sign in)."""
        host = client_host(request)
        try:
            self.guard.check(host)
        except ApiError as exc:
            return None, False, err(exc, SECURITY)
        ident, by_session = self.who(request, keys)
        if ident is not None:
            return ident, by_session, None
        auth = request.headers.get("authorization")
        if not auth:
            return None, False, redirect("/dashboard/login")
        self.guard.fail_if_sent(host, auth)
        return None, False, Response(
            content=b"invalid key: send Authorization: Bearer <key>, or sign in at /dashboard/login "
                    b"(HTTP Basic is not accepted)", status_code=401, media_type="text/plain", headers=SECURITY)

    def shell(self, ident: Identity, by_session: bool, title: str) -> dict[str, Any]:
        return {"title": title, "who": "admin" if ident.admin else f"tenant {ident.tenant}", "admin": ident.admin,
                "session": by_session}

    async def tenant_page(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        policy, keys = self.current()
        ident, by_session, answer = self.gate(request, keys)
        if ident is None:
            return answer or redirect("/dashboard/login")
        try:
            days = int_param(request, "days", 1, 400, 14)
            wanted = request.query_params.get("tenant") if ident.admin else ident.tenant
            if wanted is None:
                return redirect("/dashboard/admin?" + urlencode({"days": days}))
            if wanted not in policy.tenants:
                raise ApiError(404, f"unknown tenant '{wanted}'", param="tenant", code="tenant_not_found")
            rep = await self.source.tenant(policy, wanted, days)
        except ApiError as exc:
            return err(exc, SECURITY)
        return html(pages.tenant_page(rep, colours=tier_colours(policy.tiers), today=self.source.today(),
                                      **self.shell(ident, by_session, f"tenant {wanted}")))

    async def fleet(self, request: Request[Any, Any, Any], policy: Policy, fmt: str,
                    shell: dict[str, Any] | None = None) -> Response[bytes]:
        days = int_param(request, "days", 1, 400, 14)
        view = request.query_params.get("view")
        if view is not None and view not in fleet.VIEWS:
            raise ApiError(400, f"query parameter 'view' must be one of: {', '.join(fleet.VIEWS)}", param="view",
                           code="invalid_value")
        if fmt == "csv" and view is None:
            raise ApiError(400, "format=csv needs a view (one table per file): "
                           f"view={' | '.join(fleet.VIEWS)}", param="view", code="invalid_value")
        sort = choice_param(request, "sort", fleet.BUDGET_SORTS, "used")
        desc = choice_param(request, "dir", ("asc", "desc"), "desc") == "desc"
        reports = await self.source.tenants(policy, list(policy.tenants), days)
        v = fleet.views(reports, classes=list(policy.slo_classes), tiers=list(policy.tiers),
                        per_hour={t: s.gpu_cost_per_hour for t, s in policy.tiers.items()})
        v["budgets"] = fleet.sort_budgets(v["budgets"], sort, desc)
        if fmt == "csv" and view is not None:
            return Response(content=fleet.to_csv(v[view]).encode(), media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": f'attachment; filename="tiergate-{view}.csv"'})
        head = {"days": days, "baseline_tier": baseline_tier(policy)}
        body = {"object": "fleet." + view, **head, "data": v[view]} if view else {"object": "fleet", **head, "views": v}
        if fmt == "json":
            return Response(content=_enc.encode(body), media_type="application/json")
        return html(fleet_page(v, reports, colours=tier_colours(policy.tiers), baseline=baseline_tier(policy),
                               today=self.source.today(), days=days, sort=sort, desc=desc, **(shell or {})))

    async def admin_page(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        policy, keys = self.current()
        ident, by_session, answer = self.gate(request, keys)
        if ident is None:
            return answer or redirect("/dashboard/login")
        if not ident.admin:
            return html(pages.render("message", message="The fleet view needs the admin key.",
                                     **self.shell(ident, by_session, "admin only")), 403)
        try:
            fmt = choice_param(request, "format", ("html", "json", "csv"), "html")
            return await self.fleet(request, policy, fmt, self.shell(ident, by_session, "fleet"))
        except ApiError as exc:
            return err(exc, SECURITY)

    async def fleet_api(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        policy, keys = self.current()
        try:
            check_admin(self.guard, keys, request)
            return await self.fleet(request, policy, choice_param(request, "format", ("json", "csv"), "json"))
        except ApiError as exc:
            return err(exc)

    async def sign_in(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        _, keys = self.current()
        host = client_host(request)
        page = pages.login_page
        if not same_origin(request):
            return html(page("This sign-in came from another site and was refused.", self.max_age()), 403)
        wait = self.guard.retry_after(host)
        if wait is not None:
            self.log.info("dashboard_sign_in", outcome="throttled", client=host)
            return html(page(f"Too many failed sign-ins from this address: try again in {wait} s.", self.max_age()),
                        429, {"Retry-After": str(wait)})
        try:
            ident, sent = form_identity(await request.body(), keys)    # the key never becomes a local here
        except ValueError:   # more fields than a sign-in form has: refused before anything else is read
            self.guard.fail_if_sent(host, "sent")
            return html(page("The sign-in form carries one field, 'key'.", self.max_age()), 400)
        if ident is None:
            self.guard.fail_if_sent(host, "sent" if sent else None)
            self.log.info("dashboard_sign_in", outcome="invalid_key" if sent else "no_key", client=host)
            return html(page("That key was not recognised." if sent else "Enter an API key.", self.max_age()), 401)
        now = self.clock()
        request.set_session({"sub": ident.digest, "iat": now, "exp": now + self.max_age()})
        self.log.info("dashboard_sign_in", outcome="ok", role="admin" if ident.admin else "tenant",
                      tenant=ident.tenant, client=host)
        return redirect("/dashboard/admin" if ident.admin else "/dashboard")

    def max_age(self) -> int:
        return int(self.sessions.max_age)

    async def sign_out(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        if not same_origin(request):
            return html(pages.login_page("This sign-out came from another site and was refused.", self.max_age()),
                        403)
        if request.session:
            self.log.info("dashboard_sign_out", client=client_host(request))
        request.clear_session()
        return redirect("/dashboard/login")

    async def login_form(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        _, keys = self.current()
        if request.session and self.who(request, keys)[0] is not None:
            return redirect("/dashboard")
        return html(pages.login_page("", self.max_age()))


def dashboard_router(current: Callable[[], tuple[Policy, KeyIndex]], source: UsageSource, guard: FailureThrottle,
                     sessions: SessionConfig) -> Router:
    """The dashboard's handlers, behind the session middleware (which no other route runs)."""
    d = Dashboard(current, source, guard, sessions)
    hidden: dict[str, Any] = {"include_in_schema": False}

    @get("/dashboard", summary="Cost dashboard (HTML)", **hidden)
    async def tenant(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await d.tenant_page(request)

    @get("/dashboard/admin", summary="Fleet view (HTML, JSON, CSV; admin)", **hidden)
    async def admin(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await d.admin_page(request)

    @get("/admin/fleet", summary="Fleet views as JSON or CSV (admin key)")
    async def fleet_api(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await d.fleet_api(request)

    @get("/dashboard/login", summary="Dashboard sign-in form", **hidden)
    async def login_form(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await d.login_form(request)

    @post("/dashboard/login", summary="Dashboard sign-in", status_code=303, **hidden)
    async def login(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await d.sign_in(request)

    @post("/dashboard/logout", summary="Dashboard sign-out", status_code=303, **hidden)
    async def logout(request: Request[Any, Any, Any]) -> Response[bytes]:
        return await d.sign_out(request)

    @get("/dashboard.css", summary="Dashboard stylesheet", **hidden)
    async def css() -> Response[bytes]:
        return Response(content=CSS.encode(), media_type="text/css",
                        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})

    @get(["/favicon.svg", "/favicon.ico"], summary="Dashboard icon", **hidden)
    async def icon() -> Response[bytes]:
        return Response(content=FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    return Router(path="/", route_handlers=[tenant, admin, fleet_api, login_form, login, logout, css, icon],
                  middleware=[sessions.middleware])
