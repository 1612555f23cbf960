"""Per-instance prefill windows, shared by every replica in Redis, on Redis time.

Algorithm: a token bucket per (tier, instance), in uncached prefill tokens. It refills at `rate` tokens
per second up to `burst` (= rate x the window length: what the instance prefills in one window), and
starts full. `take(cost)` admits a request when the bucket is above its class's floor (0; below 0 for
the class allowed to overdraw: router/admission/gate.py), whatever its cost, and takes the
whole cost, so the bucket may go negative: a 100K-token document is admitted as soon as the window has
room (small requests can never starve it) and then holds the instance's windows for about its own
prefill time (cost / rate), the time the engine is busy with it anyway; meanwhile the bucket refills,
window by window, and requests queued behind it bind to whichever instance's window opens first. A
refused take says how long until the bucket is positive again (`wait_s`).
Integers only: the bucket is kept in milli-tokens (refill = elapsed ms x rate), so the Lua script and
the in-memory twin (router/replay/window_twin.py) agree to the token (tests/test_window_store.py runs
both against one contract).
Layout: `{tg:win:<tier>}:<instance>` is a hash {m: milli-tokens, ts: ms of the last refill}, with
a PEXPIRE of the time to refill from where it stands plus a second (an idle window's key goes away: a
missing key is a full bucket). One hash tag per tier, so tiers spread over a Redis Cluster's shards (the
script touches one key). Before the cluster release the keys were `{tiergate-win}:<tier>:<instance>`: an
upgrade starts every window full (the old keys expire within seconds), as after an idle spell.
Failure mode: windows fail open. Every call has a short timeout; a failure answers None and the caller
falls back to its replica-local windows (the same bucket in memory), counted and logged by the caller.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from router.affinity_store import _NOW
from router.redis_pool import RedisClient, register

# KEYS[1]: the window. ARGV: now ms ('' = Redis TIME), rate (tokens/s), burst (tokens), cost (tokens),
# floor (tokens: admit while the bucket is above it; 0 by default, negative for a class allowed to overdraw)
_TAKE = _NOW + """
local now = now_ms(ARGV[1])
local rate = tonumber(ARGV[2]); local burst_m = tonumber(ARGV[3]) * 1000; local cost_m = tonumber(ARGV[4]) * 1000
local v = redis.call('HMGET', KEYS[1], 'm', 'ts')
local m = tonumber(v[1]) or burst_m
local ts = tonumber(v[2]) or now
if now > ts then
  m = m + (now - ts) * rate
  ts = now
end
m = math.min(burst_m, m)   -- never above this window's burst (the window shrinks as the step time does)
local floor_m = tonumber(ARGV[5] or '0') * 1000
local ok = 0
if m > floor_m then
  m = m - cost_m
  ok = 1
end
redis.call('HSET', KEYS[1], 'm', string.format('%.0f', m), 'ts', string.format('%.0f', ts))
redis.call('PEXPIRE', KEYS[1], math.floor((burst_m - m) / rate) + 1000)   -- m <= burst_m: >= 1 s
local wait_ms = 0
if ok == 0 then wait_ms = math.floor((floor_m - m) / rate) + 1 end
return {ok, string.format('%.0f', m), wait_ms}
"""


def window_key(tier: str, instance: str) -> str:
    return f"{{tg:win:{tier}}}:{instance}"


@dataclass(frozen=True)
class Grant:
    ok: bool            # admitted (the cost is taken)
    tokens: float       # the bucket after this call (negative: debt)
    wait_s: float       # refused: seconds until the bucket is above the floor again


def check(rate: float, burst: float, cost: int, floor: float = 0) -> tuple[int, int, int, int]:
    """The integer arguments of a take (rate and burst at least 1 token, cost at least 0, the floor below
    the burst)."""
    b = max(1, int(burst))
    return max(1, int(rate)), b, max(0, int(cost)), min(int(floor), b - 1)


class WindowStore:
    def __init__(self, redis: RedisClient, *, timeout_s: float = 0.05, clock_ms: Any = None) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        self.clock_ms = clock_ms      # None: Redis TIME
        self._take = register(redis, _TAKE)

    async def take(self, tier: str, instance: str, cost: int, rate: float, burst: float,
                   floor: float = 0) -> Grant | None:
        """Admit `cost` prefill tokens on the instance's window while it is above `floor`, or say how long
        until it is. None: the store is unavailable (fail open to local windows)."""
        r, b, c, f = check(rate, burst, cost, floor)
        now = "" if self.clock_ms is None else str(self.clock_ms())
        try:
            async with asyncio.timeout(self.timeout_s):
                ok, m, wait_ms = await self._take(keys=[window_key(tier, instance)], args=[now, r, b, c, f])
        except Exception:
            return None
        return Grant(bool(int(ok)), int(m) / 1000, int(wait_ms) / 1000)
