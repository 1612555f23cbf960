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

import asyncio
import contextlib
import hashlib
import weakref
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

RedisClient = aioredis.Redis | RedisCluster   # what the stores take: one node (or Sentinel's master), or a cluster

SOCKET_BACKSTOP_S = 2.0   # the socket timeout of every read and send: a backstop above every caller's own
RETIRE_AFTER_S = 1.0      # a node the slot map dropped is disconnected this long after (its commands in flight end)
CLUSTER_RETRIES = 0       # as on one node: a call that hit a dead node fails (its caller's failure path), and
                          # the next call reads the slot map again (redis-py's retry closes every connection
                          # of the client and sleeps 250 ms; its pipeline retry resends commands)


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


class ClosingNodesManager(NodesManager):
    """redis-py's slot map, which also closes the nodes it drops. redis-py routes by `slots_cache`, whose
    node objects may be ones it then declined to keep in `nodes_cache` (a re-read of the map keeps the old
    object of a known node there), and a failover drops nodes whose connections are in use: such objects
    keep their sockets until the garbage collector warns. Here every node object the map ever held is
    known; one that no longer is in the map is disconnected a second after (the commands in flight on it
    end first), forgotten once it has no open connection, and every known one is closed by `close_redis`."""

    __slots__ = ("known", "retire_tasks", "retiring")
    known: dict[int, ClusterNode]      # by id: ClusterNode compares by name, and several may share one
    retiring: set[int]
    retire_tasks: set[asyncio.Task[None]]

    @classmethod
    def replacing(cls, nm: NodesManager) -> ClosingNodesManager:
        new = cls(list(nm.startup_nodes.values()), nm.require_full_coverage, nm.connection_kwargs,
                  dynamic_startup_nodes=nm._dynamic_startup_nodes, address_remap=nm.address_remap,
                  event_dispatcher=nm._event_dispatcher)
        new.known, new.retiring, new.retire_tasks = {id(n): n for n in new.startup_nodes.values()}, set(), set()
        return new

    def _live(self) -> set[int]:
        nodes = [*self.nodes_cache.values(), *self.startup_nodes.values()]
        nodes += [n for lst in self.slots_cache.values() for n in lst]
        return {id(n) for n in nodes}

    def set_nodes(self, old: dict[str, ClusterNode], new: dict[str, ClusterNode], remove_old: bool = False) -> None:
        for n in [*old.values(), *new.values()]:
            self.known.setdefault(id(n), n)
        super().set_nodes(old, new, remove_old)
        live = self._live() | {id(n) for n in old.values()}
        for key, node in list(self.known.items()):
            if key in live:
                continue
            if not any(c.is_connected for c in node._connections):
                del self.known[key]
                self.retiring.discard(key)
            elif key not in self.retiring:
                self.retiring.add(key)
                task = asyncio.get_running_loop().create_task(self._retire(node))
                self.retire_tasks.add(task)
                task.add_done_callback(self.retire_tasks.discard)

    async def _retire(self, node: ClusterNode) -> None:
        await asyncio.sleep(RETIRE_AFTER_S)
        if id(node) not in self._live():
            with contextlib.suppress(Exception):
                await node.disconnect()
        self.retiring.discard(id(node))

    async def close_retiring(self) -> None:
        for task in list(self.retire_tasks):
            task.cancel()
        for node in list(self.known.values()):
            with contextlib.suppress(Exception):
                await node.disconnect()
        self.known.clear()


class ClosingCluster(RedisCluster):
    """A RedisCluster that, once closed, does not discover the cluster again (no sockets after shutdown)."""

    closed = False
    made: weakref.WeakSet[AbstractConnection]

    async def initialize(self) -> RedisCluster:
        if self.closed:
            raise RedisConnectionError("the router's Redis cluster client is closed (shutting down)")
        return await super().initialize()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py picks a command's node before it reads the slot map the first time: the calls made while
        # the first one reads it went to any node (MOVED, and every 5th MOVED closed every connection)
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


def _nodes(netloc: str, default_port: int) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """`[user:pass@]h:p,h:p` -> [(host, port)], {username, password}."""
    auth: dict[str, Any] = {}
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, _, pw = cred.partition(":")
        auth = {"username": unquote(user) or None, "password": unquote(pw) or None}
    out = []
    for part in (p.strip() for p in netloc.split(",")):
        if part.startswith("["):                       # [v6 address]:port
            host, _, port = part[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, sep, port = part.rpartition(":")
            if not sep:
                host, port = part, ""
        out.append((host, int(port or default_port)))
    return out, auth


def parse_url(url: str) -> tuple[str, list[tuple[str, int]], dict[str, Any]]:
    """-> (single | cluster | sentinel, nodes, extra): nodes and extra (tls, auth, service, db) for the last
    two; a single-node URL is left to redis-py (nodes empty)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"):
        return "single", [], {}
    netloc, _, path = rest.partition("/")
    path = path.partition("?")[0]
    nodes, extra = _nodes(netloc, 26379 if "sentinel" in scheme else 6379)
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
    """The router's Redis: no retries, so a sick Redis can't stall requests (a cluster call that hit a dead
    node fails, and the next one reads the slot map again: that is how it follows a failover; a Sentinel
    client asks the sentinels for the master on its next connection). Each hot-path call is bounded by its
    caller's own deadline (`asyncio.timeout`: affinity, admission, windows, load sync, settlement); the
    socket timeout is only a backstop (`SOCKET_BACKSTOP_S`) for calls that have none (admin reads).
    `timeout_s` bounds connecting."""
    kind, nodes, extra = parse_url(url)
    connect = max(timeout_s, 0.2)
    if kind == "cluster":
        client = ClosingCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes], socket_timeout=SOCKET_BACKSTOP_S,
            socket_connect_timeout=connect, health_check_interval=0, username=extra.get("username"),
            password=extra.get("password"), ssl=extra["ssl"], reinitialize_steps=0,   # MOVED: patch the map
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), CLUSTER_RETRIES))
        client.made = weakref.WeakSet()
        client.nodes_manager = ClosingNodesManager.replacing(client.nodes_manager)
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
        if isinstance(client.nodes_manager, ClosingNodesManager):
            await client.nodes_manager.close_retiring()
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


class Script:
    """A Lua script run by EVALSHA; on NOSCRIPT (a restarted node, a replica promoted by a failover) it is
    loaded (`load_script`: on every node of a cluster) and run once more. redis-py's own loads it through
    the client's slot map, which may not list a just-promoted master as one yet."""

    def __init__(self, client: RedisClient, script: str) -> None:
        self.client = client
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self._loading: asyncio.Task[None] | None = None

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]
        except NoScriptError:
            await self.load()
            return await self.client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[misc]

    async def load(self) -> None:
        """One load at a time, shared by every call that met NOSCRIPT meanwhile."""
        if self._loading is None or self._loading.done():
            self._loading = asyncio.get_running_loop().create_task(load_script(self.client, self.script))
        await asyncio.shield(self._loading)


async def load_script(client: RedisClient, script: str) -> None:
    """SCRIPT LOAD on one node, or on every node of a cluster, replicas too (a replica promoted later has
    it already); a node that does not answer is skipped."""
    if not isinstance(client, RedisCluster):
        await client.script_load(script)
        return
    for node in client.get_nodes():
        with contextlib.suppress(Exception):
            await client.execute_command("SCRIPT LOAD", script, target_nodes=node)


def register(client: RedisClient, script: str) -> Script:
    """The router's scripts (`Script`), for either client type."""
    return Script(client, script)
