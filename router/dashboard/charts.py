"""SVG charts drawn on the server (no script): each in a narrow and a wide size (see style.py).

Every chart labels its axes at one precision (fmt.axis_*), colours tiers with their fixed colour and
draws everything else in ink. Bars carry `data-value` (the exact figure) and a <title> (a tooltip).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

from router.dashboard import fmt
from router.dashboard.style import FONT, NARROW, WIDE

H = 220            # chart height (units)
TOP, BOTTOM = 14, 24


def _e(s: str) -> str:
    return str(escape(s))


def both(draw: Callable[[int], str]) -> Markup:
    """The chart in its two sizes; CSS shows one (style.py)."""
    return Markup(f'<div class="chart n">{draw(NARROW)}</div><div class="chart w">{draw(WIDE)}</div>')


def _left(labels: Sequence[str]) -> int:
    return int(max((len(s) for s in labels), default=1) * FONT * 0.6) + 10


def _grid(w: int, left: int, labels: list[str]) -> list[str]:
    parts = []
    for i, label in enumerate(reversed(labels)):
        y = TOP + (H - BOTTOM - TOP) * i / (len(labels) - 1)
        parts.append(f'<line class="grid" x1="{left}" x2="{w - 4}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text x="{left - 5}" y="{y + FONT * 0.35:.1f}" text-anchor="end">{_e(label)}</text>')
    return parts


def _every(slot: float, label_w: float) -> int:
    """Label every n-th slot so labels `label_w` wide do not overlap."""
    return max(1, math.ceil((label_w + 6) / max(slot, 0.1)))


def _xlabel(x: float, text: str, w: int) -> str:
    """An x-axis label centred under `x`, kept inside the chart at the right edge."""
    if x + len(text) * FONT * 0.3 > w - 2:
        return f'<text x="{w - 2}" y="{H - 6}" text-anchor="end">{_e(text)}</text>'
    return f'<text x="{x:.1f}" y="{H - 6}" text-anchor="middle">{_e(text)}</text>'


def stacked_days(days: list[str], series: list[tuple[str, str]], values: dict[tuple[str, str], float],
                 label: str) -> Callable[[int], str]:
    """Stacked bars per day. `series`: (name, colour) bottom up; `values[(day, name)]` in USD."""
    def draw(w: int) -> str:
        top = max((sum(values.get((d, s), 0.0) for s, _ in series) for d in days), default=0.0)
        ymax, ticks = fmt.axis_money(top)
        left = _left(ticks)
        slot = (w - left - 6) / max(len(days), 1)
        parts = [f'<svg viewBox="0 0 {w} {H}" role="img" aria-label="{_e(label)}">', *_grid(w, left, ticks)]
        step = _every(slot, 5 * FONT * 0.6)
        for di, d in enumerate(days):
            x, y = left + di * slot + slot * 0.15, float(H - BOTTOM)
            for name, colour in series:
                v = values.get((d, name), 0.0)
                if v <= 0:
                    continue
                bh = (H - BOTTOM - TOP) * v / ymax
                y -= bh
                parts.append(f'<rect class="bar" data-value="{fmt.fixed(v, 10)}" x="{x:.1f}" y="{y:.1f}" '
                             f'width="{slot * 0.7:.1f}" height="{bh:.1f}" fill="{colour}"><title>{_e(d)} '
                             f'{_e(name)}: {fmt.money(v)}</title></rect>')
            if (len(days) - 1 - di) % step == 0:
                parts.append(_xlabel(x + slot * 0.35, d[5:], w))
        parts.append("</svg>")
        return "".join(parts)
    return draw


def burn(month_days: list[str], spent: dict[str, float], budget: float | None, today: str) -> Callable[[int], str]:
    """Cumulative spend over the month (solid ink) against the monthly budget (dashed ink)."""
    cum, total = [], 0.0
    for d in month_days:
        total += spent.get(d, 0.0)
        cum.append(total)

    def draw(w: int) -> str:
        ymax, ticks = fmt.axis_money(max(total, budget or 0.0))
        left = _left(ticks)
        n = max(len(month_days) - 1, 1)

        def xy(i: int, v: float) -> str:
            return f"{left + (w - left - 8) * i / n:.1f},{H - BOTTOM - (H - BOTTOM - TOP) * v / ymax:.1f}"

        parts = [f'<svg viewBox="0 0 {w} {H}" role="img" aria-label="budget burn-down">', *_grid(w, left, ticks)]
        upto = [i for i, d in enumerate(month_days) if d <= today]
        if upto:
            pts = " ".join(xy(i, cum[i]) for i in upto)
            parts.append(f'<polygon class="area" points="{xy(upto[0], 0)} {pts} {xy(upto[-1], 0)}"/>'
                         f'<polyline class="spend" data-total="{fmt.fixed(cum[upto[-1]], 10)}" points="{pts}"/>')
        if budget is not None:
            y = H - BOTTOM - (H - BOTTOM - TOP) * budget / ymax
            ty = y - 5 if y - 5 >= TOP + FONT else y + FONT + 3    # never cut off at the top
            parts.append(f'<line class="budget" x1="{left}" x2="{w - 8}" y1="{y:.1f}" y2="{y:.1f}"/>'
                         f'<text x="{w - 10}" y="{ty:.1f}" text-anchor="end">budget {_e(fmt.money(budget))}</text>')
        step = max(5, _every((w - left - 8) / n, 2 * FONT * 0.6) if n else 5)
        for i in range(0, len(month_days), 7 if w < WIDE else step):
            parts.append(_xlabel(float(xy(i, 0).split(",")[0]), month_days[i][8:].lstrip("0"), w))
        parts.append("</svg>")
        return "".join(parts)
    return draw


@dataclass(frozen=True)
class Segment:
    value: float
    colour: str
    title: str
    opacity: float = 1.0


@dataclass(frozen=True)
class HBar:
    label: str
    segments: list[Segment]
    total: str


def hbars(rows: list[HBar], label: str) -> Callable[[int], str]:
    """Horizontal bars, one per row, split into segments; the row's label left and its total right."""
    bar, gap = 20, 12

    def draw(w: int) -> str:
        chars = max(8, int(w * 0.4 / (FONT * 0.6)))
        names = [r.label if len(r.label) <= chars else r.label[:chars - 1] + "\u2026" for r in rows]
        left = _left(names)
        right = max((len(r.total) for r in rows), default=1) * FONT * 0.6 + 10
        h = max(len(rows), 1) * (bar + gap) + 6
        top = max((sum(s.value for s in r.segments) for r in rows), default=0.0) or 1.0
        parts = [f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="{_e(label)}">']
        for i, (r, name) in enumerate(zip(rows, names, strict=True)):
            y = 3 + i * (bar + gap)
            x = float(left)
            parts.append(f'<text x="{left - 6}" y="{y + bar / 2 + FONT * 0.35:.1f}" text-anchor="end">'
                         f'<title>{_e(r.label)}</title>{_e(name)}</text>')
            for s in r.segments:
                bw = (w - left - right) * s.value / top
                if bw > 0:
                    op = "" if s.opacity == 1.0 else f' fill-opacity="{s.opacity}"'
                    parts.append(f'<rect class="bar" data-value="{fmt.fixed(s.value, 10)}" x="{x:.1f}" y="{y}" '
                                 f'width="{bw:.1f}" height="{bar}" fill="{s.colour}"{op} stroke="{s.colour}">'
                                 f'<title>{_e(s.title)}</title></rect>')
                x += bw
            parts.append(f'<text x="{x + 5:.1f}" y="{y + bar / 2 + FONT * 0.35:.1f}">{_e(r.total)}</text>')
        parts.append("</svg>")
        return "".join(parts)
    return draw


def spark(values: list[float], label: str) -> Markup:
    """A tiny bar chart in ink for a table cell (spend per day); its figures are in the cell's text too."""
    w, h = 120, 24
    top = max(values, default=0.0) or 1.0
    slot = w / max(len(values), 1)
    parts = [f'<svg class="spark" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-label="{_e(label)}">']
    for i, v in enumerate(values):
        bh = (h - 2) * v / top
        if bh > 0:
            parts.append(f'<rect class="ink" x="{i * slot + 1:.1f}" y="{h - bh:.1f}" width="{max(slot - 2, 1):.1f}" '
                         f'height="{bh:.1f}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
