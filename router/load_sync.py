"""Share every replica's per-instance load through Redis, so all replicas route on the same counts.

Each router replica keeps exact local counts at dispatch and completion (in flight,
requests still waiting for their first token, and their uncached prompt tokens).
Every `interval_s` (default 50 ms) one EVALSHA

* writes this replica's non-zero counts into the hash `tiergate:load`, field = replica
  id, value = `<redis ms>|<json>` (Redis' TIME, so replicas share one clock);
* drops fields older than `stale_ms` (a crashed replica's load vanishes by itself);
* returns every other live replica's counts.

The sum of the peers' counts lands in `InstanceState.peer_*`, and `Registry.candidates`
adds it to the local counts the policies see (`bounded_load`, `load`, `slo_feasible`).

Idle: when this replica has no load, sent none at its last sync, that sync saw none from its peers, and
no request arrived in the last `idle_s`, the loop sleeps `idle_s` (default 1 s) between syncs instead of
`interval_s`. A request that arrives meanwhile wakes it (`wake`), and when the last sync is older than
an interval asks for one beside its own affinity lookup (`refresh`), so its decision sees the peers'
load as fresh as a busy replica's; the loop then syncs every interval until it is quiet again. An idle
fleet costs one EVALSHA a second per replica, not twenty.

Staleness: a peer's dispatches become visible within one interval plus a round trip (within `idle_s`
to a replica that is idle itself, and so routes nothing on them).
Failure mode: fails open to local counts. Each sync has a short timeout; on failure the
last peer counts are kept until they are `stale_ms` old, then dropped, and the
failure is counted (`tiergate_load_sync_total{result}`). A sync never blocks a request:
it runs in its own lifespan-owned task.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import msgspec

from backends.registry import Registry
from router.redis_pool import RedisClient, register

KEY = "tiergate:load"

_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stale = tonumber(ARGV[3])
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else
  redis.call('HSET', KEYS[1], ARGV[1], now .. '|' .. ARGV[2]) end
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  local v = all[i + 1]
  local bar = string.find(v, '|', 1, true)
  local at = tonumber(string.sub(v, 1, bar - 1))
  if now - at > stale then redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] ~= ARGV[1] then out[#out + 1] = string.sub(v, bar + 1) end
end
redis.call('PEXPIRE', KEYS[1], stale * 10)
return out
"""

_dec = msgspec.json.Decoder(dict[str, tuple[int, int, int]])
_enc = msgspec.json.Encoder()


class LoadSync:
    def __init__(self, redis: RedisClient, registry: Registry, replica_id: str, *, interval_s: float = 0.05,
                 timeout_s: float = 0.05, stale_s: float = 2.0, idle_s: float = 1.0,
                 on_result: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.registry = registry
        self.replica_id = replica_id
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stale_s = stale_s
        self.on_result = on_result or (lambda _r: None)
        self.clock = clock
        self.last_ok: float | None = None
        self.idle_s = min(idle_s, stale_s / 2)
        self._quiet = False          # the last sync sent no load and got none back
        self._kick: asyncio.Event | None = None
        self._busy_until = 0.0       # a request arrived: sync every interval at least until then
        self._script: Any = register(redis, _SYNC)

    def local_counts(self) -> bytes:
        counts = {f"{i.tier}/{i.instance_id}": (i.in_flight, i.pending_requests, i.pending_tokens)
                  for i in self.registry.all_instances() if i.in_flight or i.pending_requests or i.pending_tokens}
        return _enc.encode(counts) if counts else b"{}"

    def apply(self, peers: list[bytes]) -> None:
        """Sum the peers' counts into each instance's `peer_*` fields (zero where no peer has load)."""
        total: dict[str, list[int]] = {}
        for raw in peers:
            try:
                counts = _dec.decode(raw)
            except msgspec.DecodeError:
                continue
            for key, (fl, pr, pt) in counts.items():
                acc = total.setdefault(key, [0, 0, 0])
                acc[0] += fl
                acc[1] += pr
                acc[2] += pt
        for inst in self.registry.all_instances():
            fl, pr, pt = total.get(f"{inst.tier}/{inst.instance_id}", (0, 0, 0))
            inst.peer_in_flight, inst.peer_pending_requests, inst.peer_pending_tokens = fl, pr, pt

    def idle(self, local: bytes) -> bool:
        """Nothing to send and nothing heard (`wake` clears that when a request arrives), and the last sync
        is younger than `idle_s`: skip this tick."""
        return (local == b"{}" and self._quiet and self.last_ok is not None
                and self.clock() - self.last_ok < self.idle_s)

    def needs_refresh(self) -> bool:
        """The ticks are skipping Redis (idle) and the last sync is older than an interval."""
        return self._quiet and self.last_ok is not None and self.clock() - self.last_ok >= self.interval_s

    async def refresh(self) -> None:
        """One sync now, for a request that arrives while the replica is idle (never raises)."""
        self.wake()
        await self.sync_once()

    def wake(self) -> None:
        """A request arrived: the loop syncs every interval for at least `idle_s` (its dispatch, made after
        this, reaches the peers within an interval)."""
        self._busy_until = self.clock() + self.idle_s
        if self._quiet:
            self._quiet = False
            if self._kick is not None:
                self._kick.set()

    async def sync_once(self) -> bool:
        local = self.local_counts()
        if self.idle(local):
            return True
        try:
            async with asyncio.timeout(self.timeout_s):  # not wait_for: on 3.11 it can swallow a cancel
                peers = await self._script(
                    keys=[KEY], args=[self.replica_id, local, int(self.stale_s * 1000)])
        except Exception:  # fail open to local counts; old peer counts age out below
            self.on_result("error")
            if self.last_ok is not None and self.clock() - self.last_ok > self.stale_s:
                self.apply([])
                self.last_ok = None
            return False
        got = list(peers)
        self._quiet = local == b"{}" and not any(p != b"{}" for p in got) and self.clock() >= self._busy_until
        self.apply(got)
        self.last_ok = self.clock()
        self.on_result("ok")
        return True

    async def run(self) -> None:
        task = asyncio.current_task()
        kick = self._kick = asyncio.Event()
        while True:
            await self.sync_once()
            if task is not None and task.cancelling():
                # a cancel that arrived inside the Redis call and came out as an error (caught above, to
                # fail open) must still stop the loop: seen as `shutdown_tasks_stuck: load-sync`
                raise asyncio.CancelledError
            kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.idle_s if self._quiet else self.interval_s):
                    await kick.wait()

    async def leave(self) -> None:
        """Remove this replica's counts at shutdown (a crash leaves them to expire after `stale_s`)."""
        try:
            async with asyncio.timeout(max(self.timeout_s, 0.2)):
                await cast("Awaitable[int]", self.redis.hdel(KEY, self.replica_id))  # redis-py 7 types
        except Exception:
            pass
