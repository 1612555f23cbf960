"""The dashboard's number formatter (router/dashboard/fmt.py): fixed precision by magnitude, never 'e'."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.dashboard import fmt

SCI = re.compile(r"\d[eE][+-]?\d")


@pytest.mark.parametrize(("x", "text"), [
    (0, "$0.00"), (1234.5, "$1,235"), (1_234_567.89, "$1,234,568"), (999.994, "$999.99"), (12.345, "$12.35"),
    (1, "$1.00"), (0.0123, "$0.0123"), (0.01, "$0.0100"), (0.0120, "$0.0120"), (0.000123, "$0.000123"),
    (3.65e-06, "$0.00000365"), (0.005, "$0.005000"), (1.2e-08, "$0.00000001"), (4e-9, "<$0.00000001"),
    (-2.3, "\u2212$2.30"), (-0.0001234, "\u2212$0.000123"), (-0.000000001, "-<$0.00000001"),
])
def test_money_precision_follows_magnitude(x: float, text: str) -> None:
    assert fmt.money(x) == text


def test_money_with_fixed_decimals_and_signs() -> None:
    assert fmt.money(0.02, 3) == "$0.020" and fmt.money(1500, 0) == "$1,500" and fmt.money(0, 4) == "$0.0000"
    assert fmt.signed_money(2.3) == "+$2.30" and fmt.signed_money(-2.3) == "\u2212$2.30"
    assert fmt.signed_money(0) == "$0.00"


def test_tokens_counts_percentages_hours() -> None:
    assert fmt.tokens(1234567) == "1,234,567" and fmt.tokens(0) == "0" and fmt.count(12) == "12"
    assert fmt.pct(2.3, 3.0) == "76.7%" and fmt.pct(1, 0) == "n/a" and fmt.pct(1, 100000) == "<0.1%"
    assert fmt.pct(-0.43, 1) == "\u221243.0%"
    assert fmt.hours(0.5) == "0.500 h" and fmt.hours(2) == "2.00 h" and fmt.hours(12.25) == "12.3 h"
    assert fmt.hours(1234.5) == "1,235 h" and fmt.hours(0) == "0 h" and fmt.hours(0.00001) == "<0.0001 h"


@pytest.mark.parametrize(("top", "ymax", "labels"), [
    (0.0173, 0.02, ["$0.000", "$0.005", "$0.010", "$0.015", "$0.020"]),
    (0.009, 0.01, ["$0.0000", "$0.0025", "$0.0050", "$0.0075", "$0.0100"]),
    (1.7, 2.0, ["$0.00", "$0.50", "$1.00", "$1.50", "$2.00"]),
    (3.2, 4.0, ["$0", "$1", "$2", "$3", "$4"]),
    (1700, 2000, ["$0", "$500", "$1,000", "$1,500", "$2,000"]),
    (0.0, 1.0, ["$0.00", "$0.25", "$0.50", "$0.75", "$1.00"]),
    (3.65e-06, 4e-06, ["$0.000000", "$0.000001", "$0.000002", "$0.000003", "$0.000004"]),
])
def test_axis_ticks_share_one_precision(top: float, ymax: float, labels: list[str]) -> None:
    got_max, got = fmt.axis_money(top)
    assert got_max == pytest.approx(ymax) and got == labels
    assert len({len(s.split(".")[-1]) if "." in s else 0 for s in got}) == 1


@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False))
def test_never_scientific_notation(x: float) -> None:
    for text in (fmt.money(x), fmt.signed_money(x), fmt.hours(abs(x)), fmt.pct(x, 7.0), *fmt.axis_money(abs(x))[1]):
        assert not SCI.search(text), text
