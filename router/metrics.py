"""Prometheus metrics on a private registry (one per app, no globals)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tiergate_requests", "Requests by outcome.", ["tier", "tenant", "route", "status"],
                                registry=r)
        self.tokens = Counter("tiergate_tokens", "Tokens served.", ["tier", "tenant", "kind"], registry=r)
        self.cost = Counter("tiergate_cost_usd", "Cost of served tokens at the tier's prices (USD).",
                            ["tier", "tenant"], registry=r)
        self.ttft = Histogram("tiergate_ttft_seconds", "Time to first byte from upstream, as the client sees it.",
                              ["tier"], buckets=LAT_BUCKETS, registry=r)
        self.latency = Histogram("tiergate_request_seconds", "Whole request latency.", ["tier"],
                                 buckets=LAT_BUCKETS, registry=r)
        self.overhead = Histogram("tiergate_router_overhead_seconds",
                                  "Router time before the upstream request is sent (auth, tokenize, route).",
                                  ["tier"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.retries = Counter("tiergate_upstream_retries", "Retries on another candidate before the first byte.",
                               ["tier", "reason"], registry=r)
        self.in_flight = Gauge("tiergate_instance_in_flight", "Requests in flight per instance.",
                               ["tier", "instance"], registry=r)
        self.slo = Counter("tiergate_slo_requests", "Served requests by whether their TTFT met the SLO class target.",
                           ["tier", "tenant", "slo_class", "result"], registry=r)
        self.affinity = Counter("tiergate_affinity_ops", "Affinity index operations by result "
                                "(ok, error, skipped while the breaker is open, dropped).", ["op", "result"],
                                registry=r)
        self.kv_events = Counter("tiergate_kv_events", "KV-event stream anomalies (gap, malformed, store_error).",
                                 ["tier", "instance", "kind"], registry=r)
        self.load_sync = Counter("tiergate_load_sync", "Syncs of per-instance load with the other replicas.",
                                 ["result"], registry=r)
        self.admissions = Counter("tiergate_admissions", "Admission decisions by tenant and result (admitted, "
                                  "rate_limited, budget_exceeded, store_unavailable_rejected, "
                                  "store_unavailable_allowed).",
                                  ["tenant", "result"], registry=r)
        self.budget_remaining = Gauge("tiergate_budget_remaining_usd", "Budget left in the current period, as of "
                                      "the last admission.", ["tenant", "period"], registry=r)
        self.settlements = Counter("tiergate_settlements", "Settlements by how they landed (open, expired, orphan, "
                                   "dup, journaled).", ["result"], registry=r)
        self.journal_pending = Gauge("tiergate_usage_journal_pending", "Usage records waiting in the local journal "
                                     "for Redis.", registry=r)
        self.swept = Counter("tiergate_reservations_expired", "Reservations released by the sweeper (a router "
                             "died mid-request).", ["tenant"], registry=r)
        self.policy_reloads = Counter("tiergate_policy_reloads", "Policy file reloads by result (reloaded, invalid).",
                                      ["result"], registry=r)
        self.policy_info = Gauge("tiergate_policy_info", "1 for the running policy's version.", ["version"],
                                 registry=r)
        self.healthy = Gauge("tiergate_instance_healthy", "1 if the instance is serving.", ["tier", "instance"],
                             registry=r)

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, memoised: label lookup costs more than the increment itself."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def request_done(self, tier: str, tenant: str, route: str, status: int, prompt: int, cached: int,
                     completion: int, cost: float, overhead: float, latency: float, ttft: float | None) -> None:
        child = self.child
        child(self.requests, tier, tenant, route, str(status)).inc()
        if tier == "none":
            return
        child(self.tokens, tier, tenant, "prompt").inc(prompt - cached)
        child(self.tokens, tier, tenant, "cached").inc(cached)
        child(self.tokens, tier, tenant, "completion").inc(completion)
        child(self.cost, tier, tenant).inc(cost)
        child(self.overhead, tier).observe(overhead)
        child(self.latency, tier).observe(latency)
        if ttft is not None:
            child(self.ttft, tier).observe(ttft)

    def render(self) -> bytes:
        return generate_latest(self.registry)
