"""The admin's fleet page: every view of router/dashboard/fleet.py as charts and tables, with JSON/CSV links."""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import urlencode

from markupsafe import Markup

from router.dashboard import charts, fleet, fmt
from router.dashboard.pages import TEMPLATES, key, legend, render

TOP_N = 10

_FLEET = """{% extends "shell" %}{% block body %}
<section class="kpis full">
<div class="kpi"><span>fleet spend</span><b>{{ k.cost }}</b>
<span>{{ k.requests }} requests, {{ k.tenants }} tenants</span></div>
<div class="kpi"><span>saved against {{ baseline }} alone</span><b>{{ k.saved }}</b>
<span>on {{ k.base_n }} requests it could serve</span><span>no alternative: {{ k.base_na }} requests</span></div>
<div class="kpi"><span>saved by cache hits</span><b>{{ k.cache }}</b>
<span>{{ k.cache_pct }} of spend without them</span></div>
<div class="kpi"><span>SLO met, all classes</span><b>{{ k.slo }}</b><span>of {{ k.slo_n }} measured</span></div>
<div class="kpi"><span>GPU time</span><b>{{ k.gpu }}</b><span>{{ k.gpu_cost }}</span></div>
</section>
<section class="card"><h2>Spend per day by tier</h2>{{ tier_svg }}{{ legend }}{{ links.daily_tier }}</section>
<section class="card"><h2>Top tenants by spend</h2>{{ top_svg }}{{ legend }}{{ links.top }}</section>
<section class="card full"><h2>Spend per day by tenant</h2><table class="stack"><thead><tr><th>tenant</th>
<th>per day</th><th class="n">spend</th><th class="n">requests</th></tr></thead><tbody>
{% for r in by_tenant %}<tr><td data-label="tenant">
<a href="/dashboard?tenant={{ r.name | urlencode }}">{{ r.name }}</a></td>
<td data-label="per day">{{ r.spark }}</td><td class="n" data-label="spend">{{ r.cost }}</td>
<td class="n" data-label="requests">{{ r.requests }}</td></tr>{% endfor %}</tbody></table>
{% if more %}<p class="note">{{ more }} more tenants in the CSV.</p>{% endif %}{{ links.daily_tenant }}</section>
<section class="card full"><h2>Savings by tenant</h2><p class="note">Against {{ baseline }}: only requests
{{ baseline }} could have served (its context fits, the tenant may use it). "No alternative": requests it could
not have served, never priced. "Not compared": hours recorded before the ledger counted which requests the
baseline could serve.</p><table class="stack"><thead><tr><th>tenant</th><th class="n">compared</th>
<th class="n">on {{ baseline }}</th><th class="n">actual</th><th class="n">saved</th>
<th class="n">no alternative</th><th class="n">not compared</th><th class="n">saved by cache</th></tr></thead><tbody>
{% for r in savings %}<tr><td data-label="tenant">{{ r.tenant }}</td><td class="n" data-label="compared">{{ r.n }}</td>
<td class="n" data-label="on {{ baseline }}">{{ r.base }}</td><td class="n" data-label="actual">{{ r.actual }}</td>
<td class="n" data-label="saved">{{ r.saved }}</td><td class="n" data-label="no alternative">{{ r.na }}</td>
<td class="n" data-label="not compared">{{ r.nc }}</td>
<td class="n" data-label="saved by cache">{{ r.cache }}</td></tr>{% endfor %}</tbody></table>
{{ links.savings }}</section>
<section class="card"><h2>SLO attainment by class</h2><table class="stack"><thead><tr><th>class</th>
<th class="n">met</th><th class="n">measured</th><th class="n">attainment</th></tr></thead><tbody>
{% for r in slo %}<tr><td data-label="class">{{ r.name }}</td><td class="n" data-label="met">{{ r.met }}</td>
<td class="n" data-label="measured">{{ r.n }}</td><td class="n" data-label="attainment">{{ r.pct }}</td></tr>
{% endfor %}</tbody></table>{{ links.slo }}</section>
<section class="card"><h2>GPU-hours by tier</h2>{{ gpu_svg }}<table class="stack"><thead><tr><th>tier</th>
<th class="n">GPU-hours</th><th class="n">GPU cost</th><th class="n">measured by</th></tr></thead><tbody>
{% for r in gpu %}<tr><td data-label="tier"><span>{{ r.key }} {{ r.tier }}</span></td>
<td class="n" data-label="GPU-hours">{{ r.h }}</td>
<td class="n" data-label="GPU cost">{{ r.cost }}</td>
<td class="n" data-label="measured by">{{ r.src }}</td></tr>{% endfor %}</tbody></table>{{ links.gpu }}</section>
<section class="card full" id="budgets"><h2>Budgets</h2><table class="stack"><thead><tr>
{% for h in budget_heads %}<th{% if h.n %} class="n"{% endif %}>{% if h.href %}<a href="{{ h.href }}">{{ h.label }}</a>
{% else %}{{ h.label }}{% endif %}</th>{% endfor %}</tr></thead><tbody>
{% for r in budgets %}<tr><td data-label="tenant">
<a href="/dashboard?tenant={{ r.tenant | urlencode }}">{{ r.tenant }}</a></td>
<td data-label="state" class="{{ r.cls }}">{{ r.state }}</td><td class="n" data-label="today">{{ r.today }}</td>
<td class="n" data-label="month">{{ r.month }}</td><td class="n" data-label="spend">{{ r.spend }}</td></tr>
{% endfor %}</tbody></table>{{ links.budgets }}</section>
{% endblock %}"""

TEMPLATES["fleet"] = _FLEET

_HEADS = (("tenant", "tenant", False), ("state", "used", False), ("today / daily budget", "today", True),
          ("month / monthly budget", "month", True), ("spend", "spend", True))


def links(days: int) -> dict[str, Markup]:
    def one(view: str) -> Markup:
        q = {"view": view, "days": days}
        return Markup('<p class="note">This view as <a href="/dashboard/admin?{j}">JSON</a> · '
                      '<a href="/dashboard/admin?{c}">CSV</a></p>').format(
            j=urlencode({**q, "format": "json"}), c=urlencode({**q, "format": "csv"}))
    return {v: one(v) for v in fleet.VIEWS}


def _of(spent: float | None, limit: float | None, used: float | None) -> str:
    if limit is None:
        return "no budget set" if spent is None else fmt.money(spent) + " (no budget)"
    if spent is None:
        return "unknown / " + fmt.money(limit)
    return f"{fmt.money(spent)} / {fmt.money(limit)} ({fmt.pct(used or 0.0, 1)})"


def _kpis(v: dict[str, list[dict[str, Any]]], reports: list[dict[str, Any]]) -> dict[str, Any]:
    s = fleet.savings_total(v["savings"])
    gpu_h = sum(r["gpu_hours"] for r in v["gpu"])
    priced = [r["gpu_cost_usd"] for r in v["gpu"] if r["gpu_cost_usd"] is not None]
    every = v["slo"][-1]
    return {"cost": fmt.money(s["cost_usd"]), "requests": fmt.count(s["requests"]), "tenants": len(reports),
            "saved": fmt.money(s["savings_vs_baseline_usd"]), "base_n": fmt.count(s["baseline_requests"]),
            "base_na": fmt.count(s["no_alternative_requests"]), "cache": fmt.money(s["savings_from_cache_usd"]),
            "cache_pct": fmt.pct(s["savings_from_cache_usd"], s["no_cache_cost_usd"]),
            "slo": fmt.pct(every["met"], every["measured"]), "slo_n": fmt.count(every["measured"]),
            "gpu": fmt.hours(gpu_h), "gpu_cost": (fmt.money(sum(priced)) + " where tiers have a GPU price")
            if priced else "no tier has a GPU price"}


def _sources(r: dict[str, Any]) -> str:
    """How the tier's GPU time was measured: request counts by source (the engine, the simulator, throughput)."""
    parts = [f"{s} {fmt.count(r['measured_' + s])}" for s in ("engine", "sim", "throughput") if r["measured_" + s]]
    return " · ".join(parts) or "not measured"


def _saving(r: dict[str, Any]) -> dict[str, str]:
    return {"tenant": r["tenant"], "n": fmt.count(r["baseline_requests"]), "base": fmt.money(r["baseline_cost_usd"]),
            "actual": fmt.money(r["baseline_actual_cost_usd"]), "saved": fmt.signed_money(r["savings_vs_baseline_usd"]),
            "na": fmt.count(r["no_alternative_requests"]), "nc": fmt.count(r["not_compared_requests"]),
            "cache": fmt.money(r["savings_from_cache_usd"])}


def _budget_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cls = {"over": "bad", "near": "warn"}
    return [{"tenant": r["tenant"], "state": r["state"], "cls": cls.get(r["state"], ""),
             "today": _of(r["today_usd"], r["daily_usd"], r["today_used"]),
             "month": _of(r["month_usd"], r["monthly_usd"], r["month_used"]), "spend": fmt.money(r["spend_usd"])}
            for r in rows]


def _heads(sort: str, desc: bool, days: int) -> list[dict[str, Any]]:
    out = []
    for label, k, n in _HEADS:
        d = "asc" if (k == sort and desc) or (k != sort and k == "tenant") else "desc"
        mark = (" \u25bc" if desc else " \u25b2") if k == sort else ""
        out.append({"label": label + mark, "n": n, "href": "/dashboard/admin?" + urlencode(
            {"sort": k, "dir": d, "days": days}) + "#budgets"})
    return out


def fleet_page(v: dict[str, list[dict[str, Any]]], reports: list[dict[str, Any]], *, colours: dict[str, str],
               baseline: str, today: dt.date, days: int, sort: str, desc: bool, **shell: Any) -> str:
    day_list = [(today - dt.timedelta(days=days - 1 - i)).isoformat() for i in range(days)]
    shown = [t for t in colours if any(r["tier"] == t for r in v["daily_tier"])]
    shown += sorted({r["tier"] for r in v["daily_tier"]} - set(colours))
    col = {**{t: "#7f7f7f" for t in shown}, **colours}
    tier_cost = {(r["date"], r["tier"]): r["cost_usd"] for r in v["daily_tier"]}
    per_day: dict[str, dict[str, float]] = {}
    for r in v["daily_tenant"]:
        per_day.setdefault(r["tenant"], {})[r["date"]] = r["cost_usd"]
    tops = v["top"][:TOP_N]
    top_bars = [charts.HBar(r["tenant"], [charts.Segment(r["by_tier"].get(t, 0.0), col[t], f"{r['tenant']} on {t}: "
                                                         f"{fmt.money(r['by_tier'].get(t, 0.0))}") for t in shown],
                            fmt.money(r["cost_usd"])) for r in tops if r["cost_usd"] > 0]
    gpu_bars = [charts.HBar(r["tier"], [charts.Segment(r["gpu_hours"], col.get(r["tier"], "#7f7f7f"), r["tier"])],
                            fmt.hours(r["gpu_hours"])) for r in v["gpu"]]
    return render(
        "fleet", **shell, days=days, baseline=baseline, k=_kpis(v, reports), legend=legend(col, shown),
        links=links(days),
        tier_svg=charts.both(charts.stacked_days(day_list, [(t, col[t]) for t in shown], tier_cost,
                                                 "spend per day by tier")),
        top_svg=charts.both(charts.hbars(top_bars, "top tenants by spend")) if top_bars
        else Markup('<p class="empty">no spend in this period</p>'),
        by_tenant=[{"name": r["tenant"], "cost": fmt.money(r["cost_usd"]), "requests": fmt.count(r["requests"]),
                    "spark": charts.spark([per_day.get(r["tenant"], {}).get(d, 0.0) for d in day_list],
                                          f"{r['tenant']} spend per day")} for r in tops],
        more=max(0, len(v["top"]) - TOP_N),
        savings=[_saving(r) for r in v["savings"]],
        slo=[{"name": r["slo_class"], "met": fmt.count(r["met"]), "n": fmt.count(r["measured"]),
              "pct": fmt.pct(r["met"], r["measured"])} for r in v["slo"]],
        gpu_svg=charts.both(charts.hbars(gpu_bars, "GPU-hours by tier")),
        gpu=[{"tier": r["tier"], "key": key(col.get(r["tier"], "#7f7f7f")), "h": fmt.hours(r["gpu_hours"]),
              "cost": "no GPU price" if r["gpu_cost_usd"] is None else fmt.money(r["gpu_cost_usd"]),
              "src": _sources(r)} for r in v["gpu"]],
        budget_heads=_heads(sort, desc, days),
        budgets=_budget_rows(fleet.sort_budgets(v["budgets"], sort, desc)))
