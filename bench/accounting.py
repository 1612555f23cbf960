"""Accounting figures: admission exactness under concurrency, and the cost of admit + settle.

Against a real Redis (default the machine's, db 12), through `router.budget_store.BudgetStore`
with two separate connection pools standing in for two router replicas:

* for budgets that fit k worst-case requests, 64 concurrent admissions: how many were
  admitted, and the overshoot of reserved cost past the budget (must be 0);
* admit and settle latency (p50/p99, sequential), and admit+settle throughput at
  concurrency 64.

The end-to-end scenarios (dropped streams, Redis killed and restarted, two routers)
are tests: `pytest tests/test_accounting.py -v`.

Usage: python bench/accounting.py [--redis-url redis://127.0.0.1:6379/12] [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from router.budget_store import BudgetStore, Usage


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p / 100))] * 1000 if s else float("nan")


def usage(cost: int) -> Usage:
    return Usage(tier="fast", instance="i0", route="auto", status=200, prompt=900, cached=0, completion=100,
                 cost=cost, base=cost * 3, nocache=cost, latency_ms=10.0, ttft_ms=2.0, slo_met=True,
                 at_ms=int(time.time() * 1000))


async def main(url: str, n: int) -> None:
    pools = [aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)]
    stores = [BudgetStore(p) for p in pools]
    worst = 1_000_000
    print("## Concurrent admission against a budget that fits k worst-case requests (64 at once, 2 pools)\n")
    print("| k | admitted | rejected | reserved / budget | overshoot (units) |")
    print("|---|---|---|---|---|")
    for k in (1, 5, 20, 63):
        t = "bench-" + uuid.uuid4().hex[:6]
        budget = k * worst + worst // 2
        res = await asyncio.gather(*(stores[i % 2].admit(t, f"r{i}", rpm=None, tpm=None, tokens=1000, reserve=worst,
                                                         daily=budget, monthly=None, ttl_s=60) for i in range(64)))
        st = await stores[0].status(t)
        ok = sum(1 for a in res if a.ok)
        print(f"| {k} | {ok} | {64 - ok} | {st['reserved_day']:,} / {budget:,} | "
              f"{max(0, st['reserved_day'] - budget)} |")
    t = "bench-" + uuid.uuid4().hex[:6]
    lat_a, lat_s = [], []
    for i in range(n):
        t0 = time.perf_counter()
        await stores[0].admit(t, f"s{i}", rpm=None, tpm=10**9, tokens=1000, reserve=worst, daily=10**15,
                              monthly=10**16, ttl_s=60)
        t1 = time.perf_counter()
        await stores[0].settle(t, f"s{i}", usage(worst // 3))
        lat_a.append(t1 - t0)
        lat_s.append(time.perf_counter() - t1)
    sem = asyncio.Semaphore(64)
    t = "bench-" + uuid.uuid4().hex[:6]

    async def one(i: int) -> None:
        async with sem:
            s = stores[i % 2]
            await s.admit(t, f"c{i}", rpm=None, tpm=10**9, tokens=1000, reserve=worst, daily=10**15, monthly=None,
                          ttl_s=60)
            await s.settle(t, f"c{i}", usage(worst // 3))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    dt = time.perf_counter() - t0
    st = await stores[0].status(t)
    print(f"\n## Admission and settlement cost ({n} requests)\n")
    print("| step | p50 ms | p99 ms |\n|---|---|---|")
    print(f"| admit (RPM/TPM + day/month reservation) | {pct(lat_a, 50):.3f} | {pct(lat_a, 99):.3f} |")
    print(f"| settle (+ ledger record + hourly aggregates) | {pct(lat_s, 50):.3f} | {pct(lat_s, 99):.3f} |")
    print(f"\nadmit+settle at concurrency 64 over 2 pools: {n / dt:,.0f} requests/s; "
          f"spent {st['spent_day']:,} units = {n} x {worst // 3:,} exactly: {st['spent_day'] == n * (worst // 3)}; "
          f"left reserved: {st['reserved_day']}")
    for p in pools:
        await p.aclose()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--n", type=int, default=2000)
    a = ap.parse_args()
    asyncio.run(main(a.redis_url, a.n))
