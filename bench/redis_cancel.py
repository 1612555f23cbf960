"""Does the installed redis-py honour a task's cancel? (Why pyproject pins redis<8.)

Every Redis call on tiergate's hot path sits under `asyncio.timeout`, and every background
loop stops by being cancelled; both rely on the client letting a CancelledError through.
This starts a task that loops on PING, cancels it at varying points, and counts the cancels
that were swallowed (the task still running 0.3 s later).

Measured on this machine (Python 3.11.7, local Redis 7): redis-py 5.2.1, 6.4.0, 7.0.1,
7.2.0 and 7.4.1 lose 0 of 200; 8.0.0, 8.0.1 and 8.1.0 lose 18% to 50% of them.

Usage: python bench/redis_cancel.py [--redis-url redis://127.0.0.1:6379/0] [--n 200]
"""

from __future__ import annotations

import argparse
import asyncio
from importlib.metadata import version

import redis.asyncio as aioredis


async def ping_forever(r: aioredis.Redis) -> None:
    while True:
        try:
            await r.ping()
        except Exception:  # a Redis error; a cancel must still get out
            pass
        await asyncio.sleep(0)


async def main(url: str, n: int) -> int:
    r = aioredis.Redis.from_url(url)
    lost = 0
    for k in range(n):
        task = asyncio.create_task(ping_forever(r))
        for _ in range(k % 7):                     # cancel at varying points of the call
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=0.3)
        lost += not done
        while not done:                            # swallowed: keep asking until it stops
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=0.3)
    await r.aclose()
    print(f"redis-py {version('redis')}: {lost} of {n} cancels swallowed")
    return lost


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    raise SystemExit(1 if asyncio.run(main(a.redis_url, a.n)) else 0)
