"""The OpenAPI 3.1 document and the docs page, served offline.

* `GET /schema/openapi.json`: every endpoint, with request bodies in OpenAI's shapes, responses,
  OpenAI-shaped errors, the bearer scheme and the headers the router reads and sets. Schemas are
  generated from the docs-only Structs in router/openapi_models.py; the handlers keep taking the
  raw body, so nothing here touches the hot path.
* `GET /schema`: Swagger UI, its JS and CSS served from the installed `swagger-ui-bundle-v2`
  package and our own page and initializer (router/openapi_static/, package data). No CDN.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import msgspec
from litestar import Response, get
from litestar.params import FromPath

from router.errors import error_body
from router.openapi_models import schema_components

OPENAPI_JSON = "/schema/openapi.json"
_JSON = "application/json"
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self' data:; base-uri 'none'; frame-ancestors 'none'")


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {_JSON: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


_RID = {"$ref": "#/components/headers/x-request-id"}
_RETRY = {"$ref": "#/components/headers/Retry-After"}
_ERRORS = {
    400: "Bad input: the message names the field (`param`).",
    401: "Missing or invalid API key.",
    403: "This key may not use this model, tier or endpoint.",
    404: "Unknown model (or no such endpoint).",
    409: "Conflict with the router's state.",
    413: "The body exceeds the router's size limit.",
    422: "The policy file is invalid; the running policy stays.",
    429: "A rate limit or budget is spent (or a backend said 429); see Retry-After when present.",
    502: "A backend answered with something that is not a valid response.",
    503: "No backend can serve this now; retry after Retry-After seconds.",
}


def _errors(*codes: int) -> dict[str, Any]:
    out = {}
    for code in codes:
        headers = {"x-request-id": _RID} | ({"Retry-After": _RETRY} if code in (429, 503) else {})
        out[str(code)] = _json(_ref("ErrorResponse"), _ERRORS[code], headers)
    return out


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_ROUTED_HEADERS = {
    "x-request-id": _RID,
    "x-tiergate-tier": {"description": "The tier that served the request.", "schema": {"type": "string"}},
    "x-tiergate-instance": {"description": "The instance that served the request.", "schema": {"type": "string"}},
    "x-tiergate-overhead-ms": {"description": "Time the router spent before dispatch, in ms.",
                               "schema": {"type": "string"}},
    "x-tiergate-decision": {"description": "The routing decision as JSON (only when the router exposes it).",
                            "schema": {"type": "string"}},
    "x-tiergate-explain": {"description": "With `x-tiergate-explain: 1`, not streamed: the decision "
                                          "(RouteDecision) as compact ASCII JSON, at most 8,000 bytes (candidates "
                                          "past that are left out, with a `truncated` note).",
                           "schema": {"type": "string"}},
}
_REQUEST_HEADERS = [
    {"$ref": "#/components/parameters/x-request-id"},
    {"name": "x-tiergate-slo-class", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "An SLO class from the policy (else the tenant's default)."},
    {"name": "x-slo-ttft-ms", "in": "header", "required": False,
     "schema": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 86400000},
     "description": "A time-to-first-token target in ms; overrides the class's."},
    {"name": "x-slo-tpot-ms", "in": "header", "required": False,
     "schema": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 86400000},
     "description": "A time-per-output-token target in ms; overrides the class's."},
]
_EXPLAIN = {"name": "x-tiergate-explain", "in": "header", "required": False, "schema": {"type": "string",
                                                                                     "enum": ["1", "true", "yes"]},
            "description": "Return the routing decision: the x-tiergate-explain response header, or for a stream "
                           "one chunk before `[DONE]` with empty `choices` and a `tiergate_explain` member "
                           "(RouteDecision)."}
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
_KEY_OR_ANON: list[dict[str, list[str]]] = [{"bearer": []}, {}]  # no key: the policy's anonymous tenant, if any
_PUBLIC: list[dict[str, list[str]]] = []


def _routed(summary: str, request: str, reply: str, stream_event: str) -> dict[str, Any]:
    sse = {"type": "string", "description": f"Server-sent events: each `data:` line holds one {stream_event} "
                                            "as JSON; the stream ends with `data: [DONE]`. A stream cut after "
                                            "the first byte ends with a `data:` line holding an ErrorResponse.",
           "x-event-schema": _ref(stream_event)}
    return {"post": {
        "summary": summary, "tags": ["OpenAI"], "security": _KEY_OR_ANON, "parameters": [*_REQUEST_HEADERS, _EXPLAIN],
        "requestBody": {"required": True, "content": {_JSON: {"schema": _ref(request)}}},
        "responses": {"200": {"description": "The tier's answer, relayed (`stream` true: an event stream).",
                              "headers": _ROUTED_HEADERS,
                              "content": {_JSON: {"schema": _ref(reply)}, "text/event-stream": {"schema": sse}}},
                      **_errors(400, 401, 403, 404, 413, 429, 502, 503)}}}


_DAYS = _query("days", {"type": "integer", "minimum": 1, "maximum": 400}, "How many days back, today included.")
_FORMAT = _query("format", {"type": "string", "enum": ["json", "csv"], "default": "json"}, "json or csv.")
_TENANT = _query("tenant", {"type": "string"}, "One tenant (admin keys only).")
_CSV = {"text/csv": {"schema": {"type": "string"}}}


def _paths() -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "/v1/chat/completions": _routed("Chat completion, routed to a tier", "ChatCompletionRequest",
                                        "ChatCompletion", "ChatCompletionChunk"),
        "/v1/completions": _routed("Text completion, routed to a tier", "CompletionRequest", "Completion",
                                   "Completion"),
        "/v1/route": _dry_run(),
        "/admin/decisions/{request_id}": {"get": {
            "summary": "A request's decision record, estimated next to actual (admin key)", "tags": ["Admin"],
            "security": _BEARER,
            "parameters": [{"name": "request_id", "in": "path", "required": True,
                            "schema": {"type": "string", "maxLength": 128}, "description": "The x-request-id."}],
            "responses": {"200": _json(_ref("DecisionRecord"), "The newest record of that request id."),
                          **_errors(401, 403, 404, 409, 429, 503)}}},
        "/v1/models": {"get": {"summary": "Virtual models this key may use, and their tiers", "tags": ["OpenAI"],
                               "security": _KEY_OR_ANON,
                               "responses": {"200": _json(_ref("ModelList"), "The models."), **_errors(401)}}},
        "/v1/usage": {"get": {
            "summary": "The calling tenant's usage by day and tier", "tags": ["Usage"], "security": _BEARER,
            "parameters": [_DAYS, _FORMAT],
            "responses": {"200": {"description": "The report.",
                                  "content": {_JSON: {"schema": _ref("UsageReport")}, **_CSV}},
                          **_errors(400, 401, 503)}}},
        "/admin/usage": {"get": {
            "summary": "Every tenant's usage (admin key)", "tags": ["Admin"], "security": _BEARER,
            "parameters": [_DAYS, _FORMAT, _TENANT],
            "responses": {"200": {"description": "One report per tenant.",
                                  "content": {_JSON: {"schema": _ref("UsageReportList")}, **_CSV}},
                          **_errors(400, 401, 403, 404, 503)}}},
        "/admin/policy/reload": {"post": {
            "summary": "Reload the policy file now (admin key)", "tags": ["Admin"], "security": _BEARER,
            "responses": {"200": _json(_ref("ReloadResult"), "Reloaded, or unchanged."),
                          **_errors(401, 403, 409, 422)}}},
        "/health": {"get": {"summary": "Liveness", "tags": ["Operations"], "security": _PUBLIC,
                            "responses": {"200": _json(_ref("Health"), "The process is up.")}}},
        "/ready": {"get": {"summary": "Readiness: policy loaded and a tier reachable", "tags": ["Operations"],
                           "security": _PUBLIC,
                           "responses": {"200": _json(_ref("Readiness"), "Ready."),
                                         "503": _json(_ref("Readiness"), "No tier is reachable.")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "tags": ["Operations"], "security": _PUBLIC,
                             "responses": {"200": {"description": "Prometheus text format 0.0.4.",
                                                   "content": text}}}},
        **_dashboard(text),
        "/dashboard.css": _asset("The dashboard's stylesheet", "text/css"),
        "/favicon.svg": _asset("The icon", "image/svg+xml"),
        "/favicon.ico": _asset("The icon (SVG)", "image/svg+xml"),
        "/schema": _asset("This API's docs (Swagger UI, served locally)", "text/html"),
        OPENAPI_JSON: {"get": {"summary": "This OpenAPI document", "tags": ["Docs"], "security": _PUBLIC,
                               "responses": {"200": {"description": "OpenAPI 3.1.",
                                                     "content": {_JSON: {"schema": {"type": "object"}}}}}}},
        "/schema/assets/{name}": {"get": {
            "summary": "The docs page's scripts and styles", "tags": ["Docs"], "security": _PUBLIC,
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": {"type": "string", "enum": sorted(_ASSETS)}}],
            "responses": {"200": {"description": "The file.", "content": {"*/*": {"schema": {"type": "string"}}}},
                          **_errors(404)}}},
    }


def _dashboard(text: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's pages (router/dashboard/routes.py): HTML for browsers, a session or a bearer key."""
    html = {"text/html": {"schema": {"type": "string"}}}
    form = {"application/x-www-form-urlencoded": {"schema": {
        "type": "object", "required": ["key"], "properties": {"key": {"type": "string"}}}}}
    see = {"description": "To the sign-in form, or the page signed in to.",
           "headers": {"Location": {"schema": {"type": "string"}}}}
    sec: list[dict[str, list[str]]] = [{"session": []}, {"bearer": []}]
    view = _query("view", {"type": "string", "enum": ["daily_tenant", "daily_tier", "top", "savings", "slo", "gpu",
                                                      "budgets"]}, "One view (required with format=csv).")
    sort = [_query("sort", {"type": "string", "enum": ["tenant", "today", "month", "used", "spend"]},
                   "The budget table's order."), _query("dir", {"type": "string", "enum": ["asc", "desc"]}, "")]
    fleet_fmt = _query("format", {"type": "string", "enum": ["html", "json", "csv"], "default": "html"}, "")
    data = {_JSON: {"schema": {"type": "object"}}, **_CSV}
    return {
        "/dashboard": {"get": {
            "summary": "A tenant's cost page (HTML); the admin names one with ?tenant=", "tags": ["Usage"],
            "security": sec, "parameters": [_DAYS, _TENANT],
            "responses": {"200": {"description": "The page.", "content": html}, "303": see,
                          "401": {"description": "A wrong key (HTTP Basic is refused).", "content": text},
                          **_errors(400, 404, 429, 503)}}},
        "/dashboard/admin": {"get": {
            "summary": "The fleet (admin): spend by day, tenant and tier, top tenants, savings, SLO attainment, "
                       "GPU-hours, budgets", "tags": ["Admin"], "security": sec,
            "parameters": [_DAYS, fleet_fmt, view, *sort],
            "responses": {"200": {"description": "The page, or a view's data.", "content": {**html, **data}},
                          "303": see, "401": {"description": "A wrong key.", "content": text},
                          "403": {"description": "Not the admin.", "content": html}, **_errors(400, 429, 503)}}},
        "/admin/fleet": {"get": {
            "summary": "The fleet views as JSON or CSV (admin key)", "tags": ["Admin"], "security": _BEARER,
            "parameters": [_DAYS, _FORMAT, view, *sort],
            "responses": {"200": {"description": "Every view, or one.", "content": data},
                          **_errors(400, 401, 403, 429, 503)}}},
        "/dashboard/login": {
            "get": {"summary": "The sign-in form", "tags": ["Usage"], "security": _PUBLIC,
                    "responses": {"200": {"description": "The form.", "content": html}, "303": see}},
            "post": {"summary": "Sign in: a key for a session cookie (8 h)", "tags": ["Usage"], "security": _PUBLIC,
                     "requestBody": {"required": True, "content": form},
                     "responses": {"303": {**see, "description": "Signed in (Set-Cookie)."},
                                   **{str(c): {"description": d, "content": html} for c, d in (
                                       (401, "A wrong key."), (403, "Sent from another site."),
                                       (429, "Too many failed key checks from this address."))}}}},
        "/dashboard/logout": {"post": {
            "summary": "Sign out (ends the session)", "tags": ["Usage"], "security": sec,
            "responses": {"303": see, "403": {"description": "Sent from another site.", "content": html}}}},
    }


def _dry_run() -> dict[str, Any]:
    kind = _query("kind", {"type": "string", "enum": ["chat", "completions"]},
                  "Which request the body is; default: `messages` means chat, `prompt` completions.")
    tenant = {"name": "x-tiergate-tenant", "in": "header", "required": False, "schema": {"type": "string"},
              "description": "The tenant to dry-run as: required with the admin key; a tenant key may name only "
                             "itself."}
    body = {"oneOf": [_ref("ChatCompletionRequest"), _ref("CompletionRequest")]}
    return {"post": {
        "summary": "Dry-run: the routing decision a request would get now, without sending it", "tags": ["Routing"],
        "description": "Every candidate with its per-plugin scores, estimated USD (and parts), predicted TTFT and "
                       "TPOT, P(miss), and the filter that removed each rejected one; the chosen candidate and the "
                       "ranking. Nothing is admitted, forwarded or recorded. A request no candidate can serve gets "
                       "200 with `chosen: null` and the refusal in `error`.",
        "security": _KEY_OR_ANON, "parameters": [kind, tenant, *_REQUEST_HEADERS],
        "requestBody": {"required": True, "content": {_JSON: {"schema": body}}},
        "responses": {"200": _json(_ref("RouteDecision"), "The decision.", {"x-request-id": _RID}),
                      **_errors(400, 401, 403, 404, 413, 429, 503)}}}


def _asset(summary: str, media_type: str) -> dict[str, Any]:
    tag = "Docs" if "docs" in summary else "Usage"
    return {"get": {"summary": summary, "tags": [tag], "security": _PUBLIC,
                    "responses": {"200": {"description": "The file.",
                                          "content": {media_type: {"schema": {"type": "string"}}}}}}}


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once: it depends on nothing that a policy reload changes)."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "tiergate", "version": "0.1.0",
                 "description": "An OpenAI-compatible router for self-hosted vLLM tiers. Send OpenAI requests "
                                "with `Authorization: Bearer <key>`; fields the router does not read are "
                                "forwarded to the chosen tier unchanged. Errors use OpenAI's error JSON."},
        "servers": [{"url": "/"}],
        "security": _BEARER,
        "paths": _paths(),
        "components": {
            "schemas": schema_components(),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An API key from the policy file."},
                "session": {"type": "apiKey", "in": "cookie", "name": "tiergate_session",
                            "description": "The dashboard's session cookie, from POST /dashboard/login "
                                           "(`__Host-tiergate_session` behind https)."}},
            "headers": {
                "x-request-id": {"description": "The request's id (the client's, else a new one).",
                                 "schema": {"type": "string"}},
                "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}},
            "parameters": {
                "x-request-id": {"name": "x-request-id", "in": "header", "required": False,
                                 "schema": {"type": "string", "maxLength": 128},
                                 "description": "Your id for the request; echoed back and logged."}},
        },
    }


# --- the docs page ----------------------------------------------------------------------------------
_SWAGGER_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
_OWN_FILES = {"init.js": "text/javascript"}
_ASSETS = {**_SWAGGER_FILES, **_OWN_FILES}


@functools.cache
def _asset_bytes(name: str) -> bytes:
    """Read once: our own files from package data, Swagger UI's from the installed bundle."""
    if name in _OWN_FILES:
        return resources.files("router").joinpath("openapi_static", name).read_bytes()
    import swagger_ui_bundle  # the swagger-ui-bundle-v2 distribution: Swagger UI 5 (OpenAPI 3.1)

    data: bytes = swagger_ui_bundle.swagger_ui_path.joinpath(name).read_bytes()
    return data


def openapi_handlers() -> list[Any]:
    """`/schema`, `/schema/openapi.json` and `/schema/assets/{name}`."""
    body = msgspec.json.encode(document())
    page = resources.files("router").joinpath("openapi_static", "index.html").read_bytes()

    @get(OPENAPI_JSON, include_in_schema=False)
    async def openapi_json() -> Response[bytes]:
        return Response(content=body, media_type=_JSON, headers={"Cache-Control": "no-cache"})

    @get("/schema", include_in_schema=False)
    async def docs() -> Response[bytes]:
        return Response(content=page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer"})

    @get("/schema/assets/{name:str}", include_in_schema=False)
    async def asset(name: FromPath[str]) -> Response[bytes]:
        media = _ASSETS.get(name)
        if media is None:
            return Response(content=error_body(404, f"no docs asset named {name[:64]!r}", param="name",
                                               code="not_found"), status_code=404, media_type=_JSON)
        return Response(content=_asset_bytes(name), media_type=media,
                        headers={"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"})

    return [openapi_json, docs, asset]
