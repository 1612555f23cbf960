"""Routing quality at fleet scale, measured by `tiergate replay` (issue #13): the money objective
against its peers, on one synthesized trace, in one process and on virtual time.

Policies (all derived from the demo policy, so tiers, prices, SLO classes and tenants are equal;
each tier's `prefill_tokens_per_s` is seeded from its simulator profile, as an operator would):
* money: the demo's `money` profile (policies/plugins/expected_money.py);
* weighted: the previous weighted profile (expected_cost + prefix_affinity + load, bounded_load);
* always-balanced: everything on the 4B `balanced` tier, `long` only for prompts that don't fit it;
* cheapest-fits: the cheapest tier whose context fits by list price (`list_price`), spread by hash
  within it (as bench/routing_quality.py's round robin within the tier);
* litellm-lowest-cost: LiteLLM's lowest-cost strategy: the cheapest list price that fits, its first
  instance (`max_score` with `ties: order`): no load, no cache, no SLO;
* round-robin: any tier whose context fits, spread by hash (no scorer).

After the table: the floor no policy can beat on this trace, from the trace alone: every request on the
cheapest tier whose context fits, every prefix cached wherever it was seen before (unbounded KV cache,
no queues, no SLO), and the same bound for always-balanced. The gap between a policy and the floor is
what routing could still win; the floor against always-balanced is the most any policy could save.

Usage: python bench/routing_replay.py [--requests 20000] [--seed 1] [--replicas fast=24,balanced=16,long=8]
         [--rate 60] [--json]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from policies.schema import load_policy  # noqa: E402
from router.replay.trace import read_trace  # noqa: E402

DEMO = ROOT / "policies" / "examples" / "demo.yaml"
PREFILL = {"fast": 190200, "balanced": 72600, "long": 52600}   # backends/sim/profiles.yaml (H200 fits)

PROFILES = {
    "cheapest-fits": """  cheapest-fits:
    filters: [{type: tier_allowed}, {type: context_fits, params: {min_completion_tokens: 16}}, {type: healthy}]
    scorers: [{type: list_price}]
    picker: {type: max_score}
""",
    "litellm-lowest-cost": """  litellm-lowest-cost:
    filters: [{type: tier_allowed}, {type: context_fits, params: {min_completion_tokens: 16}}, {type: healthy}]
    scorers: [{type: list_price}]
    picker: {type: max_score, params: {ties: order}}
""",
    "round-robin": """  round-robin:
    filters: [{type: tier_allowed}, {type: context_fits, params: {min_completion_tokens: 16}}, {type: healthy}]
    scorers: []
    picker: {type: max_score}
""",
}


def variant(name: str) -> str:
    text = DEMO.read_text()
    for tier, tps in PREFILL.items():   # seed the TTFT predictor, as an operator who knows the hardware would
        text = re.sub(rf"(\n  {tier}:\n(?:    .*\n)*?    max_model_len: \d+\n)",
                      rf"\g<1>    prefill_tokens_per_s: {tps}\n", text, count=1)
    profile = {"money": "money", "weighted": "weighted", "always-balanced": "money"}.get(name, name)
    text = re.sub(r"profile: money\n", f"profile: {profile}\n", text)
    if name == "always-balanced":
        text = text.replace("    tiers: [fast, balanced, long]\n", "    tiers: [balanced, long]\n", 1)
    if name in PROFILES:
        text = text.replace("\nprofiles:\n", "\nprofiles:\n" + PROFILES[name], 1)
    return text


def floor_usd(trace: Path, tiers: list[tuple[str, float, float, float, int]]) -> tuple[float, dict[str, float]]:
    """USD per 1M tokens with unbounded caches and no queues: each request on the first of `tiers`
    (name, input, cached, output price, context) that fits it; a prefix group is cached on a tier where the
    same chain of groups came before, up to the tokens seen of it."""
    seen: dict[tuple[str, tuple[str, ...], str], int] = {}
    usd, tokens, by = 0.0, 0, {}
    for r in read_trace(trace):
        name, pin, pcached, pout, _ = next(t for t in tiers if r.prompt + min(r.output, 16) <= t[4])
        cached, chain = 0, ()
        for p in r.prefix:
            key = (name, chain, p.id)
            chain = (*chain, p.id)
            have = seen.get(key, 0)
            cached += min(have, p.tokens)
            seen[key] = max(have, p.tokens)
            if have < p.tokens:
                break
        c = ((r.prompt - cached) * pin + cached * pcached + r.output * pout) / 1e6
        usd, tokens = usd + c, tokens + r.prompt + r.output
        by[name] = by.get(name, 0.0) + c
    return usd / tokens * 1e6, by


def print_floor(trace: Path) -> None:
    pol = load_policy(DEMO)
    tiers = sorted(((n, t.prices.input, t.prices.cached_input, t.prices.output, t.max_model_len)
                    for n, t in pol.tiers.items()), key=lambda t: t[1] + t[3])
    for label, names in (("cheapest tier that fits", [t[0] for t in tiers]),
                         ("always-balanced", ["balanced", "long"])):
        per_1m, by = floor_usd(trace, [t for t in tiers if t[0] in names])
        parts = ", ".join(f"{k} ${v:.4f}" for k, v in sorted(by.items()))
        print(f"floor, {label} with unbounded caches and no queues: ${per_1m:.6f} per 1M tokens ({parts})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate", type=float, default=60.0)
    ap.add_argument("--replicas", default="fast=24,balanced=16,long=8")
    ap.add_argument("--policies",
                    default="money,weighted,always-balanced,cheapest-fits,litellm-lowest-cost,round-robin")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tg-routing-replay-"))
    trace = tmp / "mixed.jsonl"
    tg = [sys.executable, "-m", "router.cli", "replay"]
    subprocess.run([*tg, "synth", "--kind", "mixed", "--requests", str(args.requests), "--seed", str(args.seed),
                    "--rate", str(args.rate), "-o", str(trace)], check=True, cwd=ROOT)
    files = []
    for name in args.policies.split(","):
        f = tmp / f"{name}.yaml"
        f.write_text(variant(name))
        files.append(str(f))
    cmd = [*tg, "run", "--trace", str(trace), "--replicas", args.replicas, "--no-progress", "--compare", *files]
    if args.json:
        cmd.append("--json")
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if not args.json:
        print_floor(trace)
    return rc


if __name__ == "__main__":
    sys.exit(main())
