"""Policy file load time: `policies.schema.parse_policy` on the demo policy grown to N tenants.

Each generated tenant is one flow mapping (a key hash and a daily budget): 10,000 tenants make
a file of about 1 MB. Prints the file size and
the best and median of `--repeat` parses (YAML compose, the strict checks, raw data, msgspec
conversion and the semantic checks), all in this process. Reference figures only; nothing here
asserts a time.

Usage: python bench/policy_load.py [--tenants 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from policies.schema import parse_policy  # noqa: E402

DEMO = ROOT / "policies" / "examples" / "demo.yaml"


def policy_with_tenants(n: int) -> str:
    text = DEMO.read_text()
    head, sep, tail = text.partition("\ntenants:\n")
    rows = []
    for i in range(n):
        digest = hashlib.sha256(f"sk-bench-{i}".encode()).hexdigest()
        rows.append(f"  t{i:05d}: {{key_sha256: [{digest}], budgets: {{daily_usd: 5.0}}}}\n")
    return head + sep + "".join(rows) + tail


def main(tenants: int, repeat: int) -> None:
    text = policy_with_tenants(tenants)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        policy = parse_policy(text, "generated.yaml")
        times.append(time.perf_counter() - t0)
    print(f"{len(policy.tenants):,} tenants, {len(text.encode()) / 1e6:.2f} MB: parse_policy best "
          f"{min(times) * 1000:.0f} ms, median {statistics.median(times) * 1000:.0f} ms ({repeat} runs)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    main(a.tenants, a.repeat)
