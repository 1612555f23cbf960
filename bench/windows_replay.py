"""Admission windows by replay (issue #14): the mixed load and fairness, windows off and on, in one run.

Both runs replay the same seeded trace through `tiergate replay`'s driver (router/replay/driver.py) with the
demo policy, each tier's prefill rate seeded from its simulator profile; the only difference is
`admission.windows`. Virtual time on simulated engines: the figures are the simulator's, not a GPU's.

Mixed load (`--kind windows`, router/replay/synth.py): interactive chat bursts, 20-200K-token documents
(relaxed) and batch-class work at ~30% of the tokens. Printed per class: TTFT attainment and p50/p99; per
class, the queue wait p50/p99 of the requests that waited; refusals; and the batch class's engine share:
the busy engine-seconds of a run without the batch requests (what the higher classes use) against the run
with them, so "batch used" = (busy with batch - busy without) / (provisioned - busy without), the share of
the capacity the higher classes left idle that batch work filled, over the same makespan.

Fairness: tenants `bob` (interactive chat at --rate/11 per second, its share) and `alice` (the same kind of
traffic, at 1x bob's rate, then at 10x): bob's interactive TTFT p99 when alice floods, against when she
doesn't, windows off and on.

Usage: python bench/windows_replay.py [--requests 20000] [--rate 40] [--seed 1]
          [--replicas fast=4,balanced=4,long=4] [--fair-requests 12000] [--fair-rate 60]
          [--overdraw-ms MS] [--admission 'k: v, ...'] [--seats fast=256,...] [--only mixed|fairness]
"""

from __future__ import annotations

import argparse
import heapq
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from routing_replay import variant  # noqa: E402

from policies.schema import parse_policy  # noqa: E402
from router.replay.cluster import parse_assignments, shape  # noqa: E402
from router.replay.driver import Replay  # noqa: E402
from router.replay.synth import synth  # noqa: E402
from router.replay.trace import TraceRequest  # noqa: E402

TENANTS = f"""  alice: {{key_sha256: ["{'a' * 64}"], default_slo: interactive}}
  bob: {{key_sha256: ["{'b' * 64}"], default_slo: interactive}}
"""


OVERDRAW_MS: list[float | None] = [None]      # --overdraw-ms (None: the policy's default)
EXTRA: list[str] = [""]                       # --admission 'k: v, ...' (more admission fields)
SEATS: dict[str, int] = {}                    # --seats: tier -> max_num_seqs


def policy_text(windows: bool) -> str:
    text = variant("money")
    text = text.replace("\ntenants:\n", "\ntenants:\n" + TENANTS, 1)
    over = "" if OVERDRAW_MS[0] is None else f", overdraw_ms: {OVERDRAW_MS[0]:g}"
    for tier, n in SEATS.items():
        text, k = re.subn(rf"(\n  {tier}:\n)", rf"\g<1>    max_num_seqs: {n}\n", text, count=1)
        if not k:
            raise SystemExit(f"--seats: no tier {tier!r} in the policy")
    extra = f", {EXTRA[0]}" if EXTRA[0] else ""
    block = f"admission: {{windows: {'true' if windows else 'false'}{over}{extra}}}\n"
    if re.search(r"^admission:", text, re.M):
        text = re.sub(r"^admission:.*\n", block, text, count=1, flags=re.M)
    else:
        text = text.replace("\naccounting:\n", "\n" + block + "accounting:\n", 1)
    return text


def run(windows: bool, trace: list[TraceRequest], replicas: str) -> tuple[dict[str, Any], float]:
    pol = parse_policy(policy_text(windows), "bench.yaml")
    sizes = shape(pol, parse_assignments(replicas, "--replicas"), {})
    cpu = time.process_time()
    res = Replay(pol, sizes).run(iter(trace))
    s = res.summary()
    s["busy_total_s"] = sum(res.busy_s.values())
    s["provisioned_s"] = sum(n for _, n in sizes.values()) * res.makespan_s
    return s, time.process_time() - cpu


def fmt(x: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if x is None else f"{x * scale:,.{digits}f}"


def mixed(args: argparse.Namespace) -> None:
    trace = list(synth("windows", args.requests, args.seed, rate=args.rate))
    no_batch = [r for r in trace if r.slo != "batch"]
    print(f"mixed load: {len(trace):,} requests ({len(trace) - len(no_batch):,} batch), seed {args.seed}, "
          f"{args.rate:g}/s, replicas {args.replicas}")
    for windows in (False, True):
        s, cpu = run(windows, trace, args.replicas)
        base, _ = run(windows, no_batch, args.replicas)
        label = "windows on " if windows else "windows off"
        print(f"\n{label}: USD/1M tokens {s['usd_per_1m_tokens']}, makespan {s['makespan_s']:,.0f} s, "
              f"replay CPU {cpu:.1f} s, refused {s['refused'] or 'none'}")
        print(f"  {'class':<12} {'requests':>9} {'TTFT met':>9} {'p50 ms':>9} {'p99 ms':>10} "
              f"{'waited':>7} {'wait p50 ms':>12} {'wait p99 ms':>12}")
        waits = (s.get("queue") or {}).get("by_class", {})
        for cls, v in s["slo"].items():
            w = waits.get(cls, {})
            print(f"  {cls:<12} {v['requests']:>9,} {fmt(v['ttft_attainment'], 100, 2):>8}% "
                  f"{fmt(v['ttft_p50_s'], 1000):>9} {fmt(v['ttft_p99_s'], 1000):>10} {w.get('waited', 0):>7,} "
                  f"{fmt(w.get('wait_p50_s'), 1000):>12} {fmt(w.get('wait_p99_s'), 1000):>12}")
        if s.get("queue"):
            q = s["queue"]
            print("  queue outcomes: " + ", ".join(f"{k} {v:,}" for k, v in q.items() if isinstance(v, int)))
        bi = base["slo"].get("interactive", {})
        print(f"  without the batch requests: interactive TTFT met {fmt(bi.get('ttft_attainment'), 100, 2)}%, "
              f"p99 {fmt(bi.get('ttft_p99_s'), 1000)} ms")
        idle = s["provisioned_s"] - base["busy_total_s"] * s["makespan_s"] / max(base["makespan_s"], 1e-9)
        used = s["busy_total_s"] - base["busy_total_s"]
        print(f"  engine busy {s['busy_total_s']:,.0f} s of {s['provisioned_s']:,.0f} s provisioned; without the "
              f"batch requests {base['busy_total_s']:,.0f} s: batch filled {used:,.0f} s of the "
              f"{idle:,.0f} s the higher classes left idle ({100 * used / max(idle, 1e-9):.1f}%)")


def merged(*streams: Iterator[TraceRequest]) -> list[TraceRequest]:
    return list(heapq.merge(*streams, key=lambda r: r.t))


def fairness(args: argparse.Namespace) -> None:
    share = args.fair_rate / 11
    n_bob = max(1, args.fair_requests // 11)
    print(f"\nfairness: bob chats at {share:.1f}/s ({n_bob:,} requests); alice at 1x, then 10x that; "
          f"replicas {args.replicas}")
    print(f"  {'':<12} {'bob p99 ms, alice 1x':>22} {'bob p99 ms, alice 10x':>22} {'ratio':>7} "
          f"{'alice p99 ms at 10x':>20}")
    for windows in (False, True):
        row = []
        alice_p99 = None
        for mult in (1, 10):
            trace = merged(synth("chat", n_bob, args.seed, rate=share, tenants=("bob",)),
                           synth("chat", n_bob * mult, args.seed + 1, rate=share * mult, tenants=("alice",)))
            s, _ = run(windows, trace, args.replicas)
            t = s.get("tenant_ttft_p99_s", {})
            row.append(t.get("bob", {}).get("interactive"))
            alice_p99 = t.get("alice", {}).get("interactive")
        ratio = (row[1] / row[0]) if row[0] and row[1] else None
        print(f"  {'windows on' if windows else 'windows off':<12} {fmt(row[0], 1000):>22} {fmt(row[1], 1000):>22} "
              f"{fmt(ratio, 1, 2):>7} {fmt(alice_p99, 1000):>20}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--replicas", default="fast=4,balanced=4,long=4")
    ap.add_argument("--fair-requests", type=int, default=12000)
    ap.add_argument("--fair-rate", type=float, default=60.0)
    ap.add_argument("--only", choices=("mixed", "fairness"))
    ap.add_argument("--overdraw-ms", type=float, default=None, help="admission.overdraw_ms (default: the policy's)")
    ap.add_argument("--admission", default="", help="more admission fields, e.g. 'overdraw_ms: 250'")
    ap.add_argument("--seats", default="", help="tiers' max_num_seqs (the gate's room), e.g. fast=256,long=64")
    args = ap.parse_args()
    OVERDRAW_MS[0] = args.overdraw_ms
    EXTRA[0] = args.admission
    SEATS.update({k: int(v) for k, v in parse_assignments(args.seats, "--seats").items()})
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    if args.only != "fairness":
        mixed(args)
    if args.only != "mixed":
        fairness(args)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
