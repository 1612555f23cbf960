"""The upstream HTTP client behind one small interface, with aiohttp and httpx transports.

Both: one shared pool, explicit timeouts and limits, no proxy environment variables,
no redirects, TCP_NODELAY on every connection. The router picks one by setting
(`TIERGATE_HTTP_CLIENT`); bench/overhead.py measures both (BENCHMARKS.md).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import httpx


@dataclass(frozen=True)
class ClientLimits:
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 300.0       # between bytes, not total: long generations stream
    max_connections: int = 2048
    max_per_host: int = 512
    keepalive_s: float = 30.0


class UpstreamConnectError(Exception):
    """The request never reached the backend (safe to retry elsewhere)."""


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    def iter_chunks(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    async def close(self) -> None: ...

    def half_close(self) -> bool: ...


class UpstreamClient(Protocol):
    name: str

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse: ...

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


# --- aiohttp -------------------------------------------------------------------
class _AiohttpResponse:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._resp.content.iter_any():
            yield chunk

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        finally:
            self._resp.release()

    async def close(self) -> None:
        self._resp.close()

    def half_close(self) -> bool:
        """Send EOF upstream but keep reading: vLLM (and the simulator) abort the request on it, and
        whatever they wrote before arrives, so the tokens they produced can be billed exactly."""
        conn = self._resp.connection
        transport = conn.transport if conn is not None else None
        if transport is None or not transport.can_write_eof():
            return False
        transport.write_eof()
        return True


class AiohttpClient:
    name = "aiohttp"

    def __init__(self, limits: ClientLimits | None = None) -> None:
        self.limits = limits or ClientLimits()
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            lim = self.limits
            conn = aiohttp.TCPConnector(limit=lim.max_connections, limit_per_host=lim.max_per_host,
                                        keepalive_timeout=lim.keepalive_s, ttl_dns_cache=300,
                                        enable_cleanup_closed=False)
            self._session = aiohttp.ClientSession(
                connector=conn, trust_env=False, auto_decompress=False, skip_auto_headers=("User-Agent",),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=lim.connect_timeout_s,
                                              sock_read=lim.read_timeout_s))
        return self._session

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> _AiohttpResponse:
        try:
            resp = await self._get_session().post(url, data=body, headers=headers, allow_redirects=False)
        except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
            raise UpstreamConnectError(f"{type(exc).__name__}") from exc
        return _AiohttpResponse(resp)

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        try:
            async with self._get_session().get(url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                               allow_redirects=False) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamConnectError(type(exc).__name__) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- httpx ---------------------------------------------------------------------
class _HttpxResponse:
    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status = resp.status_code
        self.headers: Mapping[str, str] = resp.headers

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self._resp.aiter_raw():
            yield chunk

    async def read(self) -> bytes:
        try:
            return await self._resp.aread()
        finally:
            await self._resp.aclose()

    async def close(self) -> None:
        await self._resp.aclose()

    def half_close(self) -> bool:
        return False  # httpx exposes no half-close: an abandoned stream is closed outright


class HttpxClient:
    name = "httpx"

    def __init__(self, limits: ClientLimits | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        lim = limits or ClientLimits()
        self.limits = lim
        if transport is None:
            transport = httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=lim.max_connections,
                                    max_keepalive_connections=lim.max_per_host,
                                    keepalive_expiry=lim.keepalive_s),
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._client = httpx.AsyncClient(
            transport=transport, trust_env=False, follow_redirects=False,
            timeout=httpx.Timeout(connect=lim.connect_timeout_s, read=lim.read_timeout_s, write=30.0,
                                  pool=lim.connect_timeout_s))

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> _HttpxResponse:
        req = self._client.build_request("POST", url, content=body, headers=dict(headers))
        try:
            resp = await self._client.send(req, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise UpstreamConnectError(type(exc).__name__) from exc
        return _HttpxResponse(resp)

    async def get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        try:
            r = await self._client.get(url, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise UpstreamConnectError(type(exc).__name__) from exc
        return r.status_code, r.content

    async def close(self) -> None:
        await self._client.aclose()


def make_client(kind: str, limits: ClientLimits | None = None) -> UpstreamClient:
    if kind == "aiohttp":
        return AiohttpClient(limits)
    if kind == "httpx":
        return HttpxClient(limits)
    if kind == "httpx-aiohttp":
        try:
            from httpx_aiohttp import AiohttpTransport
        except ImportError as exc:
            raise ValueError("http client 'httpx-aiohttp' needs the httpx-aiohttp package") from exc
        return HttpxClient(limits, transport=AiohttpTransport())
    raise ValueError(f"unknown http client {kind!r}: use aiohttp, httpx or httpx-aiohttp")
