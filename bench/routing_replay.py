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
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
