"""HTTP handlers: the dry-run (`POST /v1/route`) and the decision-record lookup (`GET /admin/decisions/{id}`).

`POST /v1/route` takes the body of a chat or completions request and answers the routing decision a live
request with that body would get now (router/gateway.py `Gateway.dry_run`, the document in
router/explain.py), without admitting, forwarding or recording anything. Which kind: `?kind=chat` or
`?kind=completions`, else `messages` means chat and `prompt` completions. Bad input gets the same OpenAI
error as the live endpoint (the same parse, route and tokenize code); a valid request that no candidate
can serve gets 200 with `chosen: null` and the refusal the live path would answer in `error`.
Who: a tenant key dry-runs as its own tenant (no key: the policy's anonymous tenant, as live). The admin
key dry-runs as any tenant named in `x-tiergate-tenant` (required with it: the admin key is no tenant); a
tenant key may name only itself there (else 403). Failed admin checks are throttled per address.

`GET /admin/decisions/{request_id}`: the newest decision record of that request id (admin key), 404 when
the stream holds none, 409 when decision records are off, 503 when Redis does not answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath

from router.decision_records import RedisDecisionRecords
from router.errors import ApiError
from router.gateway import Gateway
from router.limits import RequestLimits
from router.live_policy import PolicyView
from router.logs import bind_request, get_logger
from router.throttle import FailureThrottle

__all__ = ["decision_handlers", "dry_run_kind"]

_enc = msgspec.json.Encoder()
_JSON = "application/json"
LOOKUP_TIMEOUT_S = 5.0


class _Kind(msgspec.Struct):
    messages: msgspec.Raw = msgspec.Raw()     # undecoded: only whether the field is there
    prompt: msgspec.Raw = msgspec.Raw()


_kind_dec = msgspec.json.Decoder(_Kind)


def dry_run_kind(query: str | None, raw: bytes) -> str:
    """chat | completions: as `?kind=` says, else from the body's fields (an undecodable body: chat, whose
    parser then answers the error)."""
    if query is not None:
        if query not in ("chat", "completions"):
            raise ApiError(400, "query parameter 'kind' must be chat or completions", param="kind",
                           code="invalid_value")
        return query
    try:
        k = _kind_dec.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return "chat"
    if k.messages and k.prompt:
        raise ApiError(400, "the body has both 'messages' (chat) and 'prompt' (completions): name the kind "
                            "with ?kind=chat or ?kind=completions", param="kind", code="ambiguous_kind")
    return "completions" if k.prompt and not k.messages else "chat"


def _host(request: Request[Any, Any, Any]) -> str | None:
    return request.client.host if request.client is not None else None


def decision_handlers(gw: Gateway, limits: RequestLimits, throttle: FailureThrottle,
                      records: RedisDecisionRecords | None) -> list[Any]:
    log = get_logger("tiergate.route")

    def render(status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Response[bytes]:
        return Response(content=body, status_code=status, media_type=_JSON, headers=dict(headers or {}))

    def tenant_for(v: PolicyView, request: Request[Any, Any, Any]) -> str:
        auth = request.headers.get("authorization")
        want = request.headers.get("x-tiergate-tenant")
        if want is None:
            if v.keys.is_admin(auth):
                raise ApiError(400, "the admin key is no tenant: name the tenant to dry-run as in the "
                                    "x-tiergate-tenant header", param="x-tiergate-tenant", code="missing_field")
            return gw.tenant(auth, v)
        host = _host(request)
        throttle.check(host)
        if v.keys.is_admin(auth):
            if want not in v.policy.tenants:
                raise ApiError(404, f"no tenant named '{want[:100]}' in the policy", param="x-tiergate-tenant",
                               code="tenant_not_found")
            return want
        own = v.keys.tenant_for(auth)
        if own is None:
            throttle.fail_if_sent(host, auth)
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        if own != want:
            raise ApiError(403, "only the admin key may dry-run as another tenant", param="x-tiergate-tenant",
                           code="admin_only")
        return own

    @post("/v1/route", status_code=200, summary="Dry-run: the routing decision for a request, not sent")
    async def route(request: Request[Any, Any, Any]) -> Response[bytes]:
        rid = bind_request(request.headers.get("x-request-id"))
        raw = b""
        v = gw.view
        tenant: str | None = None
        try:
            raw = await limits.read(request.receive, request.headers.get("content-length"), v)
            tenant = tenant_for(v, request)
            kind = dry_run_kind(request.query_params.get("kind"), raw)
            doc = await gw.dry_run(v, tenant, kind, raw, rid, request.headers)
        except ApiError as exc:
            log.info("dry_run", request_id=rid, tenant=tenant, status=exc.status, error=exc.code, param=exc.param)
            return render(exc.status, exc.body(), {"x-request-id": rid, **exc.headers})
        finally:
            limits.done(len(raw))
        log.info("dry_run", request_id=rid, tenant=tenant, route=doc["route"], chosen=doc["chosen"], status=200)
        return render(200, _enc.encode(doc), {"x-request-id": rid})

    @get("/admin/decisions/{request_id:str}", summary="A request's decision record (admin key)")
    async def decision(request: Request[Any, Any, Any], request_id: FromPath[str]) -> Response[bytes]:
        auth = request.headers.get("authorization")
        host = _host(request)
        v = gw.view
        try:
            throttle.check(host)
            if not v.keys.is_admin(auth):
                if v.keys.tenant_for(auth):
                    raise ApiError(403, "this endpoint needs an admin key", code="admin_only")
                throttle.fail_if_sent(host, auth)
                raise ApiError(401, "missing or invalid admin key", code="invalid_api_key")
            if records is None:
                raise ApiError(409, "decision records are off on this router (no Redis, or "
                                    "decision_records_max is 0)", code="decision_records_off")
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                    found = await records.lookup(request_id[:128])
            except Exception as exc:
                raise ApiError(503, f"the decision records could not be read ({type(exc).__name__})",
                               code="store_unavailable", headers={"Retry-After": "1"}) from None
            if found is None:
                raise ApiError(404, f"no decision record for request id '{request_id[:128]}' (the last "
                                    f"~{records.maxlen} are kept)", param="request_id", code="not_found")
        except ApiError as exc:
            return render(exc.status, exc.body(), exc.headers)
        return render(200, _enc.encode(found))

    return [route, decision]
