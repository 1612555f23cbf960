"""Routing quality: cost per 1M tokens and SLO attainment, tiergate vs simpler policies.

Six simulated instances, two per demo tier (fast = qwen3-1.7b-fp8, balanced =
qwen3-4b-mixed, long = qwen3-4b-256k), all at `--time-scale` (default 2: GPUs 2x
slower than the H200 calibration, so this 2-core machine can load them). One seeded
trace, replayed against each policy:

* short chats (200-2,000 tokens) in the `interactive` class (TTFT 1 s), 4/s, and
  every 20 s a burst of 120 interactive chats of 1-4K tokens at once;
* documents of 5-30K tokens (`relaxed`, TTFT 10 s) and of 20-200K tokens (`relaxed`).

Policies:
* tiergate: the `auto` route through the router (context_fits, healthy, bounded_load,
  slo_feasible; expected_cost, prefix_affinity, load), SLO class in a header;
* always-balanced: the balanced tier (long when the prompt does not fit), round robin;
* cheapest-fits: the cheapest tier whose context fits, round robin within it;
* round-robin over the tiers that fit;
* litellm-lowest-cost: the cheapest tier that fits by static price, its first
  instance (no load, no SLO).

Cost is each response's usage x the serving tier's prices (uncached, cached, output).
SLO attainment: share of requests whose streamed TTFT met their class's target.

Usage: python bench/routing_quality.py [--seconds 60] [--time-scale 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from affinity import Procs, pct  # noqa: E402

from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import free_port  # noqa: E402

KEY = "sk-tiergate-demo"
KEY_HASH = "a76e8169f2e4051531cdd24753d163ed3cc01d9208b14606f88055b404f4c13f"
TIERS = {  # name: (sim profile, model, max_model_len, prices in/cached/out, H200 prefill tok/s)
    "fast": ("qwen3-1.7b-fp8", "Qwen/Qwen3-1.7B-FP8", 40960, (0.05, 0.01, 0.20), 190200),
    "balanced": ("qwen3-4b-mixed", "Qwen/Qwen3-4B-Instruct-2507", 32768, (0.15, 0.03, 0.60), 72600),
    "long": ("qwen3-4b-256k", "Qwen/Qwen3-4B-Instruct-2507", 262144, (0.30, 0.06, 1.20), 52600),
}
ORDER = ["fast", "balanced", "long"]  # cheapest first
TARGET = {"interactive": 1.0, "relaxed": 10.0}
WORDS = "alpha beta gamma delta model cache route token answer policy tenant budget queue".split()


@dataclass
class Req:
    at: float
    words: int
    slo: str
    max_tokens: int
    est_tokens: int = 0


def trace(seconds: float, seed: int, burst: int = 120) -> list[Req]:
    rng = random.Random(seed)
    out: list[Req] = []
    t = 0.0
    while t < seconds:
        t += rng.expovariate(4.0)
        r = rng.random()
        if r < 0.88:
            out.append(Req(t, rng.randint(200, 2000), "interactive", 64))
        elif r < 0.97:
            out.append(Req(t, rng.randint(5_000, 30_000), "relaxed", 64))
        else:
            out.append(Req(t, rng.randint(20_000, 200_000), "relaxed", 32))
    for b in range(1, int(seconds // 20) + 1):  # bursts of interactive chats, 120 at once
        out.extend(Req(b * 20.0 - 10.0 + i * 0.002, rng.randint(1000, 4000), "interactive", 64) for i in range(burst))
    out.sort(key=lambda q: q.at)
    from backends.tokenization import TierTokenizer

    tok = TierTokenizer(None)  # exact prompt tokens, so the baselines' "fits" is right
    for i, q in enumerate(out):
        msgs = [{"role": "user", "content": body_text(q, i)}]
        q.est_tokens = len(tok.encode_blocking_free(tok.render_chat(msgs)))
    return out


def body_text(q: Req, i: int) -> str:
    rng = random.Random(i)
    return f"Request {i}. " + " ".join(rng.choice(WORDS) for _ in range(q.words))


def fits(tier: str, q: Req) -> bool:
    return q.est_tokens + q.max_tokens <= TIERS[tier][2]


@dataclass
class Stats:
    cost: float = 0.0
    tokens: int = 0
    ttft: dict[str, list[float]] = field(default_factory=lambda: {"interactive": [], "relaxed": []})
    met: dict[str, int] = field(default_factory=lambda: {"interactive": 0, "relaxed": 0})
    n: dict[str, int] = field(default_factory=lambda: {"interactive": 0, "relaxed": 0})
    errors: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)


async def one(s: aiohttp.ClientSession, url: str, model: str, q: Req, i: int, tier_hint: str | None,
              headers: dict[str, str], st: Stats) -> None:
    body = {"model": model, "max_tokens": q.max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": body_text(q, i)}]}
    t = time.perf_counter()
    first = None
    usage = None
    st.n[q.slo] += 1
    try:
        async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            tier = r.headers.get("x-tiergate-tier") or tier_hint
            if r.status != 200:
                st.errors += 1
                return
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                ev = json.loads(line[6:])
                if first is None and ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
                    first = time.perf_counter() - t
                if ev.get("usage"):
                    usage = ev["usage"]
    except aiohttp.ClientError:
        st.errors += 1
        return
    if first is None or usage is None or tier is None:
        st.errors += 1
        return
    st.ttft[q.slo].append(first)
    st.met[q.slo] += first <= TARGET[q.slo]
    pin, pcached, pout = TIERS[tier][3]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    st.cost += ((usage["prompt_tokens"] - cached) * pin + cached * pcached + usage["completion_tokens"] * pout) / 1e6
    st.tokens += usage["prompt_tokens"] + usage["completion_tokens"]
    st.by_tier[tier] = st.by_tier.get(tier, 0) + 1


def choose(policy: str, q: Req, rr: dict[str, int]) -> str:
    fitting = [t for t in ORDER if fits(t, q)]
    if policy == "always-balanced":
        return "balanced" if "balanced" in fitting else "long"
    if policy in ("cheapest-fits", "litellm-lowest-cost"):
        return fitting[0]
    k = rr.setdefault("tiers", 0)
    rr["tiers"] += 1
    return fitting[k % len(fitting)]


async def run_policy(policy: str, reqs: list[Req], sims: dict[str, list[str]], router: str) -> Stats:
    st = Stats()
    rr: dict[str, int] = {}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=900)) as s:
        t0 = time.perf_counter()
        tasks = []
        for i, q in enumerate(reqs):
            await asyncio.sleep(max(0.0, t0 + q.at - time.perf_counter()))
            if policy == "tiergate":
                tasks.append(asyncio.create_task(one(s, router, "auto", q, i, None, {
                    "authorization": f"Bearer {KEY}", "x-tiergate-slo-class": q.slo}, st)))
                continue
            tier = choose(policy, q, rr)
            k = rr.setdefault(tier, 0)
            rr[tier] += 1
            url = sims[tier][0] if policy == "litellm-lowest-cost" else sims[tier][k % len(sims[tier])]
            tasks.append(asyncio.create_task(one(s, url, TIERS[tier][1], q, i, tier, {}, st)))
        await asyncio.gather(*tasks)
    return st


def policy_yaml(sims: dict[str, list[str]], scale: float) -> str:
    tiers = []
    for name, (_p, model, mml, (pi, pc, po), tps) in TIERS.items():
        inst = ", ".join(f'{{id: {name}-{i}, url: "{u}"}}' for i, u in enumerate(sims[name]))
        tiers.append(f"  {name}:\n    model: {model}\n    max_model_len: {mml}\n"
                     f"    prices: {{input: {pi}, cached_input: {pc}, output: {po}}}\n"
                     f"    prefill_tokens_per_s: {tps / scale:.0f}\n    instances: [{inst}]")
    return ("version: 1\ntiers:\n" + "\n".join(tiers) + f"""
slo_classes:
  interactive: {{ttft_ms: 1000, tpot_ms: 100}}
  relaxed: {{ttft_ms: 10000, tpot_ms: 500}}
tenants:
  bench: {{key_sha256: [{KEY_HASH}], default_slo: interactive}}
routes:
  auto: {{tiers: [fast, balanced, long], profile: p}}
profiles:
  p:
    filters:
      - {{type: tier_allowed}}
      - {{type: context_fits}}
      - {{type: healthy}}
      - {{type: bounded_load, params: {{c: 3.0}}}}
      - {{type: slo_feasible, params: {{margin: 0.8, fallback: least_late}}}}
    scorers:
      - {{type: expected_cost, weight: 10}}
      - {{type: prefix_affinity, weight: 5, params: {{min_match_tokens: 64}}}}
      - {{type: load, weight: 1, params: {{scale: 8}}}}
    picker: {{type: max_score}}
""")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--time-scale", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--burst", type=int, default=120, help="interactive chats per burst (every 20 s)")
    ap.add_argument("--policies", default="tiergate,always-balanced,cheapest-fits,round-robin,litellm-lowest-cost")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tg-quality-"))
    procs = Procs()
    rows = []
    try:
        sims: dict[str, list[str]] = {}
        for name, (prof, model, *_rest) in TIERS.items():
            for i in range(2):
                port = free_port()
                procs.start([sys.executable, "-m", "router.cli", "sim", "--profile", prof, "--port", str(port),
                             "--served-model-name", model, "--time-scale", str(args.time_scale)],
                            tmp / f"sim-{name}{i}.log")
                sims.setdefault(name, []).append(f"http://127.0.0.1:{port}")
        for urls in sims.values():
            for u in urls:
                if not wait_http_ok(u + "/health", 90):
                    raise RuntimeError(f"sim {u} did not start (see {tmp})")
        pol = tmp / "policy.yaml"
        pol.write_text(policy_yaml(sims, args.time_scale))
        port = free_port()
        procs.start([sys.executable, "-m", "router.cli", "serve", "--policy", str(pol), "--port", str(port),
                     "--redis-url", args.redis_url], tmp / "router.log",
                    {**os.environ, "TIERGATE_LOG_LEVEL": "warning", "TIERGATE_DRAIN_GRACE_S": "0",
                     "TIERGATE_DATA_DIR": str(tmp / "r")})
        router = f"http://127.0.0.1:{port}"
        if not wait_http_ok(router + "/ready", 90):
            raise RuntimeError(f"router did not start (see {tmp})")
        reqs = trace(args.seconds, args.seed, args.burst)
        for policy in args.policies.split(","):
            import urllib.request

            for urls in sims.values():
                for u in urls:
                    urllib.request.urlopen(urllib.request.Request(u + "/reset_prefix_cache", method="POST"),
                                           timeout=5).read()
            st = asyncio.run(run_policy(policy, reqs, sims, router))
            row = {"policy": policy, "requests": sum(st.n.values()), "errors": st.errors,
                   "cost_per_1m": st.cost / st.tokens * 1e6 if st.tokens else float("nan"),
                   "slo_interactive": st.met["interactive"] / max(st.n["interactive"], 1),
                   "slo_relaxed": st.met["relaxed"] / max(st.n["relaxed"], 1),
                   "ttft_p50_ms": pct(st.ttft["interactive"] + st.ttft["relaxed"], 50),
                   "ttft_p99_ms": pct(st.ttft["interactive"] + st.ttft["relaxed"], 99),
                   "interactive_p99_ms": pct(st.ttft["interactive"], 99), "by_tier": st.by_tier}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        procs.stop()
    base = next((r["cost_per_1m"] for r in rows if r["policy"] == "always-balanced"), None)
    print(f"\n## Routing quality: {len(reqs)} requests over {args.seconds:.0f} s, 2 instances per tier, "
          f"time scale {args.time_scale}\n")
    print("| policy | requests | errors | USD per 1M tokens | vs always-balanced | SLO met interactive | "
          "SLO met relaxed | TTFT p50 ms | TTFT p99 ms | interactive TTFT p99 ms | requests by tier |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{(1 - r['cost_per_1m'] / base) * 100:+.0f}% cheaper" if base else "n/a"
        print(f"| {r['policy']} | {r['requests']} | {r['errors']} | {r['cost_per_1m']:.4f} | {rel} | "
              f"{r['slo_interactive'] * 100:.1f}% | {r['slo_relaxed'] * 100:.1f}% | {r['ttft_p50_ms']:.0f} | "
              f"{r['ttft_p99_ms']:.0f} | {r['interactive_p99_ms']:.0f} | {r['by_tier']} |")


if __name__ == "__main__":
    main()
