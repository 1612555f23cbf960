"""Settlement cost, batched (router/redis_batch.py) against unbatched (a task and a round trip each, as before
issue #15): bursts of 64 concurrent settlements against a real Redis, in-process, printed only.

    python -m bench.settle_batch [--redis redis://127.0.0.1:6379/14] [--rounds 50]

Counts round trips client-side (one per send on a connection: a pipeline is one) and this process's CPU
time per settlement (time.process_time, on uvloop as the router runs: the event loop, hiredis and
redis-py's work; Redis itself runs elsewhere). FLUSHDB on the given db only, before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from router.accounting import Accountant
from router.budget_store import BudgetStore, Usage
from router.journal import Journal
from router.metrics import RouterMetrics
from router.redis_pool import make_redis
from tests.test_accounting import policy

BURST = 64


def counting(client: aioredis.Redis) -> list[int]:
    """Count sends (round trips) on every connection of `client`'s pool."""
    sent = [0]
    base: Any = client.connection_pool.connection_class

    class Counting(base):  # type: ignore[misc,valid-type]
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            sent[0] += 1
            await super().send_packed_command(command, check_health)
    client.connection_pool.connection_class = Counting
    return sent


def usage(i: int) -> Usage:
    return Usage(tier="fast", instance="i0", route="chat", status=200, prompt=100, cached=0, completion=10,
                 cost=1_000 + i, base=1_000, nocache=1_000, latency_ms=5.0, ttft_ms=1.0, slo_met=None,
                 at_ms=int(time.time() * 1000))


async def run(url: str, rounds: int, batched: bool) -> tuple[float, float, int]:
    client = make_redis(url, 1.0)
    sent = counting(client)
    tag = uuid.uuid4().hex[:6]
    acct = Accountant(policy(tag), BudgetStore(client), Journal(Path(tempfile.mkdtemp()) / "j"), RouterMetrics())
    flusher = asyncio.create_task(acct.batch.run())

    def one(i: int) -> None:
        if batched:
            acct.settle(f"free-{tag}", f"w{i}", usage(i))
        else:   # before #15: a task and a round trip per settlement
            acct._spawn(acct._settle(f"free-{tag}", f"w{i}", usage(i)))

    async def request(i: int) -> None:   # requests finishing over a few loop turns
        for _ in range(i % 4):
            await asyncio.sleep(0)
        one(i)
    for i in range(BURST):              # warm: connections made, the script loaded
        one(-1 - i)
    await acct.drain()
    sent[0], flushes0 = 0, acct.batch.flushes
    cpu = time.process_time()
    for r in range(rounds):
        await asyncio.gather(*(request(r * BURST + i) for i in range(BURST)))
        await acct.drain()
    cpu = time.process_time() - cpu
    n = rounds * BURST
    flusher.cancel()
    acct.journal.close()
    await client.aclose()
    return sent[0] / n, cpu / n * 1e6, acct.batch.flushes - flushes0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--rounds", type=int, default=50)
    a = ap.parse_args()
    admin = aioredis.Redis.from_url(a.redis)
    await admin.flushdb()
    try:
        for batched in (False, True, False, True):
            trips, cpu_us, flushes = await run(a.redis, a.rounds, batched)
            print(f"{'batched  ' if batched else 'unbatched'} {a.rounds} x {BURST} concurrent settlements: "
                  f"{trips:.3f} round trips and {cpu_us:.1f} us CPU per settlement ({flushes} flushes)")
    finally:
        await admin.flushdb()
        await admin.aclose()


if __name__ == "__main__":
    import uvloop  # as the router runs
    uvloop.run(main())
