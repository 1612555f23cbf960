"""The router's Redis client: one node, a Redis Cluster or a Sentinel-managed master, from one URL.

URL forms (`TIERGATE_REDIS_URL`, `make_redis`):

* `redis://[user:pass@]host:port[/db]`, `rediss://...` (TLS), `unix://...`: one node.
* `redis+cluster://[user:pass@]host:port[,host:port...]` (`rediss+cluster://` for TLS): a Redis Cluster,
  found from these startup nodes (`redis.asyncio.cluster.RedisCluster`). Every script the router runs
  touches one slot (router/budget_lua.py, router/affinity_store.py, router/admission/window_store.py,
  router/load_sync.py); pipelines are split by node.
* `redis+sentinel://[user:pass@]host:port[,host:port...]/<service>[/db]` (`rediss+sentinel://`): the
  master of `service` as Sentinel names it (`Sentinel(...).master_for(service)`); a failover is followed
  on the next connection.

Connections pack commands with hiredis (`PackedConnection`, `PackedSentinelConnection`; redis-py's asyncio
connection packs in Python). Closing: redis-py's pool disconnects the connections it lists (idle and in use)
when its client closes. A connection that is not in either list at that moment (one a late task is still
connecting or handing back), or one that a task still running after shutdown reconnects, stays open until
the garbage collector finds it ("unclosed Connection"). `ClosingPool` keeps a weak reference to every
connection it makes; `close_all` disconnects all of them and marks the pool closed, so a late task gets a
ConnectionError instead of a new socket. `ClosingCluster` does the same for a cluster (after `close_redis`
it refuses to discover the cluster again), and `close_redis` also closes a Sentinel's own clients.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, cast
from urllib.parse import unquote

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

RedisClient = aioredis.Redis | RedisCluster   # what the stores take: one node (or Sentinel's master), or a cluster

SOCKET_BACKSTOP_S = 2.0   # the socket timeout of every read and send: a backstop above every caller's own
CLUSTER_RETRIES = 2       # a cluster call that hit a dead node retries after the slot map is read again


def _pack(conn: aioredis.Connection, args: tuple[Any, ...]) -> list[bytes] | None:
    if not args or not isinstance(args[0], str) or " " in args[0]:
        return None                                    # "CONFIG GET"-style names: redis-py splits them
    return [hiredis.pack_command(args)]


class PackedConnection(aioredis.Connection):
    """A TCP connection that packs commands with hiredis (redis-py's asyncio connection packs in Python)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        return _pack(self, args) or super().pack_command(*args)


class PackedSentinelConnection(SentinelManagedConnection):
    """PackedConnection for a Sentinel-managed master."""

    def pack_command(self, *args: Any) -> list[bytes]:
        packed = _pack(self, args)
        return packed if packed is not None else list(super().pack_command(*args))


class _Closing:
    """A pool that closes every connection it ever made, and makes no more once closed."""

    _made: weakref.WeakSet[AbstractConnection]
    _closed: bool

    def _track(self, conn: AbstractConnection) -> AbstractConnection:
        if getattr(self, "_closed", False):
            raise RedisConnectionError("the router's Redis pool is closed (shutting down)")
        if not hasattr(self, "_made"):
            self._made = weakref.WeakSet()
        self._made.add(conn)
        return conn

    async def _close_made(self) -> None:
        self._closed = True
        for conn in list(getattr(self, "_made", ())):
            if conn.is_connected:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)


class ClosingPool(_Closing, aioredis.ConnectionPool):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._made = weakref.WeakSet()
        self._closed = False

    def make_connection(self) -> AbstractConnection:
        return self._track(super().make_connection())  # type: ignore[no-untyped-call]

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        if self._closed:
            raise RedisConnectionError("the router's Redis pool is closed (shutting down)")
        await super().ensure_connection(connection)

    async def close_all(self) -> None:
        """Disconnect every connection this pool made, listed or not; no new ones after this."""
        self._closed = True
        with contextlib.suppress(Exception):
            await self.disconnect()
        await self._close_made()


class ClosingSentinelPool(_Closing, SentinelConnectionPool):
    def make_connection(self) -> AbstractConnection:
        return self._track(super().make_connection())  # type: ignore[no-untyped-call]

    async def close_all(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            await self.disconnect()
        await self._close_made()


class SentinelRedis(aioredis.Redis):
    """The master's client; keeps its `Sentinel` so that `close_redis` closes the sentinels' clients too."""

    tg_sentinel: Sentinel | None = None


class ClusterConnection(PackedConnection):
    """PackedConnection for a cluster node, remembered by its client (`ClosingCluster.made`): a node the
    client drops from its slot map after a failover does not close the connections in use at that moment."""

    def __init__(self, *, tg_made: weakref.WeakSet[AbstractConnection] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tg_made is not None:
            tg_made.add(self)


class ClosingCluster(RedisCluster):
    """A RedisCluster that, once closed, does not discover the cluster again (no sockets after shutdown)."""

    closed = False
    made: weakref.WeakSet[AbstractConnection]

    async def initialize(self) -> RedisCluster:
        if self.closed:
            raise RedisConnectionError("the router's Redis cluster client is closed (shutting down)")
        return await super().initialize()


def _nodes(netloc: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """`[user:pass@]h:p,h:p` -> [(host, port)], {username, password}."""
    auth: dict[str, Any] = {}
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, _, pw = cred.partition(":")
        auth = {"username": unquote(user) or None, "password": unquote(pw) or None}
    out = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host:
            host, port = port, "6379"
        out.append((host.strip("[]"), int(port or 6379)))
    return out, auth


def parse_url(url: str) -> tuple[str, list[tuple[str, int]], dict[str, Any]]:
    """-> (single | cluster | sentinel, nodes, extra): nodes and extra (tls, auth, service, db) for the last
    two; a single-node URL is left to redis-py (nodes empty)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"):
        return "single", [], {}
    netloc, _, path = rest.partition("/")
    path = path.partition("?")[0]
    nodes, extra = _nodes(netloc)
    extra["ssl"] = scheme.startswith("rediss")
    if scheme.endswith("cluster"):
        if path.strip("/") not in ("", "0"):
            raise ValueError(f"a Redis Cluster has only db 0: {url!r}")
        return "cluster", nodes, extra
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise ValueError(f"expected redis+sentinel://host:port[,host:port...]/<service>[/db]: {url!r}")
    extra["service"] = unquote(parts[0])
    extra["db"] = int(parts[1]) if len(parts) == 2 else 0
    return "sentinel", nodes, extra


def make_redis(url: str, timeout_s: float) -> RedisClient:
    """The router's Redis: no retries on one node, so a sick Redis can't stall requests (a cluster retries
    a call that hit a dead node `CLUSTER_RETRIES` times, briefly, after reading the slot map again: how it
    follows a failover). Each hot-path call is bounded by its caller's own deadline (`asyncio.timeout`:
    affinity, admission, windows, load sync, settlement); the socket timeout is only a backstop
    (`SOCKET_BACKSTOP_S`) for calls that have none (admin reads). `timeout_s` bounds connecting."""
    kind, nodes, extra = parse_url(url)
    connect = max(timeout_s, 0.2)
    if kind == "cluster":
        client = ClosingCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes], socket_timeout=SOCKET_BACKSTOP_S,
            socket_connect_timeout=connect, health_check_interval=0, username=extra.get("username"),
            password=extra.get("password"), ssl=extra["ssl"],
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), CLUSTER_RETRIES))
        client.made = weakref.WeakSet()
        if not extra["ssl"]:
            client.connection_kwargs["connection_class"] = ClusterConnection   # the nodes it discovers
            client.connection_kwargs["tg_made"] = client.made
            for node in client.nodes_manager.startup_nodes.values():
                node.connection_class = ClusterConnection
                node.connection_kwargs["tg_made"] = client.made
        return client
    if kind == "sentinel":
        common = {"socket_timeout": SOCKET_BACKSTOP_S, "socket_connect_timeout": connect}
        sentinel = Sentinel(nodes, sentinel_kwargs=dict(common), **common)  # type: ignore[no-untyped-call]
        conn: dict[str, Any] = {"username": extra.get("username"), "password": extra.get("password"),
                                "db": extra["db"], "retry_on_timeout": False, "retry": None,
                                "health_check_interval": 0}
        if extra["ssl"]:
            conn["ssl"] = True
        else:
            conn["connection_class"] = PackedSentinelConnection
        master: SentinelRedis = sentinel.master_for(extra["service"], redis_class=SentinelRedis,
                                                    connection_pool_class=ClosingSentinelPool, **conn)
        master.tg_sentinel = sentinel
        return master
    pool = ClosingPool.from_url(url, socket_timeout=SOCKET_BACKSTOP_S, socket_connect_timeout=connect,
                                retry_on_timeout=False, retry=None, health_check_interval=0)
    if pool.connection_class is aioredis.Connection:
        pool.connection_class = PackedConnection
    return aioredis.Redis.from_pool(pool)


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


async def close_redis(client: RedisClient) -> None:
    """Close a client from `make_redis` (every connection it made, a Sentinel's own clients), or any other."""
    if isinstance(client, RedisCluster):
        made: list[AbstractConnection] = []
        if isinstance(client, ClosingCluster):
            client.closed = True
            made = list(getattr(client, "made", ()))
        with contextlib.suppress(Exception):
            await client.aclose()
        for node in [*client.nodes_manager.nodes_cache.values(), *client.nodes_manager.startup_nodes.values()]:
            with contextlib.suppress(Exception):
                await node.disconnect()
        for conn in made:
            if conn.is_connected:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
        return
    pool = client.connection_pool
    await client.aclose()
    if isinstance(pool, ClosingPool | ClosingSentinelPool):
        await pool.close_all()
    sentinel = getattr(client, "tg_sentinel", None)
    if isinstance(sentinel, Sentinel):
        for s in sentinel.sentinels:
            with contextlib.suppress(Exception):
                await s.aclose()


def register(client: RedisClient, script: str) -> Any:
    """`client.register_script(script)` for either client type (redis-py types it for `Redis` alone)."""
    return cast(Any, client).register_script(script)
