"""The dashboard's look: one stylesheet (mobile first, no script), the colour of each tier, the icon.

Colours: the Okabe-Ito palette (distinguishable with the common colour-vision deficiencies). A tier keeps
one colour in every chart, given by its place in the policy's `tiers`; nothing else uses those colours
(totals, budgets and splits are drawn in ink, greys and dash patterns, and every series is labelled).

Layout: one column up to 999 px, two from 1000 px. Each chart comes in two sizes, a narrow one shown below
720 px and a wide one above, each drawn at the size it is shown (scale 1 to 1.35), so chart labels stay at
12 px or more on a 360 px phone as on a desktop, with no script.
"""

from __future__ import annotations

from collections.abc import Iterable

CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#000000")
INK, MUTE, LINE = "#1d2230", "#4f5a6e", "#d7dbe4"

NARROW, WIDE = 300, 440        # chart widths (CSS px at scale 1); see the module header
FONT = 12                      # chart label size, in chart units (= CSS px at scale 1)


def tier_colours(tiers: Iterable[str]) -> dict[str, str]:
    """Tier -> colour, by the tier's place in the policy (so it is the same on every page and chart)."""
    return {t: OKABE_ITO[i % len(OKABE_ITO)] for i, t in enumerate(tiers)}


CSS = f"""
:root{{--bg:#f5f6f9;--card:#fff;--ink:{INK};--mute:{MUTE};--line:{LINE};--link:#0b57a4;--bad:#a4200b;
--warn:#7a4b00}}
*{{box-sizing:border-box}}
html{{-webkit-text-size-adjust:100%;text-size-adjust:100%}}
body{{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);
color:var(--ink);overflow-wrap:anywhere}}
header{{padding:12px;border-bottom:1px solid var(--line);background:var(--card);display:flex;flex-wrap:wrap;
align-items:center;gap:6px 14px}}
h1{{font-size:18px;margin:0}}h2{{font-size:15px;margin:0 0 8px}}
.sub,.note{{color:var(--mute);font-size:13px}}
nav{{display:flex;flex-wrap:wrap;gap:4px 12px;align-items:center;font-size:14px}}
nav form{{margin:0}}
main{{padding:12px;display:grid;gap:14px;grid-template-columns:minmax(0,1fr);max-width:1180px;margin:0 auto}}
.card{{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px;min-width:0}}
.kpis{{display:grid;gap:10px;grid-template-columns:repeat(auto-fit,minmax(150px,1fr))}}
.kpi{{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 12px;min-width:0}}
.kpi b{{display:block;font-size:20px;margin:2px 0;font-variant-numeric:tabular-nums}}
.kpi span{{display:block;color:var(--mute);font-size:13px}}
.kpi .plain{{font-size:15px;font-weight:400;color:var(--mute)}}
.warn{{color:var(--warn)}}.bad{{color:var(--bad)}}
.chart svg{{display:block;width:100%;height:auto;margin:0 auto}}
.chart.n svg{{max-width:{round(NARROW * 1.35)}px}}.chart.w svg{{max-width:{round(WIDE * 1.35)}px}}
.chart.w{{display:none}}
svg text{{fill:{MUTE};font-size:{FONT}px}}svg .grid{{stroke:{LINE}}}
svg .budget{{stroke:{INK};stroke-dasharray:6 4;stroke-width:1.5}}
svg .spend{{stroke:{INK};stroke-width:2.5;fill:none}}svg .area{{fill:rgba(29,34,48,.08)}}
svg .ink{{fill:#5d6679}}
.legend{{display:flex;gap:4px 14px;flex-wrap:wrap;margin-top:8px;color:var(--mute);font-size:13px}}
.sw{{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:5px;vertical-align:-1px;
border:1px solid rgba(0,0,0,.25)}}
.dash{{display:inline-block;width:18px;border-top:2px dashed {INK};margin-right:5px;vertical-align:3px}}
.solid{{display:inline-block;width:18px;border-top:3px solid {INK};margin-right:5px;vertical-align:3px}}
table{{width:100%;border-collapse:collapse;font-size:14px}}
td,th{{text-align:left;padding:6px;border-bottom:1px solid var(--line)}}th{{color:var(--mute);font-weight:600}}
td.n,th.n{{text-align:right;font-variant-numeric:tabular-nums}}
a{{color:var(--link)}}.empty{{color:var(--mute);padding:20px;text-align:center}}
form.login{{display:grid;gap:10px;max-width:420px}}
input[type=password]{{font:inherit;padding:8px;border:1px solid var(--mute);border-radius:6px;width:100%}}
button{{font:inherit;padding:6px 12px;border-radius:6px;border:1px solid var(--mute);background:var(--card);
color:var(--ink);cursor:pointer}}
button.primary{{background:var(--ink);color:#fff;border-color:var(--ink)}}
.error{{color:var(--bad)}}
@media (max-width:719px){{
table.stack thead{{display:none}}
table.stack tr{{display:block;border-bottom:1px solid var(--line);padding:6px 0}}
table.stack td{{display:flex;justify-content:space-between;gap:12px;border:0;padding:2px 0;text-align:right}}
table.stack td::before{{content:attr(data-label);color:var(--mute);text-align:left}}
}}
@media (min-width:720px){{
header,main{{padding:16px 20px}}.chart.n{{display:none}}.chart.w{{display:block}}
}}
@media (min-width:1000px){{main{{grid-template-columns:repeat(2,minmax(0,1fr))}}.full{{grid-column:1/-1}}}}
"""

FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
           b'fill="#1d2230"/><path d="M3 11h3V7H3zm4 0h3V4H7zm4 0h2V9h-2z" fill="#fff"/></svg>')
