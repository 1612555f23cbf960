"""One Redis node's capacity for the router's work: Redis operations and time per request, by feature, and
the requests per second that saturate one Redis core (docs/scaling.md).

A private `redis-server` (no persistence unless --aof) is pinned to one CPU (`taskset -c --redis-cpu`); the
load runs in this process, pinned to another (--client-cpu), and calls the router's own stores
(router/budget_store.py, router/affinity_store.py, router/admission/window_store.py,
router/decision_records.py' XADD, router/load_sync.py) with the router's own client (`make_redis`) and
arguments shaped like a chat request's:

* admission: `BudgetStore.admit`, one EVALSHA per request (the request waits for it);
* settlement: `BudgetStore.settle_many`, one EVALSHA per request, 64 per pipelined flush;
* affinity lookup: one EVALSHA per tier (--tiers, --instances each, 40 sampled hashes), one round trip;
* affinity claim (prefix coalescing): one EVALSHA; affinity record (coalescing off): batched, 64 per flush;
* windows: `WindowStore.take`, one EVALSHA;
* decision records: XADD MAXLEN ~, 64 per pipeline;
* load sync: one EVALSHA per replica per 50 ms while busy (not per request): timed per call, with
  --replicas replicas' fields in the hash (each call reads them all).

Part 1 runs each feature alone for --requests requests at --concurrency and prints, per request, the
Redis calls (INFO commandstats), the command time (commandstats usec) and Redis' own CPU time (INFO
used_cpu_user + used_cpu_sys: command time plus reading and writing sockets). Part 2 saturates the core
with the budget scripts alone (redis-benchmark, a C client, EVALSHA of the router's admission and
settlement scripts with random request ids), so the ceiling is measured, not projected. Part 3 runs the full mix
(every feature on every request) for --seconds: first as the router sends it (one round trip per
awaited step, --concurrency requests in flight), then pipelined (--depth requests' commands per round
trip, so the client can saturate Redis on this small machine); it prints requests/s, Redis operations/s
and the share of its core Redis was busy, and the requests/s one core would serve at 100%.

Usage: python bench/redis_capacity.py [--requests 4000] [--seconds 10] [--tiers 3] [--instances 4] [--replicas 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from backends.valkey import free_port  # noqa: E402
from router.admission.window_store import WindowStore  # noqa: E402
from router.affinity_store import AffinityStore  # noqa: E402
from router.budget_store import BudgetStore, Usage, q_prefix  # noqa: E402
from router.load_sync import _SYNC, KEY  # noqa: E402
from router.redis_pool import RedisClient, close_redis, make_redis, register  # noqa: E402

Step = Callable[[int], Awaitable[Any]]


def usage(i: int) -> Usage:
    return Usage(tier="fast", instance="i0", route="auto", status=200, prompt=900, cached=600, completion=120,
                 cost=31_000 + i % 7, base=90_000, nocache=45_000, latency_ms=812.4, ttft_ms=95.1, slo_met=True,
                 at_ms=int(time.time() * 1000), source="backend")


class Work:
    """The router's Redis work for request i, by feature."""

    def __init__(self, r: RedisClient, tiers: int, instances: int, replicas: int = 8) -> None:
        self.replicas = replicas
        self.r = r
        self.budget = BudgetStore(r)
        self.aff = AffinityStore(r, timeout_s=5.0)
        self.win = WindowStore(r, timeout_s=5.0)
        self.sync = register(r, _SYNC)
        self.tiers = [f"t{k}" for k in range(tiers)]
        self.instances = [f"i{k}" for k in range(instances)]
        rng = random.Random(1)
        self.prompts = [[rng.randbytes(8) for _ in range(40)] for _ in range(64)]   # 64 distinct prefixes
        self.tenants = [f"tenant{k}" for k in range(50)]
        self.record_doc = (b'{"id":"x","outcome":"ok","tier":"fast","candidates":['
                           + b'{"k":"fast/i0","s":0.5},' * 8 + b'{}]}')

    def hashes(self, i: int) -> list[bytes]:
        return self.prompts[i % 64]

    async def admit(self, i: int) -> Any:
        return await self.budget.admit(self.tenants[i % 50], f"r{i}", rpm=100_000, tpm=100_000_000, tokens=1_100,
                                       reserve=60_000, daily=10**15, monthly=10**16, ttl_s=900)

    async def settle(self, ids: list[int]) -> Any:
        return await self.budget.settle_many([(self.tenants[i % 50], f"r{i}", usage(i)) for i in ids])

    async def lookup(self, i: int) -> Any:
        return await self.aff.lookup([(t, self.instances, self.hashes(i)) for t in self.tiers], 600.0)

    async def claim(self, i: int) -> Any:
        inst = self.instances[i % len(self.instances)]
        return await self.aff.claim(self.tiers[0], inst, [(x, 0) for x in self.instances], self.hashes(i), 600.0,
                                    65_536)

    async def record(self, ids: list[int]) -> Any:
        for i in ids:
            self.aff.record_later(self.tiers[0], self.instances[i % len(self.instances)], self.hashes(i), 600.0,
                                  65_536)
        await self.aff.drain()

    async def take(self, i: int) -> Any:
        return await self.win.take(self.tiers[0], self.instances[i % len(self.instances)], 300, 20_000, 2_000)

    async def xadd(self, ids: list[int]) -> Any:
        async with self.r.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.xadd("tiergate:decisions", {"id": f"r{i}", "r": self.record_doc}, maxlen=10_000,
                          approximate=True)
            return await pipe.execute()

    async def load_sync(self, i: int) -> Any:
        counts = b'{"t0/i0":[3,1,900],"t0/i1":[2,0,0],"t1/i0":[5,2,4000]}'
        return await self.sync(keys=[KEY], args=[f"replica{i % self.replicas}", counts, 2000])


def stats(port: int) -> tuple[dict[str, tuple[int, int]], float]:
    c = redis.Redis(port=port)
    try:
        cmd: dict[str, Any] = c.info("commandstats")  # type: ignore[assignment]
        cpu: dict[str, Any] = c.info("cpu")  # type: ignore[assignment]
    finally:
        c.close()
    return ({k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in cmd.items()},
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))


def delta(port: int, before: tuple[dict[str, tuple[int, int]], float]) -> tuple[int, int, float, str]:
    """-> calls (the scripts' own calls included), command µs, Redis CPU s since `before`, the top commands."""
    after, cpu = stats(port)
    rows = []
    for k, (calls, us) in after.items():
        c0, u0 = before[0].get(k, (0, 0))
        if calls - c0 and k not in ("info",):
            rows.append((us - u0, calls - c0, k))
    rows.sort(reverse=True)
    top = ", ".join(f"{k} {c}" for _, c, k in rows[:4])
    return sum(r[1] for r in rows), sum(r[0] for r in rows), cpu - before[1], top


async def run_feature(name: str, port: int, n: int, conc: int, one: Step | None = None,
                      batch: Callable[[list[int]], Awaitable[Any]] | None = None) -> None:
    before = stats(port)
    if one is not None:
        sem = asyncio.Semaphore(conc)

        async def go(i: int) -> None:
            async with sem:
                await one(i)
        await asyncio.gather(*(go(i) for i in range(n)))
    elif batch is not None:
        for k in range(0, n, 64):
            await batch(list(range(k, min(n, k + 64))))
    calls, us, cpu, top = delta(port, before)
    sent = int(top.split("evalsha ")[1].split(",")[0]) if "evalsha " in top else calls
    print(f"  {name:<24} {sent / n:5.2f} sent ({calls / n:6.2f} with the scripts' own)  {us / n:6.1f} µs command"
          f"  {cpu * 1e6 / n:6.1f} µs Redis CPU   ({top})", flush=True)


async def mix(w: Work, port: int, seconds: float, conc: int, depth: int) -> None:
    """Every feature on every request: as the router sends it (depth 1), or `depth` requests per round trip."""
    done = 0
    stop = time.monotonic() + seconds
    before = stats(port)
    t0 = time.monotonic()

    async def flows(k: int) -> None:
        nonlocal done
        i = k * 10_000_000
        while time.monotonic() < stop:
            ids = list(range(i, i + depth))
            i += depth
            await asyncio.gather(*(w.admit(j) for j in ids))            # depth 1: one round trip each
            await asyncio.gather(*(w.lookup(j) for j in ids))
            await asyncio.gather(*(w.claim(j) for j in ids))
            await asyncio.gather(*(w.take(j) for j in ids))
            await w.settle(ids)
            await w.xadd(ids)
            done += depth
    tasks = [asyncio.create_task(flows(k)) for k in range(conc)]
    sync_calls = 0
    while time.monotonic() < stop:                                 # the replicas' load sync, every 50 ms
        await asyncio.gather(*(w.load_sync(k) for k in range(w.replicas)))
        sync_calls += w.replicas
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)
    wall = time.monotonic() - t0
    calls, us, cpu, top = delta(port, before)
    busy = cpu / wall
    print(f"  depth {depth:>3}, {conc} flows: {done / wall:8,.0f} req/s  {calls / wall:9,.0f} Redis ops/s "
          f"({calls / done:.2f} per request)  Redis busy {busy:4.0%}  command {us / done:5.1f} µs  "
          f"CPU {cpu * 1e6 / done:5.1f} µs per request -> at 100% of one core: {done / wall / max(busy, 1e-9):8,.0f} "
          f"req/s  [{top}; load sync {sync_calls / wall:.0f}/s]", flush=True)


def saturate(port: int, cpu: int, name: str, script: Any, keys: list[str], argv: list[Any], n: int) -> float:
    """EVALSHA of one router script at saturation: redis-benchmark (C, pipelined 16, 32 connections) on the
    client CPU, `__rand_int__` in the request id; -> calls/s."""
    cmd = ["taskset", "-c", str(cpu), shutil.which("redis-benchmark") or "redis-benchmark", "-p", str(port),
           "-n", str(n), "-c", "32", "-P", "16", "-r", "100000000", "--csv", "EVALSHA", script.sha, str(len(keys)),
           *keys, *(str(a) for a in argv)]
    before = stats(port)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    calls, us, cpu_s, _ = delta(port, before)
    rps = float(out.strip().splitlines()[-1].split(",")[1].strip('"'))
    print(f"  {name:<24} {rps:9,.0f} calls/s at saturation ({us / max(calls, 1) * calls / n:5.1f} µs command, "
          f"{cpu_s * 1e6 / n:5.1f} µs Redis CPU per call)", flush=True)
    return rps


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    d = Path(tempfile.mkdtemp(prefix="tg-capacity-"))
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    persist = ["--appendonly", "yes", "--appendfsync", "everysec"] if args.aof else ["--appendonly", "no"]
    proc = subprocess.Popen(["taskset", "-c", str(args.redis_cpu), server, "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--dir", str(d), *persist], stdout=subprocess.DEVNULL,
                            start_new_session=True)
    os.sched_setaffinity(0, {args.client_cpu})
    return proc, port, d


async def main(args: argparse.Namespace, port: int) -> None:
    r = make_redis(f"redis://127.0.0.1:{port}/0", 5.0)
    try:
        for _ in range(100):
            try:
                await r.ping()  # type: ignore[misc]
                break
            except Exception:
                await asyncio.sleep(0.05)
        w = Work(r, args.tiers, args.instances, args.replicas)
        ver = (await r.info("server"))["redis_version"]
        print(f"redis-server {ver} on CPU {args.redis_cpu} (persistence: {'AOF everysec' if args.aof else 'none'}), "
              f"client on CPU {args.client_cpu}; {args.tiers} tiers x {args.instances} instances, 40 hashes; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        n, c = args.requests, args.concurrency
        for i in range(w.replicas):
            await w.load_sync(i)
        for i in range(64):                                       # warm: scripts loaded, prefixes recorded
            await w.admit(-1 - i)
            await w.lookup(i)
            await w.claim(i)
            await w.take(i)
            await w.load_sync(i)
        await w.settle([-1 - i for i in range(64)])
        await w.record(list(range(64)))
        await w.xadd([0])
        print("Part 1: per request, each feature alone", flush=True)
        await run_feature("admission", port, n, c, one=w.admit)
        await run_feature("settlement (batched)", port, n, c, batch=w.settle)
        await run_feature(f"affinity lookup x{args.tiers}", port, n, c, one=w.lookup)
        await run_feature("affinity claim", port, n, c, one=w.claim)
        await run_feature("affinity record (batch)", port, n, c, batch=w.record)
        await run_feature("window take", port, n, c, one=w.take)
        await run_feature("decision record", port, n, c, batch=w.xadd)
        await run_feature("load sync (per call)", port, n // 4, c, one=w.load_sync)
        print("Part 2: one core's ceiling per script (redis-benchmark, pipelined)", flush=True)
        b = w.budget
        now_ms = int(time.time() * 1000)
        adm_keys = b._keys("bench{x}", "__rand_int__", "q", "w", "b", "open")
        adm = saturate(port, args.client_cpu, "admission", b._admit, adm_keys, [
            "", "__rand_int__", 0, 0, 1_100, 60_000, 10**15, 10**16, 900_000, b.keep_ms, q_prefix("bench{x}"),
            0, 0, 0, 0], args.bench_calls)
        _, st_keys, st_args = b._settle_call("bench{x}", "__rand_int__", usage(now_ms))
        stl = saturate(port, args.client_cpu, "settlement", b._settle, list(st_keys), list(st_args), args.bench_calls)
        print(f"  admission + settlement: {1 / (1 / adm + 1 / stl):,.0f} requests/s per Redis core", flush=True)
        print(f"Part 3: the full mix for {args.seconds:.0f} s", flush=True)
        await mix(w, port, args.seconds, args.concurrency, 1)
        await mix(w, port, args.seconds, max(1, args.concurrency // 8), args.depth)
    finally:
        await close_redis(r)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--tiers", type=int, default=3)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=8, help="router replicas in the load-sync hash")
    ap.add_argument("--redis-cpu", type=int, default=1)
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--bench-calls", type=int, default=200_000)
    ap.add_argument("--aof", action="store_true", help="AOF with fsync every second, as the embedded store")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    a = ap.parse_args()
    proc, port, d = start_server(a)
    try:
        asyncio.run(main(a, port))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)
