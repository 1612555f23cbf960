"""`tiergate replay`: what would this policy do?

  tiergate replay synth --kind mixed --requests 100000 --seed 1 -o trace.jsonl
  tiergate replay run --trace trace.jsonl --policy policies/examples/demo.yaml
  tiergate replay run --trace trace.jsonl --compare a.yaml b.yaml --replicas fast=6,balanced=4 --json

`run` replays the trace through each policy on the decision core (router/replay/driver.py), against
simulated engines on a virtual clock, and prints one column per policy (router/replay/report.py). A
progress bar (rich) goes to stderr while it works; stdout holds only the result, the same bytes for the
same inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.replay.trace import TraceError, read_trace, write_trace

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "examples" / "demo.yaml"


def add_replay_args(p: argparse.ArgumentParser) -> None:
    from router.replay.synth import KINDS

    sub = p.add_subparsers(dest="replay_cmd", required=True)
    s = sub.add_parser("synth", help="write a standard workload as a trace (JSONL)")
    s.add_argument("--kind", choices=KINDS, default="mixed")
    s.add_argument("--requests", type=int, default=10_000)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--rate", type=float, default=20.0, help="mean arrivals per second (default 20)")
    s.add_argument("--tenants", default="demo", help="comma-separated tenants, drawn uniformly (default demo)")
    s.add_argument("--model", default="auto", help="the model every request names (default auto)")
    s.add_argument("-o", "--output", required=True, help="trace file to write ('-' for stdout)")
    s.set_defaults(fn=synth_cmd)
    r = sub.add_parser("run", help="replay a trace through one policy, or several side by side")
    r.add_argument("--trace", required=True, help="trace JSONL (`tiergate replay synth`, or a recorded one)")
    r.add_argument("--policy", default=None, help="policy YAML (default: the demo policy)")
    r.add_argument("--compare", nargs="+", default=None, metavar="POLICY", help="policies to compare side by side")
    r.add_argument("--replicas", default=None, help="instances per tier, e.g. fast=6,balanced=4 (default: "
                   "the policy's simulate.replicas or its instance count)")
    r.add_argument("--profile", default=None, help="simulator profile per tier, e.g. fast=qwen3-1.7b-fp8 (default: "
                   "the policy's simulate.profile)")
    r.add_argument("--time-scale", type=float, default=None,
                   help="every tier's GPUs this many times slower (default: each tier's simulate.time_scale, else 1)")
    r.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between /metrics scrapes (1.0)")
    r.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    r.set_defaults(fn=run_cmd)


def synth_cmd(args: argparse.Namespace) -> int:
    from router.replay.synth import synth

    tenants = tuple(t.strip() for t in args.tenants.split(",") if t.strip())
    try:
        reqs = synth(args.kind, args.requests, args.seed, args.rate, tenants or ("demo",), args.model)
        if args.output == "-":
            n = write_trace(reqs, sys.stdout.buffer)
        else:
            with open(args.output, "wb") as f:
                n = write_trace(reqs, f)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {n} requests ({args.kind}, seed {args.seed}) to {args.output}", file=sys.stderr)
    return 0


def _names(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    return [p.stem if stems.count(p.stem) == 1 else str(p) for p in paths]


def run_cmd(args: argparse.Namespace) -> int:
    from policies.schema import PolicyError, load_policy
    from router.replay.cluster import ClusterError, parse_assignments, shape
    from router.replay.driver import Replay
    from router.replay.report import to_json, to_table

    paths = [Path(p) for p in (args.compare or [args.policy or DEFAULT_POLICY])]
    trace = Path(args.trace)
    try:
        digest = hashlib.sha256(trace.read_bytes()).hexdigest()[:16]
        total = sum(1 for line in trace.open("rb") if line.strip())
        replicas = parse_assignments(args.replicas, "--replicas")
        profiles = parse_assignments(args.profile, "--profile")
        policies = [(name, load_policy(p)) for name, p in zip(_names(paths), paths, strict=True)]
        sizes = {name: shape(pol, replicas, profiles, args.time_scale) for name, pol in policies}
        if args.scrape_interval <= 0:
            raise ClusterError("--scrape-interval must be > 0")
    except (OSError, PolicyError, ClusterError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs = {}
    with _progress(not args.no_progress and sys.stderr.isatty()) as bar:
        for name, pol in policies:
            tick = bar(name, total)
            try:
                rep = Replay(pol, sizes[name], scrape_interval_s=args.scrape_interval, progress=tick)
                runs[name] = rep.run(read_trace(trace)).summary()
            except TraceError as exc:
                print(f"error: {name}: {exc}", file=sys.stderr)
                return 2
    meta = {"trace": str(trace), "trace_sha256": digest[:16], "requests": total,
            "replicas": {n: {t: k for t, (_, k) in s.items()} for n, s in sizes.items()},
            "profiles": {n: {t: p.name for t, (p, _) in s.items()} for n, s in sizes.items()}}
    out = to_json(runs, meta) if args.json else \
        to_table(runs, f"tiergate replay: {trace.name} ({total:,} requests)").encode()
    sys.stdout.buffer.write(out)
    return 0


class _progress:
    """A rich progress bar per policy on stderr (or nothing)."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.bar: Any = None

    def __enter__(self) -> Callable[[str, int], Callable[[int, float], None] | None]:
        if self.on:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("virtual {task.fields[vt]}"), TimeElapsedColumn(),
                                console=Console(stderr=True), transient=False)
            self.bar.__enter__()

        def make(name: str, total: int) -> Callable[[int, float], None] | None:
            if self.bar is None:
                return None
            bar = self.bar
            task = bar.add_task(name, total=total, vt="0 s")

            def tick(done: int, vt: float) -> None:
                bar.update(task, completed=done, vt=f"{vt:,.0f} s")
            return tick
        return make

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
