"""deploy/: the ops dashboard and the alert rules name only metrics that exist.

The engines' names are the simulator's /metrics page, which speaks vLLM's: the ones the dashboard uses
are vLLM's current (v1) names, in vllm-project/vllm vllm/v1/metrics/loggers.py at commit
005a810bc40faa25b8870fbc8559c3462581eee3 (PrometheusStatLogger): vllm:num_requests_running,
vllm:num_requests_waiting, vllm:kv_cache_usage_perc (vllm:gpu_cache_usage_perc is deprecated there
since 0.9), vllm:prefix_cache_queries and vllm:prefix_cache_hits (counters: `_total` on the page;
vllm:gpu_prefix_cache_* are the deprecated ones).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from backends.sim.profile import get_profile
from backends.sim.run import _TOKENIZERS
from backends.sim.server import SimServer
from router.metrics import RouterMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NAME = re.compile(r"\b(tiergate_[a-z_]+|vllm:[a-z_:]+)")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",)}


def router_names() -> set[str]:
    """Every series name RouterMetrics exports, whether or not a child exists yet."""
    return {fam.name + suffix for fam in RouterMetrics().registry.collect() for suffix in SUFFIXES[fam.type]}


def engine_names() -> set[str]:
    page = SimServer(get_profile("qwen3-1.7b-fp8"), _TOKENIZERS.get(None)).metrics.render()
    return {s.name for fam in text_string_to_metric_families(page) for s in fam.samples}


def _exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_metric_name_sets_are_what_the_checks_below_rely_on() -> None:
    router, engine = router_names(), engine_names()
    assert {"tiergate_first_token_seconds_bucket", "tiergate_tpot_seconds_count", "tiergate_budget_limit_usd",
            "tiergate_instance_ejections_total", "tiergate_queue_depth"} <= router
    assert "tiergate_first_token_seconds" not in router and "tiergate_queue_depth_total" not in router
    assert {"vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total",
            "vllm:prefix_cache_queries_total"} <= engine
    assert "vllm:gpu_cache_usage_perc" not in engine


def test_ops_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana/tiergate-ops.json").read_text())
    exprs = _exprs(dash)
    used = {m for e in exprs for m in NAME.findall(e)}
    assert used and used <= router_names() | engine_names(), used - router_names() - engine_names()
    assert {"tiergate_router_overhead_seconds_bucket", "tiergate_first_token_seconds_bucket",
            "tiergate_tpot_seconds_bucket", "tiergate_slo_requests_total", "tiergate_upstream_retries_total",
            "tiergate_instance_ejections_total", "tiergate_upstream_faults_total", "tiergate_tokens_total",
            "tiergate_queue_depth", "tiergate_queue_wait_seconds_bucket", "tiergate_shed_requests_total",
            "tiergate_instance_healthy", "tiergate_instance_in_flight", "tiergate_budget_remaining_usd",
            "tiergate_usage_journal_pending", "vllm:num_requests_running", "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"} <= used
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and {"tier", "slo_class"} <= set(variables)
    for name in ("tier", "slo_class"):
        assert NAME.findall(variables[name]["query"])[0] in router_names()
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    # the latency panels are per tier and class, by the template variables
    for metric in ("tiergate_first_token_seconds_bucket", "tiergate_tpot_seconds_bucket"):
        mine = [e for e in exprs if metric in e]
        assert len(mine) == 3 and all('slo_class=~"$slo_class"' in e and "by (le, tier, slo_class)" in e
                                      for e in mine), mine


def test_alert_rules_name_exported_metrics_and_are_complete() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    files = [DEPLOY / f for f in config["rule_files"]]
    assert files == [DEPLOY / "prometheus/alerts.yml"] and files[0].is_file()
    rules = [r for g in yaml.safe_load(files[0].read_text())["groups"] for r in g["rules"]]
    exported = router_names()
    for r in rules:
        names = set(NAME.findall(r["expr"]))
        assert names and names <= exported, (r["alert"], names - exported)
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"], r["alert"]
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert set(by_name) == {"TiergateBudgetNearlySpent", "TiergateInstanceEjected", "TiergateUsageJournalPending",
                            "TiergatePolicyReloadInvalid", "TiergateKvEventsMalformed"}
    assert "tiergate_budget_limit_usd" in by_name["TiergateBudgetNearlySpent"]
    assert 'result="invalid"' in by_name["TiergatePolicyReloadInvalid"]
    assert 'kind="malformed"' in by_name["TiergateKvEventsMalformed"]
