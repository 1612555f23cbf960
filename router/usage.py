"""Usage reports from the ledger's hourly aggregates: per tenant, by day and tier; CSV export.

Aggregate fields are `<YYYYMMDDHH>|<tier>|<metric>` (see `router.budget_lua`), integer
tokens and cost units. Reports are plain dicts for JSON, and rows for CSV. A metric the
ledger does not write (yet) reads as 0.

Honest counterfactuals. "What it would have cost on the baseline tier" counts only requests
the baseline tier could have served (its context fits, and the tenant may use it): `base` is
their cost on the baseline tier, `base_cost` their real cost, `base_n` how many they were, and
`base_na` the requests with no alternative. Savings against the baseline = base - base_cost,
over those requests only; the rest are reported as "no alternative", never priced. Hours
written before the ledger counted eligibility (`base` without `base_n`) are not compared at
all ("not compared"). A tenant whose policy does not allow the baseline tier has no
alternative for any request. Savings from cache hits = nocache - cost, where the ledger
recorded `nocache` (else none are claimed).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Mapping
from typing import Any

from router.budget_store import usd

METRICS = ("requests", "prompt", "cached", "completion", "cost", "base", "base_n", "base_cost", "base_na",
           "nocache", "slo_met", "slo_n", "gpu_us", "gpu_src_engine", "gpu_src_sim", "gpu_src_throughput")
PER_CLASS = ("slo_met@", "slo_n@")   # `slo_met@<class>`, `slo_n@<class>`
GPU_US_PER_HOUR = 3.6e9
GPU_SOURCES = ("engine", "sim", "throughput")   # how a request's GPU time was measured (`gpu_src_<source>`)


def _known(metric: str) -> bool:
    return metric in METRICS or metric.startswith(PER_CLASS)


def _honest(row: dict[str, int]) -> dict[str, int]:
    """One hour and tier: drop a baseline figure with no eligibility count, claim no cache saving unrecorded."""
    if row.get("base_n", 0) <= 0:
        row["base"] = row["base_cost"] = 0
        row["base_n"] = 0
    if row.get("nocache", 0) <= 0:
        row["nocache"] = row.get("cost", 0)
    return row


def by_day_tier(agg: Mapping[str, int], since: str = "") -> dict[tuple[str, str], dict[str, int]]:
    """(YYYY-MM-DD, tier) -> summed metrics (per-class SLO ones included), for days >= `since` (YYYYMMDD)."""
    hourly: dict[tuple[str, str], dict[str, int]] = {}
    for key, value in agg.items():
        parts = key.split("|")
        if len(parts) != 3 or not _known(parts[2]) or parts[0][:8] < since:
            continue
        row = hourly.setdefault((parts[0], parts[1]), dict.fromkeys(METRICS, 0))
        row[parts[2]] = row.get(parts[2], 0) + int(value)
    out: dict[tuple[str, str], dict[str, int]] = {}
    for (hour, tier), row in hourly.items():
        day = f"{hour[:4]}-{hour[4:6]}-{hour[6:8]}"
        acc = out.setdefault((day, tier), dict.fromkeys(METRICS, 0))
        for k, v in _honest(row).items():
            acc[k] = acc.get(k, 0) + v
    return out


def _no_alternative(row: dict[str, int]) -> None:
    """The tenant may not use the baseline tier: every request it made had no alternative."""
    row["base_na"] = row["requests"]
    row["base"] = row["base_n"] = row["base_cost"] = 0


def _money(units: int) -> float:
    return round(usd(units), 10)


def _gpu(m: Mapping[str, int], per_hour: float | None) -> tuple[float, float | None]:
    h = m.get("gpu_us", 0) / GPU_US_PER_HOUR
    return round(h, 9), (None if per_hour is None else round(h * per_hour, 10))


def _row(day: str, tier: str, m: dict[str, int], per_hour: float | None) -> dict[str, Any]:
    gpu_h, gpu_usd = _gpu(m, per_hour)
    return {"date": day, "tier": tier, "requests": m["requests"], "prompt_tokens": m["prompt"],
            "cached_tokens": m["cached"], "completion_tokens": m["completion"], "cost_usd": _money(m["cost"]),
            "baseline_cost_usd": _money(m["base"]), "baseline_requests": m["base_n"],
            "baseline_actual_cost_usd": _money(m["base_cost"]), "no_alternative_requests": m["base_na"],
            "no_cache_cost_usd": _money(m["nocache"]), "slo_met": m["slo_met"], "slo_measured": m["slo_n"],
            "gpu_hours": gpu_h, "gpu_cost_usd": gpu_usd,
            "gpu_source_requests": {s: m.get("gpu_src_" + s, 0) for s in GPU_SOURCES},
            "slo_by_class": {c[len("slo_n@"):]: {"met": m.get("slo_met@" + c[len("slo_n@"):], 0), "measured": v}
                             for c, v in sorted(m.items()) if c.startswith("slo_n@") and v > 0}}


def _totals(t: dict[str, int], gpu_usd: float | None, classes: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {"requests": t["requests"], "prompt_tokens": t["prompt"], "cached_tokens": t["cached"],
            "completion_tokens": t["completion"], "cost_usd": _money(t["cost"]),
            "baseline_cost_usd": _money(t["base"]), "baseline_requests": t["base_n"],
            "baseline_actual_cost_usd": _money(t["base_cost"]),
            "savings_vs_baseline_usd": _money(t["base"] - t["base_cost"]),
            "no_alternative_requests": t["base_na"],
            "not_compared_requests": max(0, t["requests"] - t["base_n"] - t["base_na"]),
            "no_cache_cost_usd": _money(t["nocache"]), "savings_from_cache_usd": _money(t["nocache"] - t["cost"]),
            "slo_met": t["slo_met"], "slo_measured": t["slo_n"], "slo_by_class": classes,
            "gpu_hours": round(t["gpu_us"] / GPU_US_PER_HOUR, 9), "gpu_cost_usd": gpu_usd,
            "gpu_source_requests": {s: t.get("gpu_src_" + s, 0) for s in GPU_SOURCES}}


def report(tenant: str, agg: Mapping[str, int], days: int, today: dt.date, budget: dict[str, Any], *,
           baseline: str = "", baseline_allowed: bool = True,
           gpu_per_hour: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """`baseline`: the baseline tier's name (for the report); `baseline_allowed`: the tenant may use it.
    `gpu_per_hour`: each tier's `gpu_cost_per_hour` (GPU cost is given only for tiers that have one)."""
    since = (today - dt.timedelta(days=days - 1)).strftime("%Y%m%d")
    prices = gpu_per_hour or {}
    data = []
    totals = dict.fromkeys(METRICS, 0)
    classes: dict[str, dict[str, int]] = {}
    gpu_usd: float | None = None
    for (day, tier), m in sorted(by_day_tier(agg, since).items()):
        if not baseline_allowed:
            _no_alternative(m)
        for k in METRICS:
            totals[k] += m[k]
        row = _row(day, tier, m, prices.get(tier))
        for name, c in row["slo_by_class"].items():
            acc = classes.setdefault(name, {"met": 0, "measured": 0})
            acc["met"] += c["met"]
            acc["measured"] += c["measured"]
        if row["gpu_cost_usd"] is not None:
            gpu_usd = round((gpu_usd or 0.0) + row["gpu_cost_usd"], 10)
        data.append(row)
    return {"object": "usage", "tenant": tenant, "days": days, "baseline_tier": baseline, "data": data,
            "totals": _totals(totals, gpu_usd, dict(sorted(classes.items()))), "budget": budget}


# the columns before `baseline_requests` keep their earlier order; new ones are appended
CSV_FIELDS = ("tenant", "date", "tier", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd",
              "baseline_cost_usd", "no_cache_cost_usd", "slo_met", "slo_measured",
              "baseline_requests", "no_alternative_requests", "baseline_actual_cost_usd", "gpu_hours", "gpu_cost_usd")


def to_csv(reports: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for rep in reports:
        for row in rep["data"]:
            w.writerow([cell(rep["tenant"])] + [cell(row[f]) for f in CSV_FIELDS[1:]])
    return buf.getvalue()


def cell(v: object) -> str:
    """A CSV cell: floats in plain decimals (never 1e-05), None empty, text that a spreadsheet would run as a
    formula quoted with a leading apostrophe."""
    if v is None:
        return ""
    s = f"{v:.10f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)
    return "'" + s if s[:1] in ("=", "+", "-", "@") and not isinstance(v, int | float) else s  # no CSV formulas


def budget_view(spec_daily: float | None, spec_monthly: float | None, status: dict[str, Any] | None) -> dict[str, Any]:
    if status is None:
        return {"daily_usd": spec_daily, "monthly_usd": spec_monthly, "available": False}
    out: dict[str, Any] = {"daily_usd": spec_daily, "monthly_usd": spec_monthly, "available": True,
                           "spent_today_usd": usd(status["spent_day"]),
                           "reserved_today_usd": usd(status["reserved_day"]),
                           "spent_month_usd": usd(status["spent_month"]),
                           "reserved_month_usd": usd(status["reserved_month"])}
    if spec_daily is not None:
        out["remaining_today_usd"] = max(0.0, spec_daily - out["spent_today_usd"] - out["reserved_today_usd"])
    if spec_monthly is not None:
        out["remaining_month_usd"] = max(0.0, spec_monthly - out["spent_month_usd"] - out["reserved_month_usd"])
    return out
