"""Usage reports from the ledger's hourly aggregates: per tenant, by day and tier; CSV export.

Aggregate fields are `<YYYYMMDDHH>|<tier>|<metric>` (see `router.budget_lua`), integer
tokens and cost units. Reports are plain dicts for JSON, and rows for CSV.

Savings are honest (router/lifecycle/billing.py): `savings_vs_baseline_usd` compares the baseline's cost
with the actual cost of the same requests (`baseline_comparable_cost_usd`), those the baseline tier could
have served; the rest are `no_alternative_requests`. GPU time (router/chargeback.py) is reported in hours
and at each tier's `gpu_cost_per_hour` (null where the tier has none); `gpu_source_requests` says how many
were charged from the engine's scrape, the simulator, or estimated from throughput.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Mapping
from typing import Any

from router.budget_store import GPU_SOURCES, usd

METRICS = ("requests", "prompt", "cached", "completion", "cost", "base", "nocache", "slo_met", "slo_n",
           "base_n", "base_na", "base_cost", "gpu_us", "gpu_src_engine", "gpu_src_sim", "gpu_src_throughput")
PER_CLASS = ("slo_met@", "slo_n@")   # + the SLO class: per-class attainment


def by_day_tier(agg: dict[str, int], since: str = "") -> dict[tuple[str, str], dict[str, int]]:
    """(YYYY-MM-DD, tier) -> summed metrics (METRICS, and slo_met@<class> / slo_n@<class> where present), for
    days >= `since` (YYYYMMDD)."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for key, value in agg.items():
        parts = key.split("|")
        if len(parts) != 3 or not (parts[2] in METRICS or parts[2].startswith(PER_CLASS)):
            continue
        hour, tier, metric = parts
        if hour[:8] < since:
            continue
        day = f"{hour[:4]}-{hour[4:6]}-{hour[6:8]}"
        row = out.setdefault((day, tier), dict.fromkeys(METRICS, 0))
        row[metric] = row.get(metric, 0) + value
    return out


def _classes(m: dict[str, int]) -> dict[str, dict[str, int]]:
    names = sorted({k.partition("@")[2] for k in m if k.startswith(PER_CLASS)})
    return {c: {"slo_met": m.get("slo_met@" + c, 0), "slo_measured": m.get("slo_n@" + c, 0)} for c in names}


def _gpu(m: dict[str, int], price: float | None) -> dict[str, Any]:
    """GPU hours charged (router/chargeback.py), their cost at the tier's `gpu_cost_per_hour` (None: it has none),
    and the requests charged from each input (throughput ones are estimates)."""
    hours = m["gpu_us"] / 3.6e9
    return {"gpu_hours": round(hours, 9), "gpu_cost_usd": None if price is None else round(hours * price, 10),
            "gpu_source_requests": {s: m["gpu_src_" + s] for s in GPU_SOURCES}}


def _money(m: dict[str, int]) -> dict[str, Any]:
    """The cost and its honest counterfactuals (router/lifecycle/billing.py): the baseline's cost counts only
    requests it could have served (`baseline_requests`); `no_alternative_requests` could not be."""
    return {"cost_usd": round(usd(m["cost"]), 10), "baseline_cost_usd": round(usd(m["base"]), 10),
            "no_cache_cost_usd": round(usd(m["nocache"]), 10), "baseline_requests": m["base_n"],
            "no_alternative_requests": m["base_na"], "baseline_comparable_cost_usd": round(usd(m["base_cost"]), 10)}


def report(tenant: str, agg: dict[str, int], days: int, today: dt.date, budget: dict[str, Any],
           gpu_prices: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """`gpu_prices`: tier -> the policy's gpu_cost_per_hour (None, or a tier not named: no GPU cost)."""
    since = (today - dt.timedelta(days=days - 1)).strftime("%Y%m%d")
    rows = by_day_tier(agg, since)
    prices = gpu_prices or {}
    data = []
    totals = dict.fromkeys(METRICS, 0)
    gpu_cost: float | None = None
    for (day, tier), m in sorted(rows.items()):
        for k, v in m.items():
            totals[k] = totals.get(k, 0) + v
        g = _gpu(m, prices.get(tier))
        if g["gpu_cost_usd"] is not None:
            gpu_cost = (gpu_cost or 0.0) + g["gpu_cost_usd"]
        data.append({"date": day, "tier": tier, "requests": m["requests"],
                     "prompt_tokens": m["prompt"], "cached_tokens": m["cached"],
                     "completion_tokens": m["completion"], **_money(m),
                     "slo_met": m["slo_met"], "slo_measured": m["slo_n"], "slo_by_class": _classes(m), **g})
    cost, base, nocache = usd(totals["cost"]), usd(totals["base"]), usd(totals["nocache"])
    g = _gpu(totals, None)
    g["gpu_cost_usd"] = None if gpu_cost is None else round(gpu_cost, 10)   # the tiers' own prices, summed
    return {"object": "usage", "tenant": tenant, "days": days, "data": data,
            "totals": {"requests": totals["requests"], "prompt_tokens": totals["prompt"],
                       "cached_tokens": totals["cached"], "completion_tokens": totals["completion"],
                       **_money(totals),
                       "savings_vs_baseline_usd": round(base - usd(totals["base_cost"]), 10),
                       "savings_from_cache_usd": round(nocache - cost, 10),
                       "slo_by_class": _classes(totals), **g},
            "budget": budget}


CSV_FIELDS = ("tenant", "date", "tier", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd",
              "baseline_cost_usd", "no_cache_cost_usd", "slo_met", "slo_measured",
              "baseline_requests", "no_alternative_requests", "baseline_comparable_cost_usd",
              "gpu_hours", "gpu_cost_usd")


def to_csv(reports: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for rep in reports:
        for row in rep["data"]:
            w.writerow([_cell(rep["tenant"])] + [_cell(row[f]) for f in CSV_FIELDS[1:]])
    return buf.getvalue()


def _cell(v: object) -> str:
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
