"""The cost dashboard: server-rendered HTML (Jinja2, autoescaped) with SVG charts drawn here.

No script runs in the page; the CSP allows only our own stylesheet. Charts:
spend per day by tier (stacked bars), budget burn-down for the month (cumulative spend
against the budget line), and tokens by tier split into uncached, cached and completion.
Savings cards compare the real cost with the baseline tier alone and with no cache hits.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import jinja2
from markupsafe import Markup, escape

CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
PALETTE = ["#4f7cff", "#22b07d", "#f29d38", "#c353d6", "#e5534b", "#2bb3c0"]

CSS = """
:root{--bg:#0f1320;--card:#181d2e;--ink:#e8ebf5;--mute:#8d95ad;--line:#2a3148;--accent:#4f7cff}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;
background:var(--bg);color:var(--ink)}header{padding:20px 28px;border-bottom:1px solid var(--line);display:flex;
align-items:baseline;gap:16px}h1{font-size:20px;margin:0}h2{font-size:15px;margin:0 0 10px;color:var(--mute);
font-weight:600}.sub{color:var(--mute)}main{padding:20px 28px;display:grid;gap:18px;
grid-template-columns:repeat(auto-fit,minmax(420px,1fr))}.card{background:var(--card);border:1px solid var(--line);
border-radius:12px;padding:16px 18px}.wide{grid-column:1/-1}.kpis{display:grid;gap:12px;
grid-template-columns:repeat(auto-fit,minmax(170px,1fr))}.kpi{background:var(--card);border:1px solid var(--line);
border-radius:12px;padding:14px 16px}.kpi b{display:block;font-size:22px;margin-top:4px}.kpi span{color:var(--mute);
font-size:12px}.good{color:#3ccf91}.warn{color:#f2b13c}.bad{color:#ff6b6b}svg{width:100%;height:auto;display:block}
svg text{fill:var(--mute);font-size:11px}svg .grid{stroke:var(--line)}svg .budget{stroke:#ff6b6b;stroke-dasharray:6 4;
stroke-width:2}svg .spend{stroke:var(--accent);stroke-width:2.5;fill:none}svg .area{fill:rgba(79,124,255,.15)}
.legend{display:flex;gap:14px;flex-wrap:wrap;margin-top:8px;color:var(--mute);font-size:12px}.sw{display:inline-block;
width:10px;height:10px;border-radius:2px;margin-right:5px;vertical-align:-1px}table{width:100%;border-collapse:collapse}
td,th{text-align:left;padding:7px 8px;border-bottom:1px solid var(--line)}th{color:var(--mute);font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}a{color:var(--accent)}.empty{color:var(--mute);padding:30px;
text-align:center}.c0{background:#4f7cff}.c1{background:#22b07d}.c2{background:#f29d38}.c3{background:#c353d6}
.c4{background:#e5534b}.c5{background:#2bb3c0}
"""

FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
           b'fill="#4f7cff"/><path d="M3 11h3V7H3zm4 0h3V4H7zm4 0h2V9h-2z" fill="#fff"/></svg>')

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>tiergate · {{ title }}</title><link rel="stylesheet" href="/dashboard.css">
<link rel="icon" href="/favicon.svg" type="image/svg+xml"></head>
<body><header><h1>tiergate cost dashboard</h1><span class="sub">{{ title }} · last {{ days }} days · UTC</span>
{% if admin %}<span class="sub"><a href="/dashboard">all tenants</a></span>{% endif %}</header>
<main>
{% if tenants is not none %}
<section class="card wide"><h2>Tenants</h2><table><tr><th>tenant</th><th class="n">requests</th>
<th class="n">tokens</th><th class="n">spend (USD)</th><th class="n">today / daily budget</th>
<th class="n">month / monthly budget</th></tr>
{% for t in tenants %}<tr><td><a href="/dashboard?tenant={{ t.name | urlencode }}">{{ t.name }}</a></td>
<td class="n">{{ t.requests }}</td><td class="n">{{ t.tokens }}</td><td class="n">{{ t.cost }}</td>
<td class="n">{{ t.today }}</td><td class="n">{{ t.month }}</td></tr>{% endfor %}
</table></section>
{% endif %}
{% if rep is not none %}
<section class="kpis wide">
<div class="kpi"><span>spend</span><b>${{ k.cost }}</b></div>
<div class="kpi"><span>on {{ baseline }} alone</span><b>${{ k.base }}</b>
<span class="good">saved {{ k.saved_pct }}</span></div>
<div class="kpi"><span>with no cache hits</span><b>${{ k.nocache }}</b>
<span class="good">cache saved {{ k.cache_pct }}</span></div>
<div class="kpi"><span>requests</span><b>{{ k.requests }}</b><span>SLO met {{ k.slo }}</span></div>
<div class="kpi"><span>today's budget used</span><b class="{{ k.day_class }}">{{ k.day_used }}</b>
<span>{{ k.day_left }}</span></div>
<div class="kpi"><span>month budget used</span><b class="{{ k.budget_class }}">{{ k.budget_used }}</b>
<span>{{ k.budget_left }}</span></div>
</section>
<section class="card"><h2>Spend per day by tier (USD)</h2>{{ spend_svg }}{{ legend }}</section>
<section class="card"><h2>Budget burn-down, {{ month }}</h2>{{ burn_svg }}</section>
<section class="card wide"><h2>Tokens by tier and cache hits</h2>{{ tokens_svg }}
<div class="legend"><span><i class="sw c0"></i>uncached prompt</span><span><i class="sw c1"></i>cached prompt</span>
<span><i class="sw c2"></i>completion</span></div></section>
{% endif %}
</main></body></html>
"""

_env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
_page = _env.from_string(_TEMPLATE)


def _esc(s: str) -> str:
    return str(escape(s))


def _money(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:,.2f}" if x >= 100 else (f"{x:,.4f}" if x >= 0.01 else f"{x:.3g}")


def _nice_max(v: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at or above v: a round top for an axis."""
    if v <= 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(v))
    return next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if v <= m * mag * (1 + 1e-12))


def spend_chart(days: list[str], tiers: list[str], cost: dict[tuple[str, str], float]) -> str:
    w, h, left, bottom = 640, 240, 56, 26
    top = max((sum(cost.get((d, t), 0.0) for t in tiers) for d in days), default=0.0)
    ymax = _nice_max(top)
    bw = (w - left - 10) / max(len(days), 1)
    parts = [f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="spend per day by tier">']
    for i in range(5):
        y = 10 + (h - bottom - 10) * i / 4
        parts.append(f'<line class="grid" x1="{left}" x2="{w - 6}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_money(ymax * (4 - i) / 4)}</text>')
    for di, d in enumerate(days):
        x = left + di * bw + bw * 0.15
        y = h - bottom
        for ti, t in enumerate(tiers):
            v = cost.get((d, t), 0.0)
            if v <= 0:
                continue
            bh = (h - bottom - 10) * v / ymax
            y -= bh
            parts.append(f'<rect class="bar" data-value="{v:.8f}" x="{x:.1f}" y="{y:.1f}" width="{bw * 0.7:.1f}" '
                         f'height="{bh:.1f}" rx="2" fill="{PALETTE[ti % len(PALETTE)]}"><title>{_esc(d)} '
                         f'{_esc(t)}: ${v:.6f}</title></rect>')
        if len(days) <= 16 or di % 2 == 0:
            parts.append(f'<text x="{x + bw * 0.35:.1f}" y="{h - 8}" text-anchor="middle">{_esc(d[5:])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def burn_chart(month_days: list[str], spent: dict[str, float], budget: float | None) -> str:
    w, h, left, bottom = 640, 240, 56, 26
    cum, total = [], 0.0
    for d in month_days:
        total += spent.get(d, 0.0)
        cum.append(total)
    ymax = _nice_max(max(total, budget or 0.0))
    n = max(len(month_days) - 1, 1)

    def xy(i: int, v: float) -> str:
        return f"{left + (w - left - 10) * i / n:.1f},{h - bottom - (h - bottom - 10) * v / ymax:.1f}"

    parts = [f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="budget burn-down">']
    for i in range(5):
        y = 10 + (h - bottom - 10) * i / 4
        parts.append(f'<line class="grid" x1="{left}" x2="{w - 6}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_money(ymax * (4 - i) / 4)}</text>')
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    upto = [i for i, d in enumerate(month_days) if d <= today]
    if upto:
        pts = " ".join(xy(i, cum[i]) for i in upto)
        parts.append(f'<polygon class="area" points="{xy(upto[0], 0)} {pts} {xy(upto[-1], 0)}"/>'
                     f'<polyline class="spend" data-total="{total:.8f}" points="{pts}"/>')
    if budget is not None:
        y = h - bottom - (h - bottom - 10) * budget / ymax
        parts.append(f'<line class="budget" x1="{left}" x2="{w - 10}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text x="{w - 12}" y="{y - 6:.1f}" text-anchor="end">budget ${_money(budget)}</text>')
    for i in range(0, len(month_days), 5):
        parts.append(f'<text x="{xy(i, 0).split(",")[0]}" y="{h - 8}" text-anchor="middle">'
                     f'{_esc(month_days[i][8:])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def tokens_chart(rows: dict[str, tuple[int, int, int]]) -> str:
    w, bar, gap, left = 900, 26, 14, 110
    h = max(len(rows), 1) * (bar + gap) + 10
    top = max((sum(v) for v in rows.values()), default=0) or 1
    parts = [f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="tokens by tier">']
    for i, (tier, vals) in enumerate(sorted(rows.items())):
        y = 5 + i * (bar + gap)
        x = float(left)
        parts.append(f'<text x="{left - 8}" y="{y + bar / 2 + 4:.1f}" text-anchor="end">{_esc(tier)}</text>')
        for j, v in enumerate(vals):
            bw = (w - left - 90) * v / top
            if bw > 0:
                parts.append(f'<rect class="bar" data-value="{v}" x="{x:.1f}" y="{y}" width="{bw:.1f}" height="{bar}" '
                             f'fill="{PALETTE[j]}"><title>{_esc(tier)}: {v:,} tokens</title></rect>')
            x += bw
        parts.append(f'<text x="{x + 6:.1f}" y="{y + bar / 2 + 4:.1f}">{sum(vals):,}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _pct(part: float, whole: float) -> str:
    return f"{part / whole * 100:.1f}%" if whole > 0 else "n/a"


def render(*, title: str, rep: dict[str, Any] | None, tenants: list[dict[str, Any]] | None, days: int,
           baseline: str, admin: bool, today: dt.date) -> str:
    ctx: dict[str, Any] = {"title": title, "rep": rep, "tenants": tenants, "days": days, "baseline": baseline,
                           "admin": admin, "month": today.strftime("%B %Y")}
    if rep is not None:
        day_list = [(today - dt.timedelta(days=days - 1 - i)).isoformat() for i in range(days)]
        tiers = sorted({r["tier"] for r in rep["data"]})
        cost = {(r["date"], r["tier"]): r["cost_usd"] for r in rep["data"]}
        first = today.replace(day=1)
        nxt = (first + dt.timedelta(days=32)).replace(day=1)
        month_days = [(first + dt.timedelta(days=i)).isoformat() for i in range((nxt - first).days)]
        spent: dict[str, float] = {}
        tok: dict[str, list[int]] = {}
        for r in rep["data"]:
            spent[r["date"]] = spent.get(r["date"], 0.0) + r["cost_usd"]
            t = tok.setdefault(r["tier"], [0, 0, 0])
            t[0] += r["prompt_tokens"] - r["cached_tokens"]
            t[1] += r["cached_tokens"]
            t[2] += r["completion_tokens"]
        tt = rep["totals"]
        b = rep["budget"]
        monthly = b.get("monthly_usd")
        used = (b.get("spent_month_usd", 0.0) + b.get("reserved_month_usd", 0.0)) if b.get("available") else None
        frac = used / monthly if used is not None and monthly else None
        daily = b.get("daily_usd")
        dused = (b.get("spent_today_usd", 0.0) + b.get("reserved_today_usd", 0.0)) if b.get("available") else None
        dfrac = dused / daily if dused is not None and daily else None
        slo_n = sum(r["slo_measured"] for r in rep["data"])
        ctx["k"] = {
            "cost": _money(tt["cost_usd"]), "base": _money(tt["baseline_cost_usd"]),
            "nocache": _money(tt["no_cache_cost_usd"]), "requests": f"{tt['requests']:,}",
            "saved_pct": _pct(tt["baseline_cost_usd"] - tt["cost_usd"], tt["baseline_cost_usd"]),
            "cache_pct": _pct(tt["no_cache_cost_usd"] - tt["cost_usd"], tt["no_cache_cost_usd"]),
            "slo": _pct(sum(r["slo_met"] for r in rep["data"]), slo_n),
            "budget_used": "no budget" if frac is None else _share(frac),
            "budget_class": "good" if frac is None or frac < 0.8 else ("warn" if frac < 1 else "bad"),
            "budget_left": "" if frac is None or monthly is None
            else f"${_money(max(0.0, monthly - (used or 0)))} left",
            "day_used": "no budget" if dfrac is None else _share(dfrac),
            "day_class": "good" if dfrac is None or dfrac < 0.8 else ("warn" if dfrac < 1 else "bad"),
            "day_left": "" if dfrac is None or daily is None else f"${_money(max(0.0, daily - (dused or 0)))} left"}
        ctx["spend_svg"] = Markup(spend_chart(day_list, tiers, cost))
        ctx["legend"] = Markup(
            '<div class="legend">' + "".join(f'<span><i class="sw c{i % len(PALETTE)}"></i>{_esc(t)}</span>'
                                             for i, t in enumerate(tiers)) + "</div>")
        ctx["burn_svg"] = Markup(burn_chart(month_days, spent, monthly))
        ctx["tokens_svg"] = Markup(
            tokens_chart({t: (v[0], v[1], v[2]) for t, v in tok.items()}))
    return _page.render(**ctx)


def _share(frac: float) -> str:
    return "<0.1%" if 0 < frac < 0.001 else f"{frac * 100:.1f}%"
