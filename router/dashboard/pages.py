"""The page shell, the sign-in page and one tenant's page (server-rendered, autoescaped Jinja2, no script)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import jinja2
from markupsafe import Markup

from router.dashboard import charts, fmt

_SHELL = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>tiergate · {{ title }}</title><link rel="stylesheet" href="/dashboard.css">
<link rel="icon" href="/favicon.svg" type="image/svg+xml"></head>
<body><header><h1>tiergate costs</h1><span class="sub">{{ title }}{% if days %} · last {{ days }} days · UTC{% endif %}
</span>{% if who %}<nav>{% if admin %}<a href="/dashboard/admin">fleet</a>{% endif %}
<span class="sub">signed in as {{ who }}</span>
{% if session %}<form method="post" action="/dashboard/logout"><button type="submit">Sign out</button></form>{% endif %}
</nav>{% endif %}</header>
<main>{% block body %}{% endblock %}</main></body></html>
"""

_LOGIN = """{% extends "shell" %}{% block body %}
<section class="card full"><h2>Sign in</h2>
<form class="login" method="post" action="/dashboard/login">
<label for="key">API key (a tenant key shows that tenant; the admin key shows the fleet)</label>
<input id="key" name="key" type="password" autocomplete="off" required>
{% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
<button class="primary" type="submit">Sign in</button></form>
<p class="note">The key is exchanged for a session cookie (HttpOnly, SameSite=Lax) that expires after
{{ expiry }}; the key itself is not kept in the browser.</p></section>
{% endblock %}"""

_TENANT = """{% extends "shell" %}{% block body %}
<section class="kpis full">
<div class="kpi"><span>spend</span><b>{{ k.cost }}</b><span>{{ k.requests }} requests</span></div>
<div class="kpi"><span>against {{ baseline }} alone</span>
{% if k.base_n %}<b>{{ k.saved }}</b><span>{{ k.saved_what }} on {{ k.base_n }} requests {{ baseline }} could
serve ({{ k.base }} there, {{ k.base_cost }} here)</span>{% else %}<b class="plain">no comparison</b>{% endif %}
<span>no alternative: {{ k.base_na }} requests</span>{% if k.not_compared %}
<span>not compared (recorded before eligibility was tracked): {{ k.not_compared }}</span>{% endif %}</div>
<div class="kpi"><span>saved by cache hits</span><b>{{ k.cache_saved }}</b>
<span>{{ k.cache_pct }} of {{ k.nocache }} without them</span></div>
<div class="kpi"><span>SLO met</span><b>{{ k.slo }}</b><span>of {{ k.slo_n }} measured</span></div>
{% for b in budgets %}<div class="kpi"><span>{{ b.label }}</span>
{% if b.used is none %}<b class="plain">no budget set</b>{% else %}<b class="{{ b.cls }}">{{ b.used }}</b>
<span>{{ b.left }} left of {{ b.limit }}</span>{% endif %}</div>{% endfor %}
{% if k.gpu %}<div class="kpi"><span>GPU time</span><b>{{ k.gpu }}</b><span>{{ k.gpu_cost }}</span></div>{% endif %}
</section>
<section class="card"><h2>Spend per day by tier</h2>{{ spend_svg }}{{ legend }}</section>
<section class="card"><h2>Budget burn-down, {{ month }}</h2>{{ burn_svg }}
<div class="legend"><span><i class="solid"></i>spend so far</span>{% if monthly %}<span><i class="dash"></i>monthly
budget {{ monthly }}</span>{% else %}<span>no monthly budget set</span>{% endif %}</div></section>
<section class="card full"><h2>Tokens by tier and cache hits</h2>{{ tokens_svg }}
<div class="legend"><span>{{ key_full }} uncached prompt</span><span>{{ key_half }} cached prompt</span>
<span>{{ key_line }} completion</span></div>
<table class="stack"><thead><tr><th>tier</th><th class="n">requests</th><th class="n">prompt</th>
<th class="n">cached</th><th class="n">completion</th><th class="n">spend</th></tr></thead><tbody>
{% for r in tiers %}<tr><td data-label="tier"><span>{{ r.key }} {{ r.name }}</span></td>
<td class="n" data-label="requests">{{ r.requests }}</td><td class="n" data-label="prompt">{{ r.prompt }}</td>
<td class="n" data-label="cached">{{ r.cached }}</td><td class="n" data-label="completion">{{ r.completion }}</td>
<td class="n" data-label="spend">{{ r.cost }}</td></tr>{% endfor %}</tbody></table></section>
{% endblock %}"""

_MESSAGE = """{% extends "shell" %}{% block body %}<section class="card full"><p>{{ message }}</p>
<p><a href="/dashboard">your dashboard</a></p></section>{% endblock %}"""

# router/dashboard/fleet_page.py adds its own
TEMPLATES = {"shell": _SHELL, "login": _LOGIN, "tenant": _TENANT, "message": _MESSAGE}
_env = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES),
                          autoescape=True, undefined=jinja2.StrictUndefined)


def render(template: str, **ctx: Any) -> str:
    base = {"who": "", "admin": False, "session": False, "days": 0}
    return _env.get_template(template).render(**{**base, **ctx})


def login_page(error: str = "", expiry_s: int = 8 * 3600) -> str:
    h = expiry_s / 3600
    expiry = f"{h:g} hours" if h >= 1 else f"{expiry_s // 60} minutes"
    return render("login", title="sign in", error=error, expiry=expiry)


def _budget(label: str, used: float | None, limit: float | None) -> dict[str, Any]:
    if used is None or not limit:
        return {"label": label, "used": None}
    frac = used / limit
    return {"label": label, "used": fmt.pct(used, limit), "left": fmt.money(max(0.0, limit - used)),
            "limit": fmt.money(limit), "cls": "" if frac < 0.8 else ("warn" if frac < 1 else "bad")}


def budgets(b: dict[str, Any]) -> list[dict[str, Any]]:
    """Today's and the month's budget use (spent + reserved), or "no budget set"."""
    on = bool(b.get("available"))
    day = b.get("spent_today_usd", 0.0) + b.get("reserved_today_usd", 0.0) if on else None
    month = b.get("spent_month_usd", 0.0) + b.get("reserved_month_usd", 0.0) if on else None
    return [_budget("today's budget used", day, b.get("daily_usd")),
            _budget("month's budget used", month, b.get("monthly_usd"))]


def kpis(t: dict[str, Any]) -> dict[str, Any]:
    saving = t["baseline_cost_usd"] - t["baseline_actual_cost_usd"]
    gpu = t.get("gpu_hours", 0.0)
    return {"cost": fmt.money(t["cost_usd"]), "requests": fmt.count(t["requests"]),
            "base_n": fmt.count(t["baseline_requests"]) if t["baseline_requests"] else "",
            "base": fmt.money(t["baseline_cost_usd"]), "base_cost": fmt.money(t["baseline_actual_cost_usd"]),
            "saved": fmt.money(abs(saving)),
            "saved_what": ("saved" if saving >= 0 else "cost more")
            + f" ({fmt.pct(abs(saving), t['baseline_cost_usd'])})",
            "base_na": fmt.count(t["no_alternative_requests"]), "not_compared": t["not_compared_requests"],
            "cache_saved": fmt.money(t["savings_from_cache_usd"]), "nocache": fmt.money(t["no_cache_cost_usd"]),
            "cache_pct": fmt.pct(t["savings_from_cache_usd"], t["no_cache_cost_usd"]),
            "slo": fmt.pct(t["slo_met"], t["slo_measured"]), "slo_n": fmt.count(t["slo_measured"]),
            "gpu": fmt.hours(gpu) if gpu else "",
            "gpu_cost": "" if t.get("gpu_cost_usd") is None else fmt.money(t["gpu_cost_usd"]) + " at tier GPU prices"}


def key(colour: str, opacity: float = 1.0) -> Markup:
    """A legend swatch (an SVG: the CSP allows no inline style)."""
    return Markup(f'<svg class="key" viewBox="0 0 12 12" width="12" height="12" aria-hidden="true"><rect x=".5" '
                  f'y=".5" width="11" height="11" rx="2" fill="{colour}" fill-opacity="{opacity}" '
                  f'stroke="{colour}"/></svg>')


def legend(colours: dict[str, str], shown: list[str]) -> Markup:
    items = "".join(f"<span>{key(colours[t])} {Markup.escape(t)}</span>" for t in shown)
    return Markup(f'<div class="legend">{items}</div>')


def tenant_page(rep: dict[str, Any], *, colours: dict[str, str], today: dt.date, **shell: Any) -> str:
    days = rep["days"]
    day_list = [(today - dt.timedelta(days=days - 1 - i)).isoformat() for i in range(days)]
    shown = [t for t in colours if any(r["tier"] == t for r in rep["data"])]
    shown += sorted({r["tier"] for r in rep["data"]} - set(colours))        # tiers since removed from the policy
    col = {**{t: "#7f7f7f" for t in shown}, **colours}
    cost = {(r["date"], r["tier"]): r["cost_usd"] for r in rep["data"]}
    first = today.replace(day=1)
    month_days = [(first + dt.timedelta(days=i)).isoformat()
                  for i in range(((first + dt.timedelta(days=32)).replace(day=1) - first).days)]
    spent: dict[str, float] = {}
    tiers: dict[str, dict[str, int | float]] = {}
    for r in rep["data"]:
        spent[r["date"]] = spent.get(r["date"], 0.0) + r["cost_usd"]
        acc = tiers.setdefault(r["tier"], dict.fromkeys(("requests", "prompt", "cached", "completion", "cost"), 0))
        for k, f in (("requests", "requests"), ("prompt", "prompt_tokens"), ("cached", "cached_tokens"),
                     ("completion", "completion_tokens"), ("cost", "cost_usd")):
            acc[k] += r[f]
    bars = [charts.HBar(t, [charts.Segment(v["prompt"] - v["cached"], col[t], f"{t}: uncached prompt"),
                            charts.Segment(v["cached"], col[t], f"{t}: cached prompt", 0.5),
                            charts.Segment(v["completion"], col[t], f"{t}: completion", 0.0)],
                        fmt.tokens(int(v["prompt"] + v["completion"]))) for t, v in ((t, tiers[t]) for t in shown)]
    monthly = rep["budget"].get("monthly_usd")
    return render("tenant", **shell, days=days, baseline=rep.get("baseline_tier", ""), k=kpis(rep["totals"]),
                  budgets=budgets(rep["budget"]), month=today.strftime("%B %Y"),
                  monthly=fmt.money(monthly) if monthly else "",
                  spend_svg=charts.both(charts.stacked_days(day_list, [(t, col[t]) for t in shown], cost,
                                                            "spend per day by tier")),
                  legend=legend(col, shown),
                  burn_svg=charts.both(charts.burn(month_days, spent, monthly, today.isoformat())),
                  tokens_svg=charts.both(charts.hbars(bars, "tokens by tier")),
                  key_full=key("#5d6679"), key_half=key("#5d6679", 0.5), key_line=key("#5d6679", 0.0),
                  tiers=[{"name": t, "key": key(col[t]), "requests": fmt.count(int(v["requests"])),
                          "prompt": fmt.tokens(int(v["prompt"])), "cached": fmt.tokens(int(v["cached"])),
                          "completion": fmt.tokens(int(v["completion"])), "cost": fmt.money(float(v["cost"]))}
                         for t, v in ((t, tiers[t]) for t in shown)])
