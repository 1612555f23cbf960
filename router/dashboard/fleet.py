"""The admin's fleet views, computed from every tenant's usage report (router/usage.py `report`).

Views (each a list of flat rows, so each is also a CSV):
* `daily_tenant`: spend and requests per day and tenant;   * `daily_tier`: the same per tier, with GPU-hours;
* `top`: tenants by spend, with their share;                * `savings`: per tenant, against the baseline tier
  (eligible requests only, "no alternative" counted apart) and from cache hits;
* `slo`: attainment by SLO class (and all classes together); * `gpu`: GPU-hours (and cost where the tier has a
  `gpu_cost_per_hour`) per tier, with how the GPU time was measured; * `budgets`: every tenant's budget state.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from router.usage import GPU_SOURCES, cell

VIEWS = ("daily_tenant", "daily_tier", "top", "savings", "slo", "gpu", "budgets")
BUDGET_SORTS = ("tenant", "today", "month", "used", "spend")


def _r(x: float) -> float:
    return round(x, 10)


def daily(reports: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    acc: dict[tuple[str, str], dict[str, Any]] = {}
    for rep in reports:
        for row in rep["data"]:
            name = rep["tenant"] if by == "tenant" else row["tier"]
            a = acc.setdefault((row["date"], name), {"date": row["date"], by: name, "requests": 0, "cost_usd": 0.0,
                                                      **({"gpu_hours": 0.0} if by == "tier" else {})})
            a["requests"] += row["requests"]
            a["cost_usd"] = _r(a["cost_usd"] + row["cost_usd"])
            if by == "tier":
                a["gpu_hours"] = round(a["gpu_hours"] + row["gpu_hours"], 9)
    return [acc[k] for k in sorted(acc)]


def top(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    total = sum(r["totals"]["cost_usd"] for r in reports)
    rows = []
    for rep in reports:
        t = rep["totals"]
        tiers: dict[str, float] = {}
        for row in rep["data"]:
            tiers[row["tier"]] = _r(tiers.get(row["tier"], 0.0) + row["cost_usd"])
        rows.append({"tenant": rep["tenant"], "cost_usd": t["cost_usd"], "requests": t["requests"],
                     "tokens": t["prompt_tokens"] + t["completion_tokens"],
                     "share": round(t["cost_usd"] / total, 6) if total > 0 else 0.0, "by_tier": tiers})
    return sorted(rows, key=lambda r: (-r["cost_usd"], r["tenant"]))


SAVINGS_FIELDS = ("requests", "baseline_requests", "baseline_cost_usd", "baseline_actual_cost_usd",
                  "savings_vs_baseline_usd", "no_alternative_requests", "not_compared_requests", "cost_usd",
                  "no_cache_cost_usd", "savings_from_cache_usd")


def savings(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"tenant": rep["tenant"], "baseline_tier": rep.get("baseline_tier", ""),
             **{f: rep["totals"][f] for f in SAVINGS_FIELDS}} for rep in reports]


def savings_total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {f: 0 for f in SAVINGS_FIELDS}
    for r in rows:
        for f in SAVINGS_FIELDS:
            out[f] = _r(out[f] + r[f]) if f.endswith("_usd") else out[f] + r[f]
    return out


def slo(reports: list[dict[str, Any]], classes: list[str]) -> list[dict[str, Any]]:
    acc = {c: [0, 0] for c in classes}
    met = measured = 0
    for rep in reports:
        t = rep["totals"]
        met, measured = met + t["slo_met"], measured + t["slo_measured"]
        for c, v in t.get("slo_by_class", {}).items():
            a = acc.setdefault(c, [0, 0])
            a[0] += v["met"]
            a[1] += v["measured"]
    rows = [{"slo_class": c, "met": m, "measured": n, "attainment": round(m / n, 6) if n else None}
            for c, (m, n) in acc.items()]
    rows.append({"slo_class": "(all)", "met": met, "measured": measured,
                 "attainment": round(met / measured, 6) if measured else None})
    return rows


def gpu(reports: list[dict[str, Any]], per_hour: Mapping[str, float | None], tiers: list[str]) -> list[dict[str, Any]]:
    def empty(t: str) -> dict[str, Any]:
        return {"tier": t, "requests": 0, "gpu_hours": 0.0, **{"measured_" + s: 0 for s in GPU_SOURCES}}
    acc = {t: empty(t) for t in tiers}
    for rep in reports:
        for row in rep["data"]:
            a = acc.setdefault(row["tier"], empty(row["tier"]))
            a["requests"] += row["requests"]
            a["gpu_hours"] = round(a["gpu_hours"] + row["gpu_hours"], 9)
            for s in GPU_SOURCES:
                a["measured_" + s] += row.get("gpu_source_requests", {}).get(s, 0)
    for a in acc.values():
        price = per_hour.get(a["tier"])
        a["gpu_cost_per_hour"] = price
        a["gpu_cost_usd"] = None if price is None else _r(a["gpu_hours"] * price)
    return list(acc.values())


def _used(spent: float | None, limit: float | None) -> float | None:
    return None if spent is None or not limit else round(spent / limit, 6)


def budgets(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rep in reports:
        b = rep["budget"]
        on = bool(b.get("available"))
        today = _r(b.get("spent_today_usd", 0.0) + b.get("reserved_today_usd", 0.0)) if on else None
        month = _r(b.get("spent_month_usd", 0.0) + b.get("reserved_month_usd", 0.0)) if on else None
        du, mu = _used(today, b.get("daily_usd")), _used(month, b.get("monthly_usd"))
        worst = max((u for u in (du, mu) if u is not None), default=None)
        state = ("no budget" if b.get("daily_usd") is None and b.get("monthly_usd") is None
                 else "unknown" if worst is None else "over" if worst >= 1 else "near" if worst >= 0.8 else "ok")
        rows.append({"tenant": rep["tenant"], "state": state, "daily_usd": b.get("daily_usd"), "today_usd": today,
                     "today_used": du, "monthly_usd": b.get("monthly_usd"), "month_usd": month, "month_used": mu,
                     "used": worst, "spend_usd": rep["totals"]["cost_usd"]})
    return rows


def sort_budgets(rows: list[dict[str, Any]], key: str, descending: bool) -> list[dict[str, Any]]:
    """Sorted by `key` (BUDGET_SORTS); tenants without the figure come last either way."""
    field = {"tenant": "tenant", "today": "today_used", "month": "month_used", "used": "used",
             "spend": "spend_usd"}[key]
    have = [r for r in rows if r[field] is not None]
    return sorted(have, key=lambda r: (r[field], r["tenant"]), reverse=descending) + \
        sorted((r for r in rows if r[field] is None), key=lambda r: r["tenant"])


def views(reports: list[dict[str, Any]], *, classes: list[str], tiers: list[str],
          per_hour: Mapping[str, float | None]) -> dict[str, list[dict[str, Any]]]:
    return {"daily_tenant": daily(reports, "tenant"), "daily_tier": daily(reports, "tier"), "top": top(reports),
            "savings": savings(reports), "slo": slo(reports, classes), "gpu": gpu(reports, per_hour, tiers),
            "budgets": budgets(reports)}


def to_csv(rows: list[dict[str, Any]]) -> str:
    """One view as CSV: its flat fields (nested ones, like `top`'s `by_tier`, are left to the JSON)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    fields = [k for k, v in rows[0].items() if not isinstance(v, dict)] if rows else []
    w.writerow(fields)
    for r in rows:
        w.writerow([cell(r[f]) for f in fields])
    return buf.getvalue()
