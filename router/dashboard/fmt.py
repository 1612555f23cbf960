"""Numbers as people read them: currency in fixed precision chosen by magnitude, tokens with thousands
separators, percentages, and axis ticks that share one precision. Never scientific notation.

Currency (`money`), by the size of the amount:
  >= $1,000 -> $1,234 (whole dollars); >= $1 -> $12.34; >= $0.01 -> $0.0123;
  smaller -> 6 to 8 decimals, enough for three significant digits ($0.000123, $0.00000365);
  below $0.00000001 (and not zero) -> <$0.00000001. Zero is $0.00; a negative amount has a leading minus.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal

SMALLEST = 1e-8          # the last decimal place shown
MINUS = "\u2212"         # a real minus sign: as wide as the plus, and never read as a hyphen


def money_decimals(x: float) -> int:
    """The decimals `money` uses for an amount of this size."""
    a = abs(x)
    if a >= 1000:
        return 0
    if a >= 1:
        return 2
    if a >= 0.01:
        return 4
    if a == 0:
        return 2
    return min(8, max(6, 2 - math.floor(math.log10(a))))


def fixed(x: float, decimals: int) -> str:
    """`x` with exactly `decimals` decimals and thousands separators, never in scientific notation."""
    q = Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    return f"{q:,.{decimals}f}"


def money(x: float, decimals: int | None = None) -> str:
    """`x` USD as text (see the module header); `decimals` fixes the precision (an axis's ticks share one)."""
    if decimals is None and x != 0 and abs(x) < SMALLEST:
        return ("-" if x < 0 else "") + "<$" + fixed(SMALLEST, 8)
    d = money_decimals(x) if decimals is None else decimals
    body = fixed(abs(x), d)
    negative = x < 0 and body.strip("0.,") != ""
    return (MINUS if negative else "") + "$" + body


def signed_money(x: float) -> str:
    """A difference: +$1.23, or MINUS $1.23 (zero unsigned)."""
    text = money(x)
    return text if text.startswith(MINUS) or text.strip("$0.,<") == "" else "+" + text


def tokens(n: int) -> str:
    return f"{int(n):,}"


def count(n: int) -> str:
    return f"{int(n):,}"


def pct(part: float, whole: float, decimals: int = 1) -> str:
    """part / whole as a percentage, or "n/a" when `whole` is zero."""
    if whole <= 0:
        return "n/a"
    value = part / whole * 100
    if 0 < abs(value) < 10 ** -decimals:
        return ("<" if value > 0 else ">" + MINUS) + f"{10 ** -decimals:.{decimals}f}%"
    return fixed(value, decimals).replace("-", MINUS) + "%"


def hours(h: float) -> str:
    """GPU-hours: 1,234 h, 12.3 h, 2.50 h, 0.123 h, 0.0012 h (at most 4 decimals; smaller shows as <0.0001 h)."""
    if h == 0:
        return "0 h"
    if h < 0.0001:
        return "<0.0001 h"
    d = 0 if h >= 1000 else 1 if h >= 10 else 2 if h >= 1 else 3 if h >= 0.1 else 4
    return fixed(h, d) + " h"


def nice_step(top: float, ticks: int = 4) -> float:
    """A round step (1, 2, 2.5 or 5 x 10^k) so that `ticks` steps reach at least `top`."""
    if top <= 1e-8:             # nothing to show at the finest precision shown: a $0-$1 axis
        return 0.25
    raw = top / ticks
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if raw <= m * mag * (1 + 1e-12))


def axis(top: float, ticks: int = 4) -> tuple[float, list[float], int]:
    """(the axis maximum, the tick values from 0 up, the decimals every tick label shares)."""
    step = nice_step(top, ticks)
    values = [step * i for i in range(ticks + 1)]
    decimals = 0
    while decimals < 8 and any(abs(v * 10**decimals - round(v * 10**decimals)) > 1e-6 for v in values):
        decimals += 1
    if 0 < decimals < 2 and step * ticks < 1000:
        decimals = 2            # cents: $0.50, not $0.5
    return values[-1], values, decimals


def axis_money(top: float, ticks: int = 4) -> tuple[float, list[str]]:
    """The axis maximum and its tick labels as currency, all at one precision."""
    ymax, values, d = axis(top, ticks)
    return ymax, [money(v, d) for v in values]


def axis_number(top: float, ticks: int = 4, unit: str = "") -> tuple[float, list[str]]:
    ymax, values, d = axis(top, ticks)
    return ymax, [fixed(v, d) + unit for v in values]
