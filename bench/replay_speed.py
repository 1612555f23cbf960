"""Replay speed: virtual requests per CPU-second and peak memory of `tiergate replay` at fleet scale.

The standard mixed workload (router/replay/synth.py) streamed straight into the replay driver
(router/replay/driver.py) with the demo policy on 48 simulated instances (16 per tier by default), on
one core. The Done-when target of issue 13: 1,000,000 requests in <= 10 minutes (>= 1,667 requests per
CPU-second).

Usage: python bench/replay_speed.py [--requests 100000] [--rate 150] [--replicas fast=16,balanced=16,long=16]
       [--kind mixed] [--seed 1] [--policy policies/examples/demo.yaml] [--profile-top 0]
Prints: requests, virtual seconds, CPU seconds, requests per CPU-second, peak RSS, load average at start
and end, and the replay's headline figures.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policies.schema import load_policy  # noqa: E402
from router.replay.cluster import parse_assignments, shape  # noqa: E402
from router.replay.driver import Replay  # noqa: E402
from router.replay.synth import synth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=150.0)
    ap.add_argument("--replicas", default="fast=16,balanced=16,long=16")
    ap.add_argument("--kind", default="mixed")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--policy", default=str(ROOT / "policies" / "examples" / "demo.yaml"))
    ap.add_argument("--profile-top", type=int, default=0, help="cProfile the run, print the top N by own time")
    args = ap.parse_args()
    pol = load_policy(args.policy)
    sizes = shape(pol, parse_assignments(args.replicas, "--replicas"), {})
    load0 = os.getloadavg()
    last = [time.monotonic()]

    def progress(done: int, vt: float) -> None:
        if time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            print(f"  {done:,} requests, virtual {vt:,.0f} s, cpu {time.process_time() - cpu0:,.0f} s",
                  file=sys.stderr, flush=True)

    rep = Replay(pol, sizes, progress=progress)
    prof = cProfile.Profile() if args.profile_top else None
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    if prof is not None:
        prof.enable()
    res = rep.run(synth(args.kind, args.requests, args.seed, rate=args.rate))
    if prof is not None:
        prof.disable()
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - wall0
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = res.summary()
    n_inst = sum(n for _, n in sizes.values())
    print(f"requests            {args.requests:,} ({args.kind}, seed {args.seed}, {args.rate:g}/s)")
    print(f"instances           {n_inst} ({', '.join(f'{t}={n}' for t, (_, n) in sizes.items())})")
    print(f"virtual seconds     {s['makespan_s']:,.0f}")
    print(f"CPU seconds         {cpu:,.1f} (wall {wall:,.1f})")
    print(f"requests / CPU-s    {args.requests / cpu:,.0f}")
    print(f"1M requests at this rate: {1_000_000 / (args.requests / cpu) / 60:,.1f} CPU-minutes")
    print(f"peak RSS            {rss_mib:,.0f} MiB")
    print(f"load average        {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print(f"served {s['served']:,}, USD/1M tokens {s['usd_per_1m_tokens']}, cache hit {s['cache_hit']}, "
          f"tiers {s['tiers']}")
    for c, v in s["slo"].items():
        print(f"  {c}: TTFT attainment {v['ttft_attainment']}, p50 {v['ttft_p50_s']} s, p99 {v['ttft_p99_s']} s")
    if prof is not None:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile_top)


if __name__ == "__main__":
    main()
