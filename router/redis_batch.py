"""Dynamic micro-batching of the router's own Redis work (issue #15): many requests' writes, one round trip.

Callers `put` an item and go on: nothing on the request path awaits Redis, and no task is made per item.
One flusher task per batcher (`run`, started by the app's lifespan, router/app.py) drains the queue:

* Idle -> at once. When the flusher was waiting on an empty queue, the first item wakes it and what is
  queued by then (every item put in the same event-loop turn) goes out at once: a lone request waits for
  no window.
* Under load -> a window. When items are already queued as a flush ends (they arrived while it was in
  flight), the flusher collects for at most `window_s` (WINDOW_S, 1 ms) or until `max_batch` (MAX_BATCH,
  64) items are queued, whichever comes first, then flushes.
* A flush hands at most `max_batch` items to the owner's `flush(items)`: one Redis pipeline
  (transaction=False, `pipelined` below), one EVALSHA per item, under one deadline for the whole flush.
  The owner dispatches each item's reply, and takes the failure path for the items of a failed flush
  (settlement journals them, router/accounting.py; affinity counts them, router/affinity_store.py).
  Flushes never overlap (one lock), so `drain` can tell when nothing is in flight.
* Bounded: at most `max_queue` (MAX_QUEUE, 4096) items wait. `put` returns False when the queue is full
  (counted: `overflow`, tiergate_redis_batch_overflow) and the caller takes its own path: a settlement is
  settled unbatched (its own task and round trip, the journal on failure: never dropped), an affinity
  record is dropped (counted, it fails open).
* `drain`: flushes everything queued and waits for the flush in flight, with or without a running flusher
  (shutdown, tests). Without one, items wait for `drain`.
* A flush cancelled midway puts its items back at the head of the queue, for `drain`: each owner's work
  is idempotent per item (a settlement per request id, an affinity record per block hash), so an item
  that did land is harmless when sent again.

`pipelined(redis, calls)`: the one round trip. A NOSCRIPT reply (Redis restarted or flushed its script
cache) loads that script and sends its calls again, one more round trip, as redis-py's Script does for a
single call (redis-py's own pipeline path would ask SCRIPT EXISTS before every flush instead).
Counters (`flushes`, `items`, `windowed`, `overflow`) are plain ints as well as metrics, for tests.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from router.logs import get_logger
from router.metrics import RouterMetrics
from router.redis_pool import RedisClient, load_script

__all__ = ["MAX_BATCH", "MAX_QUEUE", "WINDOW_S", "Call", "MicroBatcher", "ReplicationError", "Wait", "pipelined"]

WINDOW_S = 0.001
MAX_BATCH = 64
MAX_QUEUE = 4096

T = TypeVar("T")
Call = tuple[Any, Sequence[Any], Sequence[Any]]   # (a registered redis-py Script, keys, args)


def _release(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class MicroBatcher(Generic[T]):
    def __init__(self, name: str, flush: Callable[[list[T]], Awaitable[None]], *, window_s: float = WINDOW_S,
                 max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
                 metrics: RouterMetrics | None = None) -> None:
        self.name = name
        self.flush = flush
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics
        self.queue: deque[T] = deque()
        self.flushes = 0      # flushes (round trips) made
        self.items = 0        # items flushed
        self.windowed = 0     # flushes that first collected for the window (the rest went out at once)
        self.overflow = 0     # items refused by a full queue
        self._wake = asyncio.Event()
        self._full: asyncio.Future[None] | None = None   # set while collecting: resolved at max_batch items
        self._lock = asyncio.Lock()
        self.log = get_logger("tiergate.redis_batch")

    @property
    def idle(self) -> bool:
        """Nothing queued and no flush in flight: the next `put` goes out at once."""
        return not self.queue and not self._lock.locked()

    def put(self, item: T) -> bool:
        """Queue `item` for the next flush; False (nothing queued) when the queue is full."""
        q = self.queue
        if len(q) >= self.max_queue:
            self.overflow += 1
            if self.metrics is not None:
                self.metrics.child(self.metrics.redis_batch_overflow, self.name).inc()
            return False
        q.append(item)
        self._wake.set()
        if self._full is not None and len(q) >= self.max_batch:
            _release(self._full)
        return True

    async def run(self) -> None:
        """The flusher (lifespan-owned): at once when idle, after at most `window_s` under load."""
        loop = asyncio.get_running_loop()
        busy = False
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                busy = False           # it was idle: this flush goes out at once
                continue
            windowed = busy and len(self.queue) < self.max_batch
            if windowed:
                await self._collect(loop)
            async with self._lock:
                if self.queue:
                    await self._flush(self._take(), windowed)
            busy = True

    async def _collect(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait `window_s`, or less when `max_batch` items are queued first."""
        fut: asyncio.Future[None] = loop.create_future()
        self._full = fut
        handle = loop.call_later(self.window_s, _release, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._full = None

    def _take(self) -> list[T]:
        q = self.queue
        return [q.popleft() for _ in range(min(len(q), self.max_batch))]

    async def _flush(self, batch: list[T], windowed: bool) -> None:
        self.flushes += 1
        self.items += len(batch)
        self.windowed += windowed
        if self.metrics is not None:
            self.metrics.child(self.metrics.redis_batch_flushes, self.name,
                               "window" if windowed else "at_once").inc()
            self.metrics.child(self.metrics.redis_batch_items, self.name).inc(len(batch))
        try:
            await self.flush(batch)
        except asyncio.CancelledError:
            self.queue.extendleft(reversed(batch))   # for `drain`: each item is idempotent
            raise
        except Exception as exc:   # the owner's failure path itself failed (a journal write): logged
            self.log.error("redis_batch_flush_failed", batch=self.name, items=len(batch),
                           error=type(exc).__name__, exc_info=exc)

    async def drain(self) -> None:
        """Flush everything queued, and wait for a flush in flight (the flusher's, if it runs)."""
        while True:
            async with self._lock:
                if not self.queue:
                    return
                await self._flush(self._take(), False)


class ReplicationError(RedisConnectionError):
    """A write that Redis ran but no replica confirmed in time (`WAIT`): it may be lost if its master fails
    now, so the caller takes its failure path (a settlement goes to the journal and replays, idempotently)."""


Wait = tuple[int, int]   # (replicas, timeout ms): `WAIT replicas timeout` after the writes, per node


async def pipelined(redis: RedisClient, calls: Sequence[Call], wait: Wait | None = None) -> list[Any]:
    """One round trip: each call one EVALSHA, in one pipeline (transaction=False); on a Redis Cluster the
    pipeline is split by node (each call's keys are in one slot). -> the replies in order, a command's own
    error as its exception object. Raises when the round trip fails as a whole (the caller sets the
    deadline). Scripts Redis does not know (NOSCRIPT: a restarted or newly promoted node) are loaded (on
    every primary of a cluster) and their calls sent again.
    `wait`: each node's calls are followed by `WAIT replicas timeout_ms` on the same connection; a call
    whose node answers fewer replicas (or whose slot moved meanwhile) is answered a ReplicationError."""
    replies = await _send(redis, calls, wait)
    missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
    if missing:
        scripts = {id(calls[i][0]): calls[i][0] for i in missing}
        for script in scripts.values():
            await load_script(redis, script.script)
        again = await _send(redis, [calls[i] for i in missing], wait)
        for i, r in zip(missing, again, strict=True):
            replies[i] = r
    return replies


def _node(redis: RedisCluster, keys: Sequence[Any]) -> Any:
    k = keys[0]
    return redis.nodes_manager.get_node_from_slot(key_slot(k.encode() if isinstance(k, str) else bytes(k)))


async def _send(redis: RedisClient, calls: Sequence[Call], wait: Wait | None = None) -> list[Any]:
    cluster = isinstance(redis, RedisCluster)
    nodes: list[Any] = []
    async with redis.pipeline(transaction=False) as pipe:   # its connection goes back on exit, even cancelled
        for script, keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        if wait is not None:
            if isinstance(redis, RedisCluster):
                nodes = [_node(redis, keys) for _, keys, _ in calls]
                for node in dict.fromkeys(nodes):
                    pipe.execute_command("WAIT", *wait, target_nodes=node)
            else:
                pipe.execute_command("WAIT", *wait)
        out = list(await pipe.execute(raise_on_error=False))
    if wait is None:
        return out
    replies, acks = out[:len(calls)], out[len(calls):]
    if not cluster:
        nodes = [None] * len(calls)
    acked = dict(zip(dict.fromkeys(nodes), acks, strict=True))
    for i, node in enumerate(nodes):
        ack = acked[node]
        moved = isinstance(redis, RedisCluster) and _node(redis, calls[i][1]) is not node   # the slot moved
        if not isinstance(replies[i], Exception) and (isinstance(ack, Exception) or int(ack) < wait[0] or moved):
            replies[i] = ReplicationError(f"not confirmed by {wait[0]} replica(s) in {wait[1]} ms")
    return replies
