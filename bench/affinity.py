"""Prefix-cache affinity: tiergate vs round robin, least-loaded and sglang-router cache_aware.

Four simulated instances of one tier (`tiergate sim`, qwen3-4b-mixed, each publishing
vLLM KV events over ZMQ) serve the same multi-turn chat workload under each policy:

* round robin and least-loaded (by in-flight count): chosen by this client, sent
  straight to the instances;
* tiergate with 1 and with 2 replicas sharing one Redis (the client alternates
  replicas request by request), profile: bounded_load + prefix_affinity + load;
* `sglang-router --policy cache_aware` with 1 and with 2 router processes.

Workload (seeded): conversations of 6-10 turns; system prompts of 1-4K tokens shared
by groups of conversations; conversations start as a Poisson process and each next
turn follows the previous answer after an exponential think time. Requests stream,
so TTFT is the first content chunk. Between runs every instance's prefix cache is
reset and the Redis index flushed. A second workload gives every conversation the
same 4K-token system prompt (the hot-spot case).

Reported per policy: prefix-cache hit rate (the instances' own vllm:prefix_cache_hits
/ queries), TTFT p50/p99, request and output-token throughput, and load spread (most
requests on one instance / mean).

Usage: python bench/affinity.py [--conversations 200] [--rate 6] [--policies ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import free_port  # noqa: E402

KEY = "sk-tiergate-demo"
KEY_HASH = "a76e8169f2e4051531cdd24753d163ed3cc01d9208b14606f88055b404f4c13f"
MODEL = "Qwen/Qwen3-4B-Instruct-2507"
PROFILE = "qwen3-4b-mixed"
WORDS = ("data model cache token route query answer system policy tenant budget latency queue batch "
         "prefix server engine layer vector block stream metric signal review change deploy region").split()

POLICY = """
version: 1
tiers:
  b4:
    model: {model}
    max_model_len: 32768
    prices: {{input: 0.15, cached_input: 0.03, output: 0.60}}
    affinity: {{ttl_s: 600}}
    instances:
{instances}
tenants:
  bench: {{key_sha256: [{key_hash}]}}
routes:
  b4: {{tiers: [b4], profile: affinity}}
profiles:
  affinity:
    filters:
      - {{type: tier_allowed}}
      - {{type: context_fits}}
      - {{type: healthy}}
      - {{type: bounded_load, params: {{c: 3.0}}}}
    scorers:
      - {{type: prefix_affinity, weight: 10, params: {{min_match_tokens: 64, shared_weight: 0.05}}}}
      - {{type: load, weight: 1, params: {{scale: 4}}}}
    picker: {{type: max_score}}
"""


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@dataclass
class Conversation:
    system: str
    users: list[str]
    start: float


def workload(n: int, rate_conv: float, seed: int, hot: bool) -> list[Conversation]:
    rng = random.Random(seed)
    groups = [f"System prompt {g}. " + text(rng, rng.randint(900, 3600)) for g in range(8)]
    hot_prompt = "Shared system prompt. " + text(rng, 3600)
    t = 0.0
    out = []
    for c in range(n):
        t += rng.expovariate(rate_conv)
        users = [f"Conversation {c} turn {k}: " + text(rng, rng.randint(100, 400)) for k in range(rng.randint(6, 10))]
        out.append(Conversation(hot_prompt if hot else groups[c % len(groups)], users, t))
    return out


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    out_tokens: int = 0
    requests: int = 0
    errors: int = 0
    turns: int = 0
    switches: int = 0   # a turn served by another instance than the conversation's previous turn


class Picker:
    """Where the next request goes: a router URL, or an instance chosen by RR / least-loaded."""

    def __init__(self, kind: str, targets: list[str]) -> None:
        self.kind = kind
        self.targets = targets
        self.i = 0
        self.in_flight = [0] * len(targets)

    def pick(self) -> int:
        if self.kind == "least_loaded":
            low = min(self.in_flight)
            best = [i for i, x in enumerate(self.in_flight) if x == low]
            j = best[self.i % len(best)]
        else:  # round robin over instances, or over router replicas
            j = self.i % len(self.targets)
        self.i += 1
        return j


async def run_conversation(s: aiohttp.ClientSession, conv: Conversation, picker: Picker, model: str,
                           res: Result, t0: float, think: random.Random) -> None:
    await asyncio.sleep(max(0.0, t0 + conv.start - time.perf_counter()))
    msgs: list[dict[str, str]] = [{"role": "system", "content": conv.system}]
    prev: str | None = None
    for user in conv.users:
        msgs.append({"role": "user", "content": user})
        j = picker.pick()
        picker.in_flight[j] += 1
        body = {"model": model, "messages": msgs, "max_tokens": 24, "stream": True,
                "stream_options": {"include_usage": True}}
        reply: list[str] = []
        t = time.perf_counter()
        first = None
        try:
            async with s.post(picker.targets[j] + "/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    res.errors += 1
                    return
                inst = r.headers.get("x-tiergate-instance")
                if inst is not None:
                    res.turns += prev is not None
                    res.switches += prev is not None and inst != prev
                    prev = inst
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    ev = json.loads(line[6:])
                    if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
                        if first is None:
                            first = time.perf_counter() - t
                        reply.append(ev["choices"][0]["delta"]["content"])
                    if ev.get("usage"):
                        res.out_tokens += ev["usage"]["completion_tokens"]
        except aiohttp.ClientError:
            res.errors += 1
            return
        finally:
            picker.in_flight[j] -= 1
        res.requests += 1
        if first is not None:
            res.ttft.append(first)
        msgs.append({"role": "assistant", "content": "".join(reply)})
        await asyncio.sleep(think.expovariate(1.0))


def scrape(url: str) -> dict[str, float]:
    import urllib.request

    out = {"queries": 0.0, "hits": 0.0, "requests": 0.0}
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vllm:prefix_cache_queries_total"):
                out["queries"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_hits_total"):
                out["hits"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:request_success_total"):
                out["requests"] += float(line.rsplit(" ", 1)[1])
    return out


def affinity_ops(routers: list[str]) -> dict[str, float]:
    import urllib.request

    out: dict[str, float] = {}
    for u in routers:
        with urllib.request.urlopen(u + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("tiergate_affinity_ops_total{"):
                    labels, value = line[len("tiergate_affinity_ops_total{"):].rsplit("} ", 1)
                    key = labels.replace('op="', "").replace('",result="', ":").rstrip('"')
                    out[key] = out.get(key, 0.0) + float(value)
    return out


def reset(sims: list[str], r: redis.Redis) -> None:
    import urllib.request

    for u in sims:
        urllib.request.urlopen(urllib.request.Request(u + "/reset_prefix_cache", method="POST"), timeout=5).read()
    r.flushdb()


async def drive(convs: list[Conversation], picker: Picker, model: str, headers: dict[str, str]) -> tuple[Result, float]:
    res = Result()
    think = random.Random(7)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=600)) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*(run_conversation(s, c, picker, model, res, t0, think) for c in convs))
        return res, time.perf_counter() - t0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else float("nan")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        with open(log, "ab") as f:
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                               env=env or dict(os.environ)))

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(2)  # SIGINT: lets a profiled router write its stats
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name: str, convs: list[Conversation], picker: Picker, model: str, headers: dict[str, str],
            sims: list[str], pids: list[int]) -> dict[str, object]:
    before = [scrape(u) for u in sims]
    c0 = sum(cpu_seconds(p) for p in pids)
    res, wall = asyncio.run(drive(convs, picker, model, headers))
    cpu = sum(cpu_seconds(p) for p in pids) - c0
    after = [scrape(u) for u in sims]
    q = sum(a["queries"] - b["queries"] for a, b in zip(after, before, strict=True))
    h = sum(a["hits"] - b["hits"] for a, b in zip(after, before, strict=True))
    per = [a["requests"] - b["requests"] for a, b in zip(after, before, strict=True)]
    row = {"policy": name, "requests": res.requests, "errors": res.errors, "hit_rate": h / q if q else 0.0,
           "ttft_p50_ms": pct(res.ttft, 50), "ttft_p99_ms": pct(res.ttft, 99), "req_s": res.requests / wall,
           "out_tok_s": res.out_tokens / wall, "spread": max(per) / statistics.mean(per) if sum(per) else 0.0,
           "per_instance": [int(x) for x in per], "router_cpu_ms_per_req": cpu / max(res.requests, 1) * 1000,
           "router_cpu_util": cpu / wall, "switch_rate": res.switches / res.turns if res.turns else None}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--rate", type=float, default=6.0, help="new conversations per second")
    ap.add_argument("--policies", default="round_robin,least_loaded,tiergate-1,tiergate-2,sglang-1,sglang-2")
    ap.add_argument("--hot", default="tiergate-1,sglang-1,least_loaded", help="policies for the hot-prompt run")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--time-scale", type=float, default=4.0,
                    help="instances run this many times slower than an H200 (a smaller GPU), so that this 2-core "
                         "machine can drive them busy")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tg-affinity-"))
    procs = Procs()
    rds = redis.Redis.from_url(args.redis_url)
    rows: list[dict[str, object]] = []
    try:
        sims, kvs = [], []
        for i in range(4):
            port, kv = free_port(), free_port()
            cfg = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                              "endpoint": f"tcp://127.0.0.1:{kv}", "topic": "kv-events"})
            procs.start([sys.executable, "-m", "router.cli", "sim", "--profile", PROFILE, "--port", str(port),
                         "--time-scale", str(args.time_scale), "--kv-events-config", cfg], tmp / f"sim{i}.log")
            sims.append(f"http://127.0.0.1:{port}")
            kvs.append(f"tcp://127.0.0.1:{kv}")
        for u in sims:
            if not wait_http_ok(u + "/health", 60):
                raise RuntimeError(f"sim {u} did not start (see {tmp})")
        inst = "\n".join(f'      - {{id: i{i}, url: "{u}", kv_events: "{k}"}}'
                         for i, (u, k) in enumerate(zip(sims, kvs, strict=True)))
        pol = tmp / "policy.yaml"
        pol.write_text(POLICY.format(model=MODEL, instances=inst, key_hash=KEY_HASH))
        routers: list[str] = []
        for i in range(2):
            port = free_port()
            env = {**os.environ, "TIERGATE_LOG_LEVEL": "warning", "TIERGATE_DRAIN_GRACE_S": "0",
                   "TIERGATE_DATA_DIR": str(tmp / f"r{i}")}
            prof = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") and i == 0 \
                else []
            procs.start([sys.executable, *prof, "-m", "router.cli", "serve", "--policy", str(pol), "--port", str(port),
                         "--redis-url", args.redis_url], tmp / f"router{i}.log", env)
            routers.append(f"http://127.0.0.1:{port}")
        sgl: list[str] = []
        for i in range(2):
            port = free_port()
            procs.start([sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *sims,
                         "--policy", "cache_aware", "--host", "127.0.0.1", "--port", str(port),
                         "--prometheus-port", str(free_port()), "--log-level", "warn"], tmp / f"sglang{i}.log")
            sgl.append(f"http://127.0.0.1:{port}")
        for u in routers:
            if not wait_http_ok(u + "/ready", 60):
                raise RuntimeError(f"tiergate {u} did not start (see {tmp})")
        for u in sgl:
            if not wait_http_ok(u + "/health", 60):
                raise RuntimeError(f"sglang-router {u} did not start (see {tmp})")
        auth = {"authorization": f"Bearer {KEY}"}
        rp = [p.pid for p in procs.procs[4:6]]
        sp = [p.pid for p in procs.procs[6:8]]
        targets = {
            "round_robin": (Picker("round_robin", sims), MODEL, {}, []),
            "least_loaded": (Picker("least_loaded", sims), MODEL, {}, []),
            "tiergate-1": (Picker("round_robin", routers[:1]), "b4", auth, rp[:1]),
            "tiergate-2": (Picker("round_robin", routers), "b4", auth, rp),
            "sglang-1": (Picker("round_robin", sgl[:1]), MODEL, {}, sp[:1]),
            "sglang-2": (Picker("round_robin", sgl), MODEL, {}, sp),
        }
        for workload_name, hot, names in (("groups", False, args.policies), ("hot", True, args.hot)):
            convs = workload(args.conversations, args.rate, args.seed, hot)
            for name in [n for n in names.split(",") if n]:
                picker, model, headers, pids = targets[name]
                reset(sims, rds)
                picker.i, picker.in_flight = 0, [0] * len(picker.targets)
                ops0 = affinity_ops(routers)
                row = measure(name, convs, picker, model, headers, sims, pids)
                ops1 = affinity_ops(routers)
                row["affinity_ops"] = {k: v - ops0.get(k, 0.0) for k, v in ops1.items() if v - ops0.get(k, 0.0)}
                if name.startswith("tiergate"):
                    print("affinity ops", row["affinity_ops"], flush=True)
                row["workload"] = workload_name
                rows.append(row)
    finally:
        procs.stop()
    print(f"\n## Prefix affinity: {args.conversations} conversations, {args.rate}/s, 4 x {PROFILE} instances "
          f"at time scale {args.time_scale}\n")
    print("| workload | policy | requests | errors | prefix hit rate | TTFT p50 ms | TTFT p99 ms | req/s | "
          "output tok/s | load spread (max/mean) | requests per instance | router CPU ms/req | router CPU util |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['policy']} | {r['requests']} | {r['errors']} | {r['hit_rate']:.3f} | "
              f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['req_s']:.2f} | {r['out_tok_s']:.0f} | "
              f"{r['spread']:.2f} | {r['per_instance']} | {r['router_cpu_ms_per_req']:.2f} | "
              f"{r['router_cpu_util']:.2f} |")


if __name__ == "__main__":
    main()
