"""Memory the prefix-affinity index takes in Redis, per instance.

Fills one instance's index (`{tg:aff:<tier>}:<instance>`, a ZSET of 8-byte block
hashes) through the real record script up to several capacities, and prints Redis'
own `MEMORY USAGE` for the key, in total and per tracked block.

Usage: python bench/affinity_memory.py [--redis-url redis://127.0.0.1:6379/12]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from router.affinity_store import AffinityStore, index_key


async def main(url: str) -> None:
    r = aioredis.Redis.from_url(url)
    store = AffinityStore(r, timeout_s=5.0)
    print("| tracked blocks per instance | MEMORY USAGE bytes | bytes per block | tokens covered (16-token blocks) |")
    print("|---|---|---|---|")
    for cap in (1_000, 10_000, 65_536, 100_000):
        tier, inst = "memtest", f"i{cap}"
        await r.delete(index_key(tier, inst))
        for start in range(0, cap, 512):
            hashes = [os.urandom(8) for _ in range(min(512, cap - start))]
            await store.record(tier, inst, hashes, 600, cap)
        used = await r.memory_usage(index_key(tier, inst), samples=0)
        n = await store.size(tier, inst)
        print(f"| {n:,} | {used:,} | {used / n:.1f} | {n * 16:,} |")
        await r.delete(index_key(tier, inst))
    await r.aclose()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    asyncio.run(main(ap.parse_args().redis_url))
