"""In-memory twin of the prefill windows (router/admission/window_store.py): the same token bucket in
milli-tokens, the same answers to the token, on an injected clock (ms). Replay runs on it, and a router
whose Redis is away falls back to it as its replica-local windows. tests/test_window_store.py runs it
and the Redis store through one contract."""

from __future__ import annotations

from collections.abc import Callable

from router.admission.window_store import Grant, check


class MemoryWindowStore:
    def __init__(self, clock_ms: Callable[[], int]) -> None:
        self.clock_ms = clock_ms
        self.buckets: dict[tuple[str, str], tuple[int, int]] = {}   # -> (milli-tokens, ms of the last refill)

    def take_now(self, tier: str, instance: str, cost: int, rate: float, burst: float, floor: float = 0) -> Grant:
        r, b, c, f = check(rate, burst, cost, floor)
        floor_m = f * 1000
        now = self.clock_ms()
        burst_m = b * 1000
        m, ts = self.buckets.get((tier, instance), (burst_m, now))   # the Redis key's expiry: a full bucket
        if now > ts:
            m, ts = m + (now - ts) * r, now
        m = min(burst_m, m)              # never above this window's burst (it shrinks as the step time does)
        ok = m > floor_m
        if ok:
            m -= c * 1000
        self.buckets[(tier, instance)] = (m, ts)
        return Grant(ok, m / 1000, 0.0 if ok else ((floor_m - m) // r + 1) / 1000)

    async def take(self, tier: str, instance: str, cost: int, rate: float, burst: float,
                   floor: float = 0) -> Grant | None:
        return self.take_now(tier, instance, cost, rate, burst, floor)
