"""A known ledger for the dashboard tests: a policy of three tiers and three tenants, and hourly aggregates
written straight into Redis (the hash router/budget_lua.py's SETTLE feeds), with the figures they must show.

* `demo` may use every tier. On `fast`: 10 requests, 6 of which `balanced` (the baseline, 32,768 context)
  could have served ($3.00 there against $0.70 here: $2.30 saved) and 4 it could not. On `long`: 5 requests
  with 50K-token prompts, none of which fit `balanced` (no alternative).
* `fastonly` may use `fast` only: whatever the ledger says, it has no alternative on `balanced`. It spent
  $0.00000365 (the figure that used to read `$3.65e-06`).
* `legacy` has hours written before the ledger counted eligibility (`base` without `base_n`): not compared.
"""

from __future__ import annotations

import datetime as dt
import random
import string
from typing import Any

import redis.asyncio as aioredis

from policies.schema import Policy, parse_policy
from router.auth import hash_key
from router.budget_store import tag as store_tag

DEAD = "http://127.0.0.1:9"
ADMIN = "sk-admin-dash-" + "y" * 8


def letters_tag() -> str:
    """A run tag without digits, so no tenant name can look like `1e5` to the scientific-notation check."""
    return "".join(random.choice(string.ascii_lowercase[6:]) for _ in range(6))


def keys(tag: str) -> dict[str, str]:
    return {name: f"sk-{name}-{tag}" for name in ("demo", "fastonly", "legacy")}


def policy(tag: str) -> Policy:
    k = keys(tag)
    tiers = "\n".join(f"""  {name}:
    model: Qwen/Qwen3-1.7B-FP8
    max_model_len: {ctx}
    prices: {{input: {p}, cached_input: 0.01, output: 0.20}}{gpu}
    instances: [{{id: {name}-{tag}, url: "{DEAD}"}}]""" for name, ctx, p, gpu in (
        ("fast", 40960, 0.05, "\n    gpu_cost_per_hour: 2.0"), ("balanced", 32768, 0.15, ""),
        ("long", 262144, 0.30, "\n    gpu_cost_per_hour: 4.0")))
    return parse_policy(f"""
version: 1
tiers:
{tiers}
slo_classes:
  interactive: {{ttft_ms: 1000, tpot_ms: 50}}
  batch: {{ttft_ms: 60000, tpot_ms: 1000}}
accounting: {{baseline_tier: balanced}}
tenants:
  demo-{tag}: {{key_sha256: [{hash_key(k['demo'])}], budgets: {{monthly_usd: 50.0}}}}
  fastonly-{tag}: {{key_sha256: [{hash_key(k['fastonly'])}], allowed_tiers: [fast]}}
  legacy-{tag}: {{key_sha256: [{hash_key(k['legacy'])}], budgets: {{daily_usd: 1.0}}}}
admin: {{key_sha256: [{hash_key(ADMIN)}]}}
routes:
  chat: {{tiers: [fast, balanced, long], profile: p}}
profiles:
  p:
    filters: [{{type: tier_allowed}}, {{type: context_fits}}]
    scorers: [{{type: load}}]
    picker: {{type: max_score}}
""", "dashboard-test.yaml")


USD = 10**10   # cost units per USD (router/budget_store.py)

LEDGER: dict[str, dict[str, dict[str, int]]] = {
    "demo": {
        "fast": {"requests": 10, "prompt": 20_000, "cached": 8_000, "completion": 3_000, "cost": 12 * USD // 10,
                 "base": 3 * USD, "base_n": 6, "base_cost": 7 * USD // 10, "base_na": 4, "nocache": 15 * USD // 10,
                 "slo_met": 8, "slo_n": 10, "slo_met@interactive": 8, "slo_n@interactive": 10,
                 "gpu_us": 1_800_000_000, "gpu_src_engine": 10},
        "long": {"requests": 5, "prompt": 250_000, "cached": 0, "completion": 1_000, "cost": 123_456 * USD // 10_000,
                 "base_na": 5, "nocache": 15 * USD, "slo_met": 3, "slo_n": 5, "slo_met@batch": 3, "slo_n@batch": 5,
                 "gpu_us": 7_200_000_000, "gpu_src_sim": 5}},
    "fastonly": {
        "fast": {"requests": 3, "prompt": 600, "cached": 0, "completion": 30, "cost": 36_500, "base": 90_000,
                 "base_n": 3, "base_cost": 36_500, "nocache": 36_500}},
    "legacy": {
        "fast": {"requests": 2, "prompt": 400, "cached": 0, "completion": 20, "cost": 20_000_000,
                 "base": 50_000_000}},
}

# what the pages and reports must say
DEMO: dict[str, Any] = {
    "spend": "$13.55", "saved": "$2.30", "saved_pct": "76.7%", "base_n": 6, "no_alt": 9, "cache": "$2.95",
    "cache_pct": "17.9%", "slo": "73.3%", "gpu": "2.50 h", "gpu_cost": "$9.00"}
FLEET: dict[str, Any] = {
    "spend": "$13.55", "saved": "$2.30", "base_n": 6, "no_alt": 12, "not_compared": 2, "cache": "$2.95",
    "interactive": "80.0%", "batch": "60.0%", "all": "73.3%", "gpu": "2.50 h", "gpu_cost": "$9.00"}


def seed_day(today: dt.date) -> dt.date:
    """Yesterday: inside every window of a day or more, even if the date turns while a test runs."""
    return today - dt.timedelta(days=1)


def aggregates(tenant: str, day: dt.date) -> dict[str, int]:
    hour = day.strftime("%Y%m%d") + "12"
    return {f"{hour}|{tier}|{metric}": v for tier, metrics in LEDGER[tenant].items() for metric, v in metrics.items()}


async def seed(r: aioredis.Redis, tag: str, today: dt.date | None = None) -> None:
    day = seed_day(today or dt.datetime.now(dt.UTC).date())
    for tenant in LEDGER:
        key = f"{store_tag(f'{tenant}-{tag}')}:agg:{day:%Y%m%d}"
        await r.hset(key, mapping=dict(aggregates(tenant, day)))  # type: ignore[misc]
        await r.expire(key, 3600)
