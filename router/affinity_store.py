"""The shared prefix-affinity index in Redis: one sorted set per (tier, instance).

Layout: `{tg:aff:<tier>}:<instance>` is a ZSET of 8-byte block hashes (see
`prefix_hash`); one hash tag per tier, so a tier's instances share a Redis Cluster slot and tiers spread
over the shards. (Before the cluster release every tier shared one tag, `{tiergate-aff}:<tier>:<instance>`;
an upgrade leaves those keys to expire by their TTL and the index rebuilds itself from new traffic: the
first requests after it route without affinity, as after a Redis restart.) A member's score is
`redis_ms * 1024 - i`, where i is the block's sample index in the request that recorded it: newer requests
score higher, and within a request the tail scores lower than the prefix, so trimming the lowest scores
evicts least-recently-used chains tail first, like vLLM's block pool.

* `lookup`: one round trip for all tiers of a request. On a Redis Cluster, one EVALSHA per tier (a
  pipeline when there are several, each script in its tier's slot); on one node (or Sentinel's master),
  where slots do not apply, one EVALSHA for all of them (less client CPU per request). For each instance
  it binary-searches the request's sampled hashes for the longest present prefix
  (entries older than the TTL count as absent) and returns the matched count.
* `record`: after dispatch, ZADD the chosen instance's hashes, drop entries older
  than the TTL, trim to the instance's KV capacity in blocks, and PEXPIRE the key.
  `record_later` (the forwarder's, off the request path) queues it on a micro-batcher
  (router/redis_batch.py, flusher `batch.run` owned by the app's lifespan): up to 64
  records per pipelined round trip, under one `timeout_s`; a full queue drops the record.
* `claim`: at decision time, atomically: if another instance of the tier now holds more of the
  request's prefix than its lookup saw (a concurrent request with the same new prefix, on any replica,
  just claimed it), say which, and record nothing; else record for the chosen instance, as `record`.
* `remove` / `clear`: engine KV events (BlockRemoved, AllBlocksCleared).

Scripts use Redis' TIME, so every replica shares one clock (a test may inject one, `clock_ms`). Each
script touches the keys of one tier, one hash tag, so the scripts also run on a Redis Cluster.
router/replay/affinity_twin.py is the in-memory twin (tests/test_store_contract.py runs both alike).

Failure mode: affinity fails open. Every call has a short timeout; failures feed a
circuit breaker (closed -> open for `cooldown_s` after `failures` consecutive errors
-> one half-open trial). While it is open, lookups return no matches at once and
records are dropped; routing goes on by load and cost. Each skip and error is
counted, and breaker transitions are logged. A batched flush is one call to the breaker
(one trial while half-open); a failed flush counts an error for each of its records.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from router.logs import get_logger
from router.metrics import RouterMetrics
from router.redis_batch import Call, MicroBatcher, pipelined
from router.redis_pool import RedisClient, is_cluster, register

_NOW = """
local function now_ms(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# The longest present prefix of ARGV[h0 + 1 .. h0 + nh] in `key` (entries scored below min_score are absent)
_LONGEST = """
local function longest(key, h0, nh, min_score)
  local lo, hi = 0, nh
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    local s = redis.call('ZSCORE', key, ARGV[h0 + mid])
    if s and tonumber(s) >= min_score then lo = mid else hi = mid - 1 end
  end
  return lo
end
"""

# ZADD ARGV[h0 + 1 ..] to `key` scored now_ms * 1024 - i, drop entries past the TTL, trim to `cap`,
# PEXPIRE; -> the tracked count
_ADD = """
local function add(key, h0, now_ms, ttl, cap)
  local base = now_ms * 1024
  local args = {}
  for i = h0 + 1, #ARGV do
    args[#args + 1] = base - (i - h0 - 1); args[#args + 1] = ARGV[i]
    if #args >= 2000 then redis.call('ZADD', key, unpack(args)); args = {} end
  end
  if #args > 0 then redis.call('ZADD', key, unpack(args)) end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('(%.0f', (now_ms - ttl) * 1024 - 1024))
  local n = redis.call('ZCARD', key)
  if n > cap then redis.call('ZREMRANGEBYRANK', key, 0, n - cap - 1) end
  redis.call('PEXPIRE', key, ttl)
  return n > cap and cap or n
end
"""

# ARGV: now ms ('' = Redis TIME), ttl ms, groups, then per group: instance count, hash count, hashes
_LOOKUP = _NOW + _LONGEST + """
local now_ms = now_ms(ARGV[1])
local min_score = (now_ms - tonumber(ARGV[2])) * 1024 - 1024
local out = {}
local a = 4
local k = 1
for g = 1, tonumber(ARGV[3]) do
  local nkeys = tonumber(ARGV[a]); local nh = tonumber(ARGV[a + 1]); local h0 = a + 1
  a = a + 2 + nh
  for _ = 1, nkeys do
    out[#out + 1] = longest(KEYS[k], h0, nh, min_score); k = k + 1
  end
end
return out
"""

# ARGV: now ms ('' = Redis TIME), ttl ms, capacity, hashes
_RECORD = _NOW + _ADD + """
return add(KEYS[1], 3, now_ms(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
"""

# Claim at decision time (prefix coalescing): KEYS = every instance index of one tier, the chosen first.
# ARGV: now ms ('' = Redis TIME), ttl ms, capacity of the chosen, instance count, then per instance the
# matched count the request's lookup saw, then the hashes. Each instance's longest present prefix is
# searched again; one that now holds more than its lookup saw, and more than the chosen holds, was just
# claimed by a concurrent request (this replica's or another's): returned as {index, matched, chosen's},
# and nothing is recorded. Else the hashes are recorded for the chosen (as _RECORD) and {1, chosen's,
# chosen's} returned.
_CLAIM = _NOW + _LONGEST + _ADD + """
local now_ms = now_ms(ARGV[1])
local ttl = tonumber(ARGV[2]); local cap = tonumber(ARGV[3]); local ni = tonumber(ARGV[4])
local h0 = 4 + ni
local nh = #ARGV - h0
local min_score = (now_ms - ttl) * 1024 - 1024
local mine = longest(KEYS[1], h0, nh, min_score)
local best, best_n = 1, mine
for k = 2, ni do
  local n = longest(KEYS[k], h0, nh, min_score)
  if n > tonumber(ARGV[4 + k]) and n > best_n then best, best_n = k, n end
end
if best ~= 1 then return {best, best_n, mine} end
add(KEYS[1], h0, now_ms, ttl, cap)
return {1, mine, mine}
"""

Clock = Callable[[], float]


def index_key(tier: str, instance: str) -> str:
    """One tag per tier: every script's keys are one tier's, so one slot (a `}` in the tier name ends the
    tag at the same place for all of its keys: still one slot, and full key names stay distinct)."""
    return f"{{tg:aff:{tier}}}:{instance}"


class Breaker:
    """Consecutive-failure circuit breaker with a half-open trial; the clock is injected."""

    def __init__(self, failures: int = 3, cooldown_s: float = 5.0, clock: Clock = time.monotonic) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.consecutive = 0
        self.open_until: float | None = None
        self.trial = False

    @property
    def state(self) -> str:
        if self.open_until is None:
            return "closed"
        return "half_open" if self.clock() >= self.open_until else "open"

    def allow(self) -> bool:
        if self.open_until is None:
            return True
        if self.clock() < self.open_until or self.trial:
            return False
        self.trial = True  # one trial call while half-open
        return True

    def success(self) -> bool:
        """Record a success; True if this closed an open breaker."""
        was_open = self.open_until is not None
        self.consecutive, self.open_until, self.trial = 0, None, False
        return was_open

    def failure(self) -> bool:
        """Record a failure; True if this opened the breaker."""
        self.consecutive += 1
        self.trial = False
        if self.open_until is not None or self.consecutive >= self.failures:
            opened = self.open_until is None or self.clock() >= self.open_until
            self.open_until = self.clock() + self.cooldown_s
            return opened
        return False


class AffinityStore:
    def __init__(self, redis: RedisClient, *, timeout_s: float = 0.05, breaker: Breaker | None = None,
                 on_event: Callable[[str, str], None] | None = None, max_pending: int = 1024,
                 clock_ms: Callable[[], int] | None = None, metrics: RouterMetrics | None = None) -> None:
        self.redis = redis
        self.clock_ms = clock_ms          # None: Redis TIME (tests and the twin's contract test inject one)
        self.timeout_s = timeout_s
        self.breaker = breaker or Breaker()
        self.on_event = on_event or (lambda _op, _result: None)
        self.max_pending = max_pending
        self._lookup = register(redis, _LOOKUP)
        self._record = register(redis, _RECORD)
        self._claim = register(redis, _CLAIM)
        self.batch: MicroBatcher[Call] = MicroBatcher("affinity_record", self._flush_records,
                                                      max_queue=max_pending, metrics=metrics)
        self.log = get_logger("tiergate.affinity")

    def _now(self) -> str:
        return "" if self.clock_ms is None else str(self.clock_ms())

    async def _call(self, op: str, coro: Any, n: int = 1) -> Any:
        """`coro` under the timeout, fed to the breaker; a failure counts `n` errors (the records of a flush)."""
        try:
            async with asyncio.timeout(self.timeout_s):  # not wait_for: on 3.11 it can swallow a cancel
                result = await coro
        except Exception as exc:
            for _ in range(n):
                self.on_event(op, "error")
            if self.breaker.failure():
                self.log.warning("affinity_breaker_open", op=op, error=type(exc).__name__,
                                 cooldown_s=self.breaker.cooldown_s)
            raise
        if self.breaker.success():
            self.log.info("affinity_breaker_closed", op=op)
        return result

    async def lookup(self, groups: Sequence[tuple[str, Sequence[str], Sequence[bytes]]],
                     ttl_s: float) -> dict[tuple[str, str], int] | None:
        """For each (tier, instances, hashes): matched leading hashes per (tier, instance).

        None when the index is unavailable (breaker open, timeout, error): fail open."""
        groups = [g for g in groups if g[1] and g[2]]
        if not groups:
            return {}
        if not self.breaker.allow():
            self.on_event("lookup", "skipped")
            return None
        now, ttl_ms = self._now(), int(ttl_s * 1000)
        calls: list[Call] = [(self._lookup, [index_key(tier, i) for i in instances],
                              [now, ttl_ms, 1, len(instances), len(hashes), *hashes])
                             for tier, instances, hashes in groups]     # one script per tier: one slot each
        if len(calls) > 1 and not is_cluster(self.redis):   # one node: all tiers in one script (less client CPU)
            argv: list[Any] = [now, ttl_ms, len(calls)]
            for _s, _k, args in calls:
                argv.extend(args[3:])
            calls = [(self._lookup, [k for _s, keys, _a in calls for k in keys], argv)]
        try:
            res = await self._call("lookup", self._lookup_calls(calls))
        except Exception:
            return None
        flat = [n for found in res for n in found]
        out: dict[tuple[str, str], int] = {}
        k = 0
        for tier, instances, _h in groups:
            for inst in instances:
                out[(tier, inst)] = int(flat[k])
                k += 1
        self.on_event("lookup", "ok")
        return out

    async def _lookup_calls(self, calls: list[Call]) -> list[Any]:
        """One tier: its EVALSHA. Several: one pipelined round trip; any tier's error fails the lookup."""
        if len(calls) == 1:
            script, keys, args = calls[0]
            return [await script(keys=keys, args=args)]
        replies = await pipelined(self.redis, calls)
        for r in replies:
            if isinstance(r, Exception):
                raise r
        return replies

    async def record(self, tier: str, instance: str, hashes: Sequence[bytes], ttl_s: float,
                     capacity_blocks: int) -> int | None:
        """Add `hashes` for an instance; returns the tracked block count, None on failure."""
        if not hashes:
            return 0
        if not self.breaker.allow():
            self.on_event("record", "skipped")
            return None
        try:
            n = await self._call("record", self._record(keys=[index_key(tier, instance)],
                                                         args=[self._now(), int(ttl_s * 1000), capacity_blocks,
                                                               *hashes]))
        except Exception:
            return None
        self.on_event("record", "ok")
        return int(n)

    async def claim(self, tier: str, chosen: str, seen: Sequence[tuple[str, int]], hashes: Sequence[bytes],
                    ttl_s: float, capacity_blocks: int) -> tuple[str, int] | None:
        """Record `hashes` for `chosen` unless another instance of the tier now holds a longer prefix of
        them than the lookup saw there (`seen`: (instance, matched) for the tier's other instances) and
        than `chosen` holds: then -> (that instance, its matched count), recording nothing. Else ->
        (chosen, its matched count before this record). None: unavailable (fail open: dispatch as decided,
        the forwarder records as it sends)."""
        if not hashes:
            return chosen, 0
        if not self.breaker.allow():
            self.on_event("claim", "skipped")
            return None
        others = [(i, n) for i, n in seen if i != chosen]
        keys = [index_key(tier, chosen), *(index_key(tier, i) for i, _ in others)]
        argv: list[Any] = [self._now(), int(ttl_s * 1000), capacity_blocks, len(keys), 0, *(n for _, n in others),
                           *hashes]
        try:
            idx, matched, _mine = await self._call("claim", self._claim(keys=keys, args=argv))
        except Exception:
            return None
        idx = int(idx)
        self.on_event("claim", "ok" if idx == 1 else "coalesced")
        return (chosen if idx == 1 else others[idx - 2][0]), int(matched)

    def record_later(self, tier: str, instance: str, hashes: Sequence[bytes], ttl_s: float,
                     capacity_blocks: int) -> None:
        """`record` off the request path: queued for the next batched flush; dropped (counted) when
        `max_pending` records already wait, so a slow Redis can't pile them up."""
        if not hashes:
            return
        call = (self._record, [index_key(tier, instance)],
                [self._now(), int(ttl_s * 1000), capacity_blocks, *hashes])
        if not self.batch.put(call):
            self.on_event("record", "dropped")

    async def _flush_records(self, calls: list[Call]) -> None:
        """One flush of `record_later`'s queue: one round trip, one breaker call (fail open)."""
        if not self.breaker.allow():
            for _ in calls:
                self.on_event("record", "skipped")
            return
        try:
            replies = await self._call("record", pipelined(self.redis, calls), len(calls))
        except Exception:
            return
        for r in replies:
            self.on_event("record", "error" if isinstance(r, Exception) else "ok")

    async def remove(self, tier: str, instance: str, hashes: Sequence[bytes]) -> None:
        if hashes:
            await self._call("remove", self.redis.zrem(index_key(tier, instance), *hashes))

    async def clear(self, tier: str, instance: str) -> None:
        await self._call("clear", self.redis.delete(index_key(tier, instance)))

    async def size(self, tier: str, instance: str) -> int:
        return int(await self.redis.zcard(index_key(tier, instance)))

    async def drain(self) -> None:
        """Flush the queued records and wait for a flush in flight (shutdown and tests)."""
        await self.batch.drain()
