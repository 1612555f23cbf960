"""Dashboard sessions: Litestar's session middleware with a server-side store and a signed cookie.

Sign-in exchanges a key for a session (router/dashboard/routes.py). The session, in the store (Redis
when the router has it, so every replica and worker shares it; else the process's memory), holds
the key's SHA-256 digest and an absolute expiry, never the key. The cookie holds a random 256-bit id and
its HMAC-SHA256 under `TIERGATE_SESSION_SECRET`; it is HttpOnly, SameSite=Lax, Path=/, Max-Age = the time
left, and Secure (named `__Host-tiergate_session`) when `TIERGATE_SESSION_SECURE` is set (behind https).

Differences from Litestar's stock server-side backend, each for a reason:
* the cookie is signed: an id read from the store (a Redis dump) is not a cookie without the secret, and
  a forged cookie is refused before any store read;
* a session is written, and a cookie set, only when the session changes: visitors who never sign in
  leave nothing in the store, and a page view does not extend the session (the expiry is absolute);
* a sign-in always gets a fresh id (no session fixation); a sign-out deletes the stored session and
  expires the cookie;
* the expiry is checked against an injectable clock as well as the store's TTL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from litestar.datastructures import Cookie, MutableScopeHeaders
from litestar.middleware.session.server_side import ServerSideSessionBackend, ServerSideSessionConfig
from litestar.stores.memory import MemoryStore
from litestar.stores.redis import RedisStore
from litestar.types import Empty

from router.logs import get_logger
from router.settings import Settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from litestar import Litestar
    from litestar.connection import ASGIConnection
    from litestar.stores.base import Store
    from litestar.types import Message, ScopeSession

    from router.redis_pool import RedisClient

_log = get_logger("tiergate.dashboard")
_LOADED = "tiergate.session"        # scope key: (id, data) as loaded, to tell a changed session from an unchanged one


def session_secret(configured: str | None) -> bytes:
    """The signing secret: TIERGATE_SESSION_SECRET, else a random one for this process (with a warning:
    sessions then end when the process restarts, and other workers or replicas do not accept them)."""
    if configured:
        return configured.encode()
    get_logger("tiergate").warning("session_secret_generated", detail="TIERGATE_SESSION_SECRET is not set: "
                                   "dashboard sessions last until this process restarts and work on this "
                                   "process only; set it (the same on every replica) to share them")
    return secrets.token_bytes(32)


class SignedSessionBackend(ServerSideSessionBackend):
    config: SessionConfig

    def __deepcopy__(self, memo: dict[int, Any]) -> SignedSessionBackend:
        return self         # Litestar deep-copies routers; the store (a Redis client) is shared, not copied

    def sign(self, sid: str) -> str:
        mac = hmac.new(self.config.secret, sid.encode(), hashlib.sha256).digest()
        return sid + "." + base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def verified(self, cookie: str | None) -> str | None:
        """The session id of a correctly signed cookie, else None."""
        if not cookie or cookie.count(".") != 1 or len(cookie) > 200:
            return None
        sid = cookie.partition(".")[0]
        return sid if hmac.compare_digest(self.sign(sid), cookie) else None

    async def load_from_connection(self, connection: ASGIConnection[Any, Any, Any, Any]) -> dict[str, Any]:
        scope = cast("dict[str, Any]", connection.scope)
        scope[_LOADED] = ("", {})
        sid = self.verified(connection.cookies.get(self.config.key))
        if sid is None:
            return {}
        try:
            raw = await self.get(sid, store=self.config.get_store_from_app(connection.scope["app"]))
        except Exception as exc:        # the store (Redis) away: signed out for now, not a 500
            _log.warning("session_store_unavailable", op="get", error=type(exc).__name__)
            return {}
        if raw is None:
            return {}
        data = self.deserialize_data(raw)
        if not isinstance(data.get("exp"), int | float) or data["exp"] <= self.config.clock():
            return {}
        scope[_LOADED] = (sid, dict(data))
        return data

    def get_session_id(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str:
        loaded = cast("dict[str, Any]", connection.scope).get(_LOADED)
        return loaded[0] if loaded else ""

    def _cookie(self, value: str, max_age: int) -> str:
        c = self.config
        return Cookie(key=c.key, value=value, max_age=max_age, path=c.path, secure=c.secure, httponly=True,
                      samesite=c.samesite).to_header(header="")

    async def store_in_message(self, scope_session: ScopeSession, message: Message,
                               connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        try:
            await self._store(scope_session, message, connection)
        except Exception as exc:        # the store away: no cookie is set (a sign-in shows the form again)
            _log.warning("session_store_unavailable", op="set", error=type(exc).__name__)

    async def _store(self, scope_session: ScopeSession, message: Message,
                     connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        sid, loaded = cast("dict[str, Any]", connection.scope).get(_LOADED) or ("", {})
        store = self.config.get_store_from_app(connection.scope["app"])
        headers = MutableScopeHeaders.from_message(message)
        if scope_session is Empty or not scope_session:
            if sid:
                await self.delete(sid, store=store)
            if connection.cookies.get(self.config.key):
                headers.add("Set-Cookie", self._cookie("", 0))
            return
        data = dict(cast("dict[str, Any]", scope_session))
        if sid and data == loaded:
            return                              # unchanged: nothing written, the expiry stays where it was
        if sid:
            await self.delete(sid, store=store)
        ttl = max(1, round(float(data.get("exp", 0)) - self.config.clock()))
        new = secrets.token_urlsafe(32)
        await store.set(new, self.serialize_data(data, connection.scope), expires_in=ttl)
        headers.add("Set-Cookie", self._cookie(self.sign(new), ttl))


@dataclass
class SessionConfig(ServerSideSessionConfig):
    """`secret`: signs cookies; `session_store`: where sessions live; `clock`: wall-clock seconds."""

    _backend_class = SignedSessionBackend

    secret: bytes = b""
    session_store: Store = field(default_factory=MemoryStore)
    clock: Callable[[], float] = time.time

    def get_store_from_app(self, app: Litestar) -> Store:
        return self.session_store

    def __deepcopy__(self, memo: dict[int, Any]) -> SessionConfig:
        return self


def session_config(secret: bytes, store: Store | None, *, max_age_s: int, secure: bool,
                   clock: Callable[[], float] = time.time) -> SessionConfig:
    return SessionConfig(key="__Host-tiergate_session" if secure else "tiergate_session", max_age=max_age_s,
                         secure=secure, httponly=True, samesite="lax", path="/", secret=secret,
                         session_store=store or MemoryStore(), clock=clock)


def sessions_from_settings(settings: Settings, redis: RedisClient | None) -> SessionConfig:
    """Sessions in Redis under `tiergate:session:` when the router has Redis (shared by every replica), else
    in this process's memory."""
    # one key per session (a cluster routes each by its own slot)
    store = RedisStore(cast("aioredis.Redis", redis), namespace="tiergate:session") if redis is not None else None
    return session_config(session_secret(settings.session_secret), store, max_age_s=settings.session_max_age_s,
                          secure=settings.session_secure)
