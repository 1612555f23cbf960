"""The simulator's `--api-key`, as vLLM ships it, and a record of the request headers tests look for.

vLLM (vllm-project/vllm, vllm/entrypoints/serve/middleware/authenticate.py at commit
baaf6e9c171b38e155d4191ac29f3a4a08817146): with `--api-key` (or VLLM_API_KEY) set, every route is
guarded except the public endpoints /health, /ping, /load, /version, /metrics and the API docs; an
OPTIONS request is not checked. A request passes when its `Authorization` header is `Bearer <key>`
(the scheme case-insensitive) for one of the keys, compared as SHA-256 digests in constant time; else
the answer is 401 with the body {"error": "Unauthorized"}. Several keys may be given, as vLLM allows.

`seen` (simulator only, GET /admin/seen, itself guarded like any other route): the last 256 generation
requests' `x-request-id`, `traceparent` and `tracestate`, so a test can check what a router sent on.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

PUBLIC = ("/health", "/ping", "/load", "/version", "/metrics", "/docs", "/redoc", "/openapi.json")
SEEN = ("x-request-id", "traceparent", "tracestate")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _public(path: str) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in PUBLIC)


class ApiKeys:
    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]
        self.seen: deque[dict[str, str | None]] = deque(maxlen=256)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def verify(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, param = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(param.encode()).digest()
        match = False
        for want in self._digests:
            match |= secrets.compare_digest(digest, want)
        return match

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.enabled and request.method != "OPTIONS" and not _public(request.path) \
                and not self.verify(request.headers.get("Authorization")):
            return web.json_response({"error": "Unauthorized"}, status=401)
        if request.path in ("/v1/chat/completions", "/v1/completions"):
            self.seen.append({h: request.headers.get(h) for h in SEEN})
        return await handler(request)

    async def seen_page(self, _r: web.Request) -> web.Response:
        return web.json_response({"requests": list(self.seen)})
