"""Policy hot reload under load: nothing fails while the policy changes under running requests.

Two `tiergate sim --profile qwen3-1.7b-fp8` processes behind one `tiergate serve`. 32 clients
loop for `--seconds` (half streaming). Every `--every` seconds the policy file is rewritten and
`POST /admin/policy/reload` applied at once, cycling through: both instances at one price; only
instance a at a doubled output price; an invalid edit (an unknown scorer), which must be refused
and change nothing. Reported:

* requests that did not answer 200, and streams that did not end with `[DONE]` (target 0 each);
* reloads applied and refused, and the reload endpoint's latency (read, validate, build the
  view off the event loop, swap) p50/p99;
* requests per second during the run.

Usage: python bench/policy_reload.py [--seconds 20] [--every 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import free_port  # noqa: E402
from bench.failover import KEY, KEY_HASH, MODEL, start_router, start_sim  # noqa: E402

ADMIN = "sk-bench-admin-0123456789"


def policy(pa: int, pb: int | None, output_price: float, scorer: str = "load") -> str:
    from router.auth import hash_key
    insts = [f'{{id: a, url: "http://127.0.0.1:{pa}"}}'] + ([f'{{id: b, url: "http://127.0.0.1:{pb}"}}'] if pb else [])
    return f"""
version: 1
tiers:
  fast:
    model: {MODEL}
    max_model_len: 40960
    prices: {{input: 0.05, cached_input: 0.01, output: {output_price}}}
    instances: [{", ".join(insts)}]
tenants:
  bench: {{key_sha256: [{KEY_HASH}]}}
admin: {{key_sha256: [{hash_key(ADMIN)}]}}
routes:
  m: {{tiers: [fast], profile: p}}
profiles:
  p:
    filters: [{{type: healthy}}]
    scorers: [{{type: {scorer}, weight: 1}}]
    picker: {{type: max_score}}
"""


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * p / 100))] if xs else float("nan")


async def main(seconds: float, every: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tg-reload-"))
    pa, pb, pr = free_port(), free_port(), free_port()
    sims = [start_sim(pa, tmp / "a.log"), start_sim(pb, tmp / "b.log")]
    pol = tmp / "policy.yaml"
    edits = [policy(pa, pb, 0.2), policy(pa, None, 0.4), policy(pa, pb, 0.2, scorer="no_such_scorer")]
    pol.write_text(edits[0])
    env = {**os.environ, "TIERGATE_LOG_LEVEL": "warning", "TIERGATE_DRAIN_GRACE_S": "0",
           "TIERGATE_DATA_DIR": str(tmp / "r"),
           "TIERGATE_POLICY_RELOAD_INTERVAL_S": "0"}
    router_proc = start_router(pol, pr, env, tmp / "router.log")
    router = f"http://127.0.0.1:{pr}"
    try:
        for u in (f"http://127.0.0.1:{pa}/health", f"http://127.0.0.1:{pb}/health", router + "/ready"):
            if not wait_http_ok(u, 90):
                raise RuntimeError(f"{u} did not come up (see {tmp})")
        res = {"ok": 0, "failed": 0, "streams_done": 0, "streams_not_done": 0}
        reloads: dict[str, int] = {}
        latency: list[float] = []
        stop = time.perf_counter() + seconds
        headers = {"authorization": f"Bearer {KEY}"}

        async def client(s: aiohttp.ClientSession, k: int) -> None:
            stream = k % 2 == 1
            while time.perf_counter() < stop:
                body = {"model": "m", "max_tokens": 24, "stream": stream, "ignore_eos": True,
                        "messages": [{"role": "user", "content": f"client {k}: summarise hot reload"}]}
                try:
                    async with s.post(router + "/v1/chat/completions", json=body, headers=headers) as r:
                        text = await r.text()
                        if r.status != 200:
                            res["failed"] += 1
                        else:
                            res["ok"] += 1
                            if stream:
                                res["streams_done" if text.rstrip().endswith("data: [DONE]")
                                    else "streams_not_done"] += 1
                except aiohttp.ClientError:
                    res["failed"] += 1

        async def operator(s: aiohttp.ClientSession) -> None:
            i = 0
            while time.perf_counter() < stop - every:
                await asyncio.sleep(every)
                i += 1
                await asyncio.to_thread(pol.write_text, edits[i % len(edits)])
                t0 = time.perf_counter()
                async with s.post(router + "/admin/policy/reload",
                                  headers={"authorization": f"Bearer {ADMIN}"}) as r:
                    answer = await r.json()
                latency.append((time.perf_counter() - t0) * 1000)
                key = answer.get("result") if r.status == 200 else f"refused ({r.status})"
                reloads[key] = reloads.get(key, 0) + 1

        t_start = time.perf_counter()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            await asyncio.gather(operator(s), *(client(s, k) for k in range(32)))
        wall = time.perf_counter() - t_start
        total = res["ok"] + res["failed"]
        print(f"## Policy reload under load ({seconds:.0f} s, 32 clients, a reload every {every} s)\n")
        print("| measure | value |\n|---|---|")
        print(f"| requests | {total:,} ({total / wall:.0f}/s) |")
        print(f"| requests not answered 200 | {res['failed']} |")
        print(f"| streams ended with [DONE] / not | {res['streams_done']} / {res['streams_not_done']} |")
        print(f"| reloads | {', '.join(f'{k}: {v}' for k, v in sorted(reloads.items()))} |")
        print(f"| reload endpoint latency p50 / p99 / max (ms) | {statistics.median(latency):.1f} / "
              f"{pct(latency, 99):.1f} / {max(latency):.1f} |")
    finally:
        router_proc.terminate()
        for p in sims:
            p.terminate()
        for p in (router_proc, *sims):
            p.wait(10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--every", type=float, default=0.5)
    a = ap.parse_args()
    asyncio.run(main(a.seconds, a.every))
