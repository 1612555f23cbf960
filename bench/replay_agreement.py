"""Does replay agree with live? (issue #13) One small trace, two ways, the same policy and cluster shape:

* live: the bench/routing_quality.py harness: 2 simulators per demo tier (`tiergate sim`, real sockets,
  real asyncio sleeping at `--time-scale`), one `tiergate serve` on its embedded valkey, and a client that
  sends each trace request at its arrival time as `/v1/completions` with the prompt as token ids
  (so prompt lengths and shared prefixes are exact, with no tokenizer CPU on the machine), `max_tokens`
  = the trace's output and `ignore_eos` (so every answer has the trace's length), streamed with usage;
* replay: `tiergate replay run` on the same trace file, policy file, 2 instances per tier, the same
  simulator profiles and time scale.

The trace is `tiergate replay synth --kind mixed` with two changes both sides see alike: max_tokens =
output, and no `continues` (a multi-turn conversation's next prompt holds the earlier answers as the
conversation's own tokens: the live client can't know the token ids a simulator generated).
Token ids: a prefix group's tokens are a seeded stream per group id (prefix-stable as the group grows);
a request's own tokens are seeded by its position in the trace.

Compares USD per 1M tokens (usage x the serving tier's prices), TTFT and TPOT attainment per SLO class,
requests per tier and the prefix-cache hit rate, against the Done-when bounds (USD within +-10%,
attainment within +-5 points per class). Prints the load average at start and end: the live side is only
meaningful where the machine is not CPU-bound.

Usage: python bench/replay_agreement.py [--requests 600] [--rate 4] [--time-scale 2] [--seed 1]
         [--policy money] [--keep DIR] [--kind mixed|windows|...] [--windows] [--routers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from affinity import Procs  # noqa: E402
from routing_replay import PREFILL, variant  # noqa: E402

from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import free_port, server_binary  # noqa: E402
from policies.schema import Policy, load_policy  # noqa: E402
from router.replay.synth import synth  # noqa: E402
from router.replay.trace import TraceRequest, read_trace, write_trace  # noqa: E402

KEY = "sk-tiergate-demo"
SIMS = {"fast": "qwen3-1.7b-fp8", "balanced": "qwen3-4b-mixed", "long": "qwen3-4b-256k"}
MODELS = {"fast": "Qwen/Qwen3-1.7B-FP8", "balanced": "Qwen/Qwen3-4B-Instruct-2507",
          "long": "Qwen/Qwen3-4B-Instruct-2507"}
# Replay has no deadlines (its engines never fail), so the live side must not cut a request that is only
# queued: with derived deadlines (router/deadlines.py, 3 x the predicted TTFT, at least 5 s) the live
# router cut 9 of 31 queued documents at 30-62 s on the first run (2026-12-03), because the TTFT predictor
# is linear in prompt tokens while a 200K-token prefill also pays attention over its context (the
# simulator's prefill_attn_s_per_token_ctx, measured on the H200): 19 s of the 23 s a 200K document takes.
FIRST_BYTE_S = 900
VOCAB = (1000, 150_000)   # ordinary Qwen3 token ids (the special tokens start at 151,643)


class TokenStreams:
    """Prompt token ids for trace requests: each prefix group a seeded stream, the rest per request."""

    def __init__(self) -> None:
        self.groups: dict[str, list[int]] = {}

    def group(self, gid: str, n: int) -> list[int]:
        ids = self.groups.get(gid, [])
        if len(ids) < n:   # choices() draws one random() per token: a longer draw extends a shorter one
            ids = random.Random(f"group/{gid}").choices(range(*VOCAB), k=max(n, 2 * len(ids)))
            self.groups[gid] = ids
        return ids[:n]

    def prompt(self, r: TraceRequest, serial: int) -> list[int]:
        out: list[int] = []
        for p in r.prefix:
            out += self.group(p.id, p.tokens)
        own = r.prompt - len(out)
        return out + random.Random(f"own/{serial}").choices(range(*VOCAB), k=max(own, 0))


def agreement_trace(n: int, seed: int, rate: float, kind: str = "mixed") -> list[TraceRequest]:
    return [msgspec.structs.replace(r, continues=False, max_tokens=r.output)
            for r in synth(kind, n, seed, rate)]


def live_policy(name: str, sims: dict[str, list[str]], scale: float, windows: bool = False) -> str:
    """The replay bench's policy variant, each tier on its 2 simulators, prefill rates at the time scale
    (`windows`: with the admission windows on)."""
    text = variant(name)
    if windows:
        text = text.replace("\naccounting:\n", "\nadmission: {windows: true}\naccounting:\n", 1)
    for tier, urls in sims.items():
        inst = ", ".join(f'{{id: {tier}-{i}, url: "{u}"}}' for i, u in enumerate(urls))
        text, n = re.subn(rf"(\n  {tier}:\n(?:    .*\n)*?)    simulate: .*\n", rf"\g<1>    instances: [{inst}]\n",
                          text, count=1)
        assert n == 1, tier
        text = text.replace(f"prefill_tokens_per_s: {PREFILL[tier]}\n",
                            f"prefill_tokens_per_s: {PREFILL[tier] / scale:.0f}\n"
                            f"    first_byte_timeout_s: {FIRST_BYTE_S}\n", 1)
    return text


@dataclass
class Live:
    cost: float = 0.0
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    errors: list[str] = field(default_factory=list)
    tiers: dict[str, int] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    ttft_met: dict[str, int] = field(default_factory=dict)
    tpot_n: dict[str, int] = field(default_factory=dict)
    tpot_met: dict[str, int] = field(default_factory=dict)
    ttft: dict[str, list[float]] = field(default_factory=dict)


async def one(s: aiohttp.ClientSession, url: str, r: TraceRequest, ids: list[int], pol: Policy, st: Live) -> None:
    body = {"model": r.model, "prompt": ids, "max_tokens": r.max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    if r.slo:
        headers["x-tiergate-slo-class"] = r.slo
    t0 = time.perf_counter()
    first = last = None
    usage = None
    try:
        async with s.post(url + "/v1/completions", data=json.dumps(body), headers=headers) as resp:
            tier = resp.headers.get("x-tiergate-tier")
            if resp.status != 200:
                st.errors.append(f"{resp.status} {(await resp.text())[:200]}")
                return
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                ev = json.loads(line[6:])
                if ev.get("choices") and ev["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
                if ev.get("usage"):
                    usage = ev["usage"]
    except aiohttp.ClientError as exc:
        st.errors.append(type(exc).__name__)
        return
    if first is None or last is None or usage is None or not tier:
        st.errors.append("no first token, usage or tier")
        return
    cls = r.slo or "interactive"
    target = pol.slo_classes[cls]
    st.n[cls] = st.n.get(cls, 0) + 1
    st.ttft.setdefault(cls, []).append(first - t0)
    st.ttft_met[cls] = st.ttft_met.get(cls, 0) + ((first - t0) * 1000 <= target.ttft_ms)
    n_out = usage["completion_tokens"]
    if n_out > 1:
        st.tpot_n[cls] = st.tpot_n.get(cls, 0) + 1
        st.tpot_met[cls] = st.tpot_met.get(cls, 0) + ((last - first) / (n_out - 1) * 1000 <= target.tpot_ms)
    prices = pol.tiers[tier].prices
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    st.cost += ((usage["prompt_tokens"] - cached) * prices.input + cached * prices.cached_input
                + n_out * prices.output) / 1e6
    st.prompt += usage["prompt_tokens"]
    st.cached += cached
    st.completion += n_out
    st.tiers[tier] = st.tiers.get(tier, 0) + 1


async def drive(urls: list[str], trace: list[TraceRequest], pol: Policy) -> Live:
    """Each trace request at its arrival time, to the routers in turn."""
    st, streams = Live(), TokenStreams()
    bodies = [streams.prompt(r, i) for i, r in enumerate(trace)]   # built before the clock starts
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=1800)) as s:
        t0 = time.perf_counter()
        tasks = []
        for r, ids in zip(trace, bodies, strict=True):
            await asyncio.sleep(max(0.0, t0 + r.t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(s, urls[len(tasks) % len(urls)], r, ids, pol, st)))
        await asyncio.gather(*tasks)
    return st


def live_summary(st: Live) -> dict[str, Any]:
    tokens = st.prompt + st.completion
    return {"usd_per_1m_tokens": st.cost / tokens * 1e6 if tokens else None,
            "cache_hit": st.cached / st.prompt if st.prompt else None, "tiers": dict(sorted(st.tiers.items())),
            "served": sum(st.n.values()), "errors": len(st.errors),
            "slo": {c: {"requests": st.n[c], "ttft_attainment": st.ttft_met[c] / st.n[c],
                        "tpot_attainment": st.tpot_met.get(c, 0) / st.tpot_n[c] if st.tpot_n.get(c) else None,
                        "ttft_p50_s": sorted(st.ttft[c])[len(st.ttft[c]) // 2]}
                    for c in sorted(st.n)}}


def start_live(tmp: Path, procs: Procs, scale: float, name: str, windows: bool = False,
               routers: int = 1) -> tuple[list[str], Path]:
    """The simulators, the policy file and `routers` `tiergate serve` replicas (more than one: sharing a
    private valkey, as replicas share Redis)."""
    sims: dict[str, list[str]] = {}
    for tier, prof in SIMS.items():
        for i in range(2):
            port = free_port()
            procs.start([sys.executable, "-m", "router.cli", "sim", "--profile", prof, "--port", str(port),
                         "--served-model-name", MODELS[tier], "--time-scale", str(scale)], tmp / f"sim-{tier}{i}.log")
            sims.setdefault(tier, []).append(f"http://127.0.0.1:{port}")
    for urls in sims.values():
        for u in urls:
            if not wait_http_ok(u + "/health", 120):
                raise RuntimeError(f"simulator {u} did not start (see {tmp})")
    pol = tmp / f"{name}.yaml"
    pol.write_text(live_policy(name, sims, scale, windows))
    env = {**os.environ, "TIERGATE_LOG_LEVEL": "warning", "TIERGATE_DRAIN_GRACE_S": "0",
           "TIERGATE_POLICY_RELOAD_INTERVAL_S": "0"}
    if routers > 1:
        vport = free_port()
        procs.start([server_binary(), "--port", str(vport), "--save", "", "--appendonly", "no"], tmp / "valkey.log")
        env["TIERGATE_REDIS_URL"] = f"redis://127.0.0.1:{vport}/0"
        for _ in range(200):                       # up before the routers connect
            try:
                socket.create_connection(("127.0.0.1", vport), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
    urls = []
    for k in range(routers):
        port = free_port()
        procs.start([sys.executable, "-m", "router.cli", "serve", "--policy", str(pol), "--port", str(port)],
                    tmp / f"router{k}.log", {**env, "TIERGATE_DATA_DIR": str(tmp / f"r{k}")})
        url = f"http://127.0.0.1:{port}"
        if not wait_http_ok(url + "/ready", 120):
            raise RuntimeError(f"router did not start (see {tmp})")
        urls.append(url)
    return urls, pol


def replay(trace: Path, pol: Path, scale: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "router.cli", "replay", "run", "--trace", str(trace), "--policy", str(pol),
           "--replicas", "fast=2,balanced=2,long=2", "--profile", ",".join(f"{t}={p}" for t, p in SIMS.items()),
           "--time-scale", str(scale), "--json", "--no-progress"]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True).stdout
    runs: dict[str, Any] = json.loads(out)["policies"]
    return next(iter(runs.values()))


def compare(live: dict[str, Any], rep: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    rows: list[tuple[str, str, str, str, bool | None]] = []
    lu, ru = live["usd_per_1m_tokens"], rep["usd_per_1m_tokens"]
    d = (lu - ru) / ru * 100
    rows.append(("USD per 1M tokens", f"{lu:.6f}", f"{ru:.6f}", f"{d:+.1f}%", abs(d) <= 10))
    rows.append(("prefix cache hit", f"{live['cache_hit']:.1%}", f"{rep['cache_hit']:.1%}",
                 f"{(live['cache_hit'] - rep['cache_hit']) * 100:+.1f} pts", None))
    for c in sorted(set(live["slo"]) | set(rep["slo"])):
        lc, rc = live["slo"].get(c, {}), rep["slo"].get(c, {})
        for k, label in (("ttft_attainment", "TTFT attainment"), ("tpot_attainment", "TPOT attainment")):
            a, b = lc.get(k), rc.get(k)
            if a is None or b is None:
                continue
            rows.append((f"{c}: {label}", f"{a:.1%}", f"{b:.1%}", f"{(a - b) * 100:+.1f} pts", abs(a - b) <= 0.05))
        a, b = lc.get("ttft_p50_s"), rc.get("ttft_p50_s")
        if a is not None and b is not None:
            rows.append((f"{c}: TTFT p50 (s)", f"{a:.3f}", f"{b:.3f}", f"{a - b:+.3f} s", None))
    for t in sorted(set(live["tiers"]) | set(rep["tiers"])):
        rows.append((f"requests on {t}", str(live["tiers"].get(t, 0)), str(rep["tiers"].get(t, 0)), "", None))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--time-scale", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--policy", default="money", help="a bench/routing_replay.py variant (default money)")
    ap.add_argument("--keep", default=None, help="keep the trace, policy and logs in this folder")
    ap.add_argument("--kind", default="mixed", help="the synthesized workload (router/replay/synth.py)")
    ap.add_argument("--windows", action="store_true", help="admission windows on (issue #14)")
    ap.add_argument("--routers", type=int, default=1, help="router replicas sharing one valkey (live side)")
    args = ap.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="tg-agree-"))
    tmp.mkdir(parents=True, exist_ok=True)
    trace_path = tmp / "trace.jsonl"
    with trace_path.open("wb") as f:
        write_trace(agreement_trace(args.requests, args.seed, args.rate, args.kind), f)
    trace = list(read_trace(trace_path))
    load0 = os.getloadavg()
    procs = Procs()
    try:
        urls, pol_path = start_live(tmp, procs, args.time_scale, args.policy, args.windows, args.routers)
        t = time.perf_counter()
        st = asyncio.run(drive(urls, trace, load_policy(pol_path)))
        wall = time.perf_counter() - t
        load1 = os.getloadavg()
    finally:
        procs.stop()
    live = live_summary(st)
    rep = replay(trace_path, pol_path, args.time_scale)
    print(f"# replay vs live: {len(trace)} requests ({args.kind}, seed {args.seed}, {args.rate}/s), "
          f"policy {args.policy}{' with admission windows' if args.windows else ''}, {args.routers} router(s), "
          f"2 simulators per tier at time scale {args.time_scale}; live took {wall:.0f} s, "
          f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end (1 min); "
          f"live errors {live['errors']}{': ' + '; '.join(sorted(set(st.errors))[:3]) if st.errors else ''}")
    print("| figure | live | replay | difference | within bound |")
    print("|---|---|---|---|---|")
    for name, a, b, d, ok in compare(live, rep):
        print(f"| {name} | {a} | {b} | {d} | {'' if ok is None else ('yes' if ok else 'NO')} |")
    (tmp / "result.json").write_text(json.dumps({"live": live, "replay": rep}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
