"""The router's Redis connection pool: one that closes every connection it ever made, and makes no more.

redis-py's pool disconnects the connections it lists (idle and in use) when its client closes. A connection
that is not in either list at that moment (one a late task is still connecting or handing back), or one
that a task still running after shutdown reconnects, stays open until the garbage collector finds it
("unclosed Connection"). This pool keeps a weak reference to every connection it makes; `close_all`
disconnects all of them and marks the pool closed, so a late task gets a ConnectionError instead of a new
socket. Nothing else differs from redis-py's ConnectionPool.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError


class ClosingPool(aioredis.ConnectionPool):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._made: weakref.WeakSet[AbstractConnection] = weakref.WeakSet()
        self._closed = False

    def make_connection(self) -> AbstractConnection:
        if self._closed:
            raise RedisConnectionError("the router's Redis pool is closed (shutting down)")
        conn: AbstractConnection = super().make_connection()  # type: ignore[no-untyped-call]
        self._made.add(conn)
        return conn

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        if self._closed:
            raise RedisConnectionError("the router's Redis pool is closed (shutting down)")
        await super().ensure_connection(connection)

    async def close_all(self) -> None:
        """Disconnect every connection this pool made, listed or not; no new ones after this."""
        self._closed = True
        with contextlib.suppress(Exception):
            await self.disconnect()
        for conn in list(self._made):
            if conn.is_connected:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)


class PackedConnection(aioredis.Connection):
    """A TCP connection that packs commands with hiredis (redis-py's asyncio connection packs in Python)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if not args or not isinstance(args[0], str) or " " in args[0]:
            return super().pack_command(*args)        # "CONFIG GET"-style names: redis-py splits them
        return [hiredis.pack_command(args)]


SOCKET_BACKSTOP_S = 2.0   # the socket timeout of every read and send: a backstop above every caller's own


def make_redis(url: str, timeout_s: float) -> aioredis.Redis:
    """The router's Redis: no retries, so a sick Redis can't stall requests. Each hot-path call is bounded by
    its caller's own deadline (`asyncio.timeout`: affinity, admission, windows, load sync, settlement); the
    socket timeout is only a backstop (`SOCKET_BACKSTOP_S`) for calls that have none (admin reads). It was
    `timeout_s` (50 ms) before: that cut settlements (1 s budget) and the admission's second ask at 50 ms,
    and cost a task per send (redis-py wraps each send in wait_for when a socket timeout is set).
    `timeout_s` bounds connecting."""
    pool = ClosingPool.from_url(url, socket_timeout=SOCKET_BACKSTOP_S, socket_connect_timeout=max(timeout_s, 0.2),
                                retry_on_timeout=False, retry=None, health_check_interval=0)
    if pool.connection_class is aioredis.Connection:
        pool.connection_class = PackedConnection
    return aioredis.Redis.from_pool(pool)


async def close_redis(client: aioredis.Redis) -> None:
    """Close a client from `make_redis` (every connection its pool made), or any other client."""
    pool = client.connection_pool
    await client.aclose()
    if isinstance(pool, ClosingPool):
        await pool.close_all()
