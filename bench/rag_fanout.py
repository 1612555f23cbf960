"""RAG fan-out (issue #14): 32 concurrent questions about one new 8K-token document, over 4 instances,
through 2 router replicas (separate `tiergate serve` processes) sharing one Redis.

For each burst a fresh document (no instance has it) and 32 questions of ~200 tokens, sent at once, half to
each replica. Measured from the simulators' own /metrics (vLLM's names): prompt tokens computed
(`vllm:prompt_tokens_total - vllm:prefix_cache_hits_total`, what the GPUs prefilled), and from the
client: TTFT p50/p99 (streamed) and the instances each burst landed on. Run with prefix coalescing off
(`admission.coalesce: false`: the affinity index is written as each request is sent) and on (the claim at
decision time), in one run, each on fresh simulators. The Done-when of #14: the document prefilled on one
instance per burst, prefill tokens >= 3x fewer than without, TTFT p99 no worse.

Usage: python bench/rag_fanout.py [--bursts 5] [--time-scale 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from affinity import Procs, pct  # noqa: E402

from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import EmbeddedValkey, free_port  # noqa: E402

KEY = "sk-tiergate-demo"
KEY_HASH = "a76e8169f2e4051531cdd24753d163ed3cc01d9208b14606f88055b404f4c13f"
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()


def policy(urls: list[str], coalesce: bool) -> str:
    inst = ", ".join(f'{{id: i{k}, url: "{u}"}}' for k, u in enumerate(urls))
    return f"""version: 1
tiers:
  fast:
    model: Qwen/Qwen3-1.7B-FP8
    max_model_len: 40960
    prices: {{input: 0.05, cached_input: 0.01, output: 0.20}}
    prefill_tokens_per_s: 190200
    instances: [{inst}]
slo_classes:
  interactive: {{ttft_ms: 2000, tpot_ms: 200, miss_cost_usd: 0.002}}
tenants:
  demo: {{key_sha256: [{KEY_HASH}], default_slo: interactive}}
admission: {{coalesce: {str(coalesce).lower()}}}
routes:
  auto: {{tiers: [fast], profile: money}}
profiles:
  money:
    filters: [{{type: tier_allowed}}, {{type: context_fits}}, {{type: healthy}}]
    scorers: [{{type: expected_money}}]
    picker: {{type: max_score}}
"""


def document(seed: str) -> str:
    import random
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(2700))   # ~8K tokens


async def computed(s: aiohttp.ClientSession, sims: list[str]) -> int:
    total = 0
    for u in sims:
        text = await (await s.get(u + "/metrics")).text()
        vals = {}
        for line in text.splitlines():
            for name in ("vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total"):
                if line.startswith(name + "{") or line.startswith(name + " "):
                    vals[name] = vals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        total += int(vals.get("vllm:prompt_tokens_total", 0) - vals.get("vllm:prefix_cache_hits_total", 0))
    return total


async def burst(s: aiohttp.ClientSession, routers: list[str], doc: str, n: int) -> tuple[list[float], set[str]]:
    async def ask(k: int) -> tuple[float, str]:
        body = {"model": "auto", "max_tokens": 8, "stream": True,
                "messages": [{"role": "system", "content": doc},
                             {"role": "user", "content": f"Question {k}: " + " ".join(WORDS[(k + j) % len(WORDS)]
                                                                                 for j in range(150))}]}
        t0 = time.perf_counter()
        async with s.post(routers[k % 2] + "/v1/chat/completions", json=body,
                          headers={"authorization": f"Bearer {KEY}"}) as r:
            inst = r.headers.get("x-tiergate-instance", "?")
            first = None
            async for line in r.content:
                if first is None and line.startswith(b"data: {") and b'"content":"' in line:
                    first = time.perf_counter() - t0
            return first if first is not None else float("nan"), inst
    got = await asyncio.gather(*(ask(k) for k in range(n)))
    return [g[0] for g in got], {g[1] for g in got}


async def measure(routers: list[str], sims: list[str], bursts: int, n: int) -> dict[str, object]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        before = await computed(s, sims)
        ttfts: list[float] = []
        spread = []
        for b in range(bursts):
            t, insts = await burst(s, routers, document(f"{uuid.uuid4()}-{b}"), n)
            ttfts += t
            spread.append(len(insts))
        after = await computed(s, sims)
    return {"prefill_tokens": after - before, "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99),
            "instances_per_burst": spread}


def run(coalesce: bool, args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    procs = Procs()
    valkey = EmbeddedValkey(tmp / f"valkey-{coalesce}")
    valkey.start()
    try:
        sims = []
        for k in range(4):
            port = free_port()
            procs.start([sys.executable, "-m", "router.cli", "sim", "--profile", "qwen3-1.7b-fp8", "--port",
                         str(port), "--served-model-name", "Qwen/Qwen3-1.7B-FP8", "--time-scale",
                         str(args.time_scale)], tmp / f"sim{k}-{coalesce}.log")
            sims.append(f"http://127.0.0.1:{port}")
        for u in sims:
            if not wait_http_ok(u + "/health", 120):
                raise RuntimeError(f"simulator {u} did not start (see {tmp})")
        pol = tmp / f"policy-{coalesce}.yaml"
        pol.write_text(policy(sims, coalesce))
        routers = []
        for k in range(2):
            port = free_port()
            procs.start([sys.executable, "-m", "router.cli", "serve", "--policy", str(pol), "--port", str(port),
                         "--redis-url", valkey.url], tmp / f"router{k}-{coalesce}.log",
                        {**os.environ, "TIERGATE_LOG_LEVEL": "warning", "TIERGATE_DRAIN_GRACE_S": "0",
                         "TIERGATE_DATA_DIR": str(tmp / f"r{k}-{coalesce}"), "TIERGATE_POLICY_RELOAD_INTERVAL_S": "0"})
            routers.append(f"http://127.0.0.1:{port}")
        for u in routers:
            if not wait_http_ok(u + "/ready", 120):
                raise RuntimeError(f"router {u} did not start (see {tmp})")
        return asyncio.run(measure(routers, sims, args.bursts, 32))
    finally:
        procs.stop()
        valkey.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--time-scale", type=float, default=1.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tg-rag-fanout-"))
    load0 = os.getloadavg()[0]
    off = run(False, args, tmp)
    on = run(True, args, tmp)
    print(f"# RAG fan-out: {args.bursts} bursts of 32 questions on a new ~8K-token document, 4 instances, "
          f"2 router replicas, time scale {args.time_scale}; load average {load0:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end")
    print(json.dumps({"coalesce_off": off, "coalesce_on": on}))
    ratio = off["prefill_tokens"] / max(1, on["prefill_tokens"])   # type: ignore[operator]
    print("| | prefill tokens computed | instances per burst | TTFT p50 / p99 ms |")
    print("|---|---|---|---|")
    for name, r in (("coalesce off", off), ("coalesce on", on)):
        print(f"| {name} | {r['prefill_tokens']:,} | {r['instances_per_burst']} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} |")
    print(f"prefill tokens off / on: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
