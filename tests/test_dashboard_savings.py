"""Honest counterfactuals and the fleet views, with exact figures on a seeded ledger (tests/dashboard_seed.py):
the report function itself, then the HTTP views (JSON, CSV, HTML) of a router on a real socket and Redis."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re

import httpx
import pytest
import redis.asyncio as aioredis

from router.usage import report
from tests.conftest import serve_router
from tests.dashboard_seed import ADMIN, DEMO, FLEET, aggregates, keys, letters_tag, policy, seed

TODAY = dt.date(2026, 3, 15)
SCI = re.compile(r"\d[eE][+-]?\d")


def test_only_requests_the_baseline_could_serve_are_compared() -> None:
    rep = report("demo", aggregates("demo", TODAY), 7, TODAY, {}, baseline="balanced")
    t = rep["totals"]
    assert (t["requests"], t["baseline_requests"], t["no_alternative_requests"], t["not_compared_requests"]) == \
        (15, 6, 9, 0)
    assert t["baseline_cost_usd"] == 3.0 and t["baseline_actual_cost_usd"] == 0.7
    assert t["savings_vs_baseline_usd"] == 2.3             # 3.00 - 0.70: the 9 with no alternative are not priced
    assert t["cost_usd"] == 13.5456 and t["no_cache_cost_usd"] == 16.5 and t["savings_from_cache_usd"] == 2.9544
    assert t["gpu_hours"] == 2.5 and t["gpu_cost_usd"] is None          # no GPU prices given
    assert t["slo_by_class"] == {"batch": {"met": 3, "measured": 5}, "interactive": {"met": 8, "measured": 10}}
    long = next(r for r in rep["data"] if r["tier"] == "long")
    assert long["baseline_cost_usd"] == 0.0 and long["no_alternative_requests"] == 5
    priced = report("demo", aggregates("demo", TODAY), 7, TODAY, {}, gpu_per_hour={"fast": 2.0, "long": 4.0})
    assert priced["totals"]["gpu_cost_usd"] == 9.0


def test_a_tenant_that_may_not_use_the_baseline_has_no_alternative() -> None:
    t = report("f", aggregates("fastonly", TODAY), 7, TODAY, {}, baseline_allowed=False)["totals"]
    assert (t["baseline_requests"], t["no_alternative_requests"], t["savings_vs_baseline_usd"]) == (0, 3, 0.0)
    assert t["cost_usd"] == 0.00000365 and t["savings_from_cache_usd"] == 0.0


def test_hours_without_eligibility_counts_are_not_compared() -> None:
    t = report("l", aggregates("legacy", TODAY), 7, TODAY, {})["totals"]
    assert (t["baseline_requests"], t["baseline_cost_usd"], t["not_compared_requests"]) == (0, 0.0, 2)
    assert t["savings_vs_baseline_usd"] == 0.0 and t["savings_from_cache_usd"] == 0.0   # no `nocache`: none claimed
    old = {"2026031512|fast|requests": 1, "2026031512|fast|cost": 10, "2026031512|fast|unknown_metric": 5}
    assert report("x", old, 1, TODAY, {})["totals"]["cost_usd"] == 1e-9     # unknown metrics are ignored


async def test_usage_fleet_json_csv_and_pages_show_exact_figures(redis: aioredis.Redis, redis_url: str) -> None:
    tag = letters_tag()
    k = keys(tag)
    await seed(redis, tag)
    admin = {"authorization": f"Bearer {ADMIN}"}
    async with serve_router(policy(tag), redis_url=redis_url) as base, httpx.AsyncClient(base_url=base) as c:
        mine = (await c.get("/v1/usage", headers={"authorization": f"Bearer {k['demo']}"})).json()
        t = mine["totals"]
        assert mine["baseline_tier"] == "balanced" and t["savings_vs_baseline_usd"] == 2.3
        assert (t["baseline_requests"], t["no_alternative_requests"], t["gpu_cost_usd"]) == (6, 9, 9.0)
        fo = (await c.get("/v1/usage", headers={"authorization": f"Bearer {k['fastonly']}"})).json()["totals"]
        assert (fo["baseline_requests"], fo["no_alternative_requests"], fo["savings_vs_baseline_usd"]) == (0, 3, 0.0)

        sv = (await c.get("/admin/fleet", params={"view": "savings"}, headers=admin)).json()
        assert sv["object"] == "fleet.savings" and sv["baseline_tier"] == "balanced"
        rows = {r["tenant"].rsplit("-", 1)[0]: r for r in sv["data"]}
        assert rows["demo"]["savings_vs_baseline_usd"] == 2.3 and rows["fastonly"]["no_alternative_requests"] == 3
        assert rows["legacy"]["not_compared_requests"] == 2
        every = (await c.get("/admin/fleet", headers=admin)).json()["views"]
        assert {r["slo_class"]: (r["met"], r["measured"]) for r in every["slo"]} == \
            {"interactive": (8, 10), "batch": (3, 5), "(all)": (11, 15)}
        assert {r["tier"]: (r["gpu_hours"], r["gpu_cost_usd"]) for r in every["gpu"]} == \
            {"fast": (0.5, 1.0), "balanced": (0.0, None), "long": (2.0, 8.0)}
        assert {r["tier"]: (r["measured_engine"], r["measured_sim"]) for r in every["gpu"]} == \
            {"fast": (10, 0), "balanced": (0, 0), "long": (0, 5)}
        assert [r["tenant"].rsplit("-", 1)[0] for r in every["top"]] == ["demo", "legacy", "fastonly"]
        states = {r["tenant"].rsplit("-", 1)[0]: r["state"] for r in every["budgets"]}
        assert states == {"demo": "ok", "fastonly": "no budget", "legacy": "ok"}

        got = await c.get("/admin/fleet", params={"view": "daily_tier", "format": "csv"}, headers=admin)
        assert got.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(got.text)))
        assert {(r["tier"], r["cost_usd"], r["gpu_hours"]) for r in table} == \
            {("fast", "1.20200365", "0.5"), ("long", "12.3456", "2")}
        assert (await c.get("/admin/fleet", params={"format": "csv"}, headers=admin)).status_code == 400
        page_csv = await c.get("/dashboard/admin", params={"view": "budgets", "format": "csv", "sort": "tenant",
                                                          "dir": "asc"}, headers=admin)   # the page's own links
        assert [r["tenant"].rsplit("-", 1)[0] for r in csv.DictReader(io.StringIO(page_csv.text))] == \
            ["demo", "fastonly", "legacy"]
        assert (await c.get("/admin/fleet", headers={"authorization": f"Bearer {k['demo']}"})).status_code == 403

        page = await c.get("/dashboard", headers={"authorization": f"Bearer {k['demo']}"})
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.text))
        for figure in (DEMO["spend"], DEMO["saved"], DEMO["saved_pct"], DEMO["cache"], DEMO["slo"], DEMO["gpu"]):
            assert figure in text, figure
        assert f"no alternative: {DEMO['no_alt']} requests" in text and "on 6 requests balanced could serve" in text
        fo_page = await c.get("/dashboard", headers={"authorization": f"Bearer {k['fastonly']}"})
        assert "$0.00000365" in fo_page.text and "no alternative: 3 requests" in fo_page.text
        assert "no comparison" in fo_page.text and "e-0" not in fo_page.text
        fleet = await c.get("/dashboard/admin", headers=admin)
        ftext = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fleet.text))
        for figure in (FLEET["spend"], FLEET["saved"], FLEET["cache"], FLEET["interactive"], FLEET["batch"],
                       FLEET["gpu"], FLEET["gpu_cost"], "engine 10", "sim 5"):
            assert figure in ftext, figure
        assert f"no alternative: {FLEET['no_alt']} requests" in ftext
        assert not SCI.search(ftext) and not SCI.search(text)
        assert (await c.get("/dashboard/admin", headers={"authorization": f"Bearer {k['demo']}"})).status_code == 403


@pytest.mark.parametrize(("sort", "direction", "first"), [("spend", "desc", "demo"), ("tenant", "asc", "demo"),
                                                          ("tenant", "desc", "legacy"), ("used", "desc", "legacy")])
def test_budget_table_sorts(sort: str, direction: str, first: str) -> None:
    from router.dashboard import fleet
    reports = [report(f"{n}-x", aggregates(n, TODAY), 7, TODAY, b) for n, b in (
        ("demo", {"monthly_usd": 50.0, "available": True, "spent_month_usd": 1.0}),
        ("fastonly", {"available": True}),
        ("legacy", {"daily_usd": 1.0, "available": True, "spent_today_usd": 0.9}))]
    rows = fleet.sort_budgets(fleet.budgets(reports), sort, direction == "desc")
    assert rows[0]["tenant"] == f"{first}-x"
    assert [r["state"] for r in fleet.sort_budgets(fleet.budgets(reports), "tenant", False)] == ["ok", "no budget",
                                                                                                  "near"]
