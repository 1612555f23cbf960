"""Usage reports from the ledger's hourly aggregates: per tenant, by day and tier; CSV export.

Aggregate fields are `<YYYYMMDDHH>|<tier>|<metric>` (see `router.budget_lua`), integer
tokens and cost units. Reports are plain dicts for JSON, and rows for CSV.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

from router.budget_store import usd

METRICS = ("requests", "prompt", "cached", "completion", "cost", "base", "nocache", "slo_met", "slo_n")


def by_day_tier(agg: dict[str, int], since: str = "") -> dict[tuple[str, str], dict[str, int]]:
    """(YYYY-MM-DD, tier) -> summed metrics, for days >= `since` (YYYYMMDD)."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    for key, value in agg.items():
        parts = key.split("|")
        if len(parts) != 3 or parts[2] not in METRICS:
            continue
        hour, tier, metric = parts
        if hour[:8] < since:
            continue
        day = f"{hour[:4]}-{hour[4:6]}-{hour[6:8]}"
        row = out.setdefault((day, tier), dict.fromkeys(METRICS, 0))
        row[metric] += value
    return out


def report(tenant: str, agg: dict[str, int], days: int, today: dt.date, budget: dict[str, Any]) -> dict[str, Any]:
    since = (today - dt.timedelta(days=days - 1)).strftime("%Y%m%d")
    rows = by_day_tier(agg, since)
    data = []
    totals = dict.fromkeys(METRICS, 0)
    for (day, tier), m in sorted(rows.items()):
        for k in METRICS:
            totals[k] += m[k]
        data.append({"date": day, "tier": tier, "requests": m["requests"],
                     "prompt_tokens": m["prompt"], "cached_tokens": m["cached"],
                     "completion_tokens": m["completion"], "cost_usd": round(usd(m["cost"]), 10),
                     "baseline_cost_usd": round(usd(m["base"]), 10), "no_cache_cost_usd": round(usd(m["nocache"]), 10),
                     "slo_met": m["slo_met"], "slo_measured": m["slo_n"]})
    cost, base, nocache = usd(totals["cost"]), usd(totals["base"]), usd(totals["nocache"])
    return {"object": "usage", "tenant": tenant, "days": days, "data": data,
            "totals": {"requests": totals["requests"], "prompt_tokens": totals["prompt"],
                       "cached_tokens": totals["cached"], "completion_tokens": totals["completion"],
                       "cost_usd": round(cost, 10), "baseline_cost_usd": round(base, 10),
                       "no_cache_cost_usd": round(nocache, 10),
                       "savings_vs_baseline_usd": round(base - cost, 10),
                       "savings_from_cache_usd": round(nocache - cost, 10)},
            "budget": budget}


CSV_FIELDS = ("tenant", "date", "tier", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd",
              "baseline_cost_usd", "no_cache_cost_usd", "slo_met", "slo_measured")


def to_csv(reports: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for rep in reports:
        for row in rep["data"]:
            w.writerow([_cell(rep["tenant"])] + [_cell(row[f]) for f in CSV_FIELDS[1:]])
    return buf.getvalue()


def _cell(v: object) -> str:
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
