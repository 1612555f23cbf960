"""Prometheus metrics on a private registry (one per app, no globals).

Tenant labels (`tenant` on requests, tokens, cost, SLO, admissions, budget remaining and expired
reservations) take one of three forms (Settings.metrics_tenant_labels):
- `name` (default): the tenant's name from the policy.
- `hash`: `t_` + the first 12 hex digits of HMAC-SHA256(metrics_tenant_salt, name). Stable across
  replicas and restarts that share the salt, so per-tenant graphs and alerts keep working, but a
  reader of /metrics cannot tell which tenant is which, nor confirm a guessed name without the salt.
  An unkeyed hash would not hide guessable names (company names), hence the required salt. Map a
  value back: `python -c "import hmac,hashlib,sys;print('t_'+hmac.new(sys.argv[1].encode(),
  sys.argv[2].encode(),hashlib.sha256).hexdigest()[:12])" SALT TENANT`.
- `redacted`: every tenant is `redacted` (the series sum over tenants); the per-tenant budget gauge,
  meaningless once summed, is not exported.
The value `unknown` (a request refused before its key named a tenant) is kept as is in every mode.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backends.registry import Registry

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                1.0, 2.5)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)


TENANT_LABEL_MODES = ("name", "hash", "redacted")


def tenant_labeler(mode: str = "name", salt: str | None = None) -> Callable[[str], str]:
    """The tenant label value for a tenant name, per the module header; ValueError for a bad setting."""
    if mode == "name":
        return lambda tenant: tenant
    if mode == "redacted":
        return lambda tenant: tenant if tenant == "unknown" else "redacted"
    if mode == "hash":
        if not salt:
            raise ValueError("metrics_tenant_labels=hash needs metrics_tenant_salt (TIERGATE_METRICS_TENANT_SALT), "
                             "the same secret on every replica")
        key = salt.encode()
        return lambda tenant: tenant if tenant == "unknown" else \
            "t_" + hmac.new(key, tenant.encode(), hashlib.sha256).hexdigest()[:12]
    raise ValueError(f"metrics_tenant_labels must be one of {', '.join(TENANT_LABEL_MODES)}")


class _NoOp:
    """A child that records nothing (a per-tenant gauge when tenants are redacted)."""

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass


class RouterMetrics:
    def __init__(self, tenant_label: Callable[[str], str] | None = None, redacted: bool = False) -> None:
        """`tenant_label`: tenant name -> label value (`tenant_labeler`); `redacted`: tenants are all one."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tiergate_requests", "Requests by outcome.", ["tier", "tenant", "route", "status"],
                                registry=r)
        self.tokens = Counter("tiergate_tokens", "Tokens served.", ["tier", "tenant", "kind"], registry=r)
        self.cost = Counter("tiergate_cost_usd", "Cost of served tokens at the tier's prices (USD).",
                            ["tier", "tenant"], registry=r)
        self.ttft = Histogram("tiergate_ttft_seconds", "Time to first byte from upstream, as the client sees it.",
                              ["tier"], buckets=LAT_BUCKETS, registry=r)
        self.first_token = Histogram("tiergate_first_token_seconds", "Time to the first content token, as the "
                                     "client sees it (a response not streamed: its body).", ["tier", "slo_class"],
                                     buckets=LAT_BUCKETS, registry=r)
        self.tpot = Histogram("tiergate_tpot_seconds", "Time per output token after the first, as the client sees "
                              "it: (end - first token) / (completion tokens - 1), once per served stream of two "
                              "tokens or more.", ["tier", "slo_class"], buckets=TPOT_BUCKETS, registry=r)
        self.latency = Histogram("tiergate_request_seconds", "Whole request latency.", ["tier"],
                                 buckets=LAT_BUCKETS, registry=r)
        self.overhead = Histogram("tiergate_router_overhead_seconds",
                                  "Router time before the upstream request is sent (auth, tokenize, route).",
                                  ["tier"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.retries = Counter("tiergate_upstream_retries", "Retries on another candidate before the first byte.",
                               ["tier", "reason"], registry=r)
        self.in_flight = Gauge("tiergate_instance_in_flight", "Requests in flight per instance.",
                               ["tier", "instance"], registry=r,
                                multiprocess_mode="livesum")
        self.slo = Counter("tiergate_slo_requests", "Served requests by whether their TTFT met the SLO class target.",
                           ["tier", "tenant", "slo_class", "result"], registry=r)
        self.affinity = Counter("tiergate_affinity_ops", "Affinity index operations by result "
                                "(ok, error, skipped while the breaker is open, dropped).", ["op", "result"],
                                registry=r)
        self.kv_events = Counter("tiergate_kv_events", "KV-event stream anomalies (gap, malformed, store_error).",
                                 ["tier", "instance", "kind"], registry=r)
        self.load_sync = Counter("tiergate_load_sync", "Syncs of per-instance load with the other replicas.",
                                 ["result"], registry=r)
        self.admission_retries = Counter("tiergate_admission_retries", "Budget admissions asked again after a "
                                         "timeout while the store was healthy (result: ok, failed): the first "
                                         "wait is short, and a loaded event loop can outlast it.", ["result"],
                                         registry=r)
        self.admissions = Counter("tiergate_admissions", "Admission decisions by tenant and result (admitted, "
                                  "rate_limited, budget_exceeded, store_unavailable_rejected, "
                                  "store_unavailable_allowed).",
                                  ["tenant", "result"], registry=r)
        self.budget_remaining = Gauge("tiergate_budget_remaining_usd", "Budget left in the current period, as of "
                                      "the last admission.", ["tenant", "period"], registry=r,
                                multiprocess_mode="livemostrecent")
        self.budget_limit = Gauge("tiergate_budget_limit_usd", "The budget of the period (beside "
                                  "tiergate_budget_remaining_usd, as of the last admission).", ["tenant", "period"],
                                  registry=r, multiprocess_mode="livemostrecent")
        self.settlements = Counter("tiergate_settlements", "Settlements by how they landed (open, expired, orphan, "
                                   "dup, journaled).", ["result"], registry=r)
        self.journal_pending = Gauge("tiergate_usage_journal_pending", "Usage records waiting in the local journal "
                                     "for Redis.", registry=r,
                                multiprocess_mode="livesum")
        self.swept = Counter("tiergate_reservations_expired", "Reservations released by the sweeper (a router "
                             "died mid-request).", ["tenant"], registry=r)
        self.discovery = Counter("tiergate_discovery_resolutions", "DNS resolutions of discovering tiers by result "
                                 "(ok; empty: no records, error: failed, the last set kept either way).",
                                 ["tier", "result"], registry=r)
        self.discovered = Gauge("tiergate_discovered_instances", "Instances of the tier found by DNS, as last set.",
                                ["tier"], registry=r, multiprocess_mode="livemax")
        self.policy_reloads = Counter("tiergate_policy_reloads", "Policy file reloads by result (reloaded, invalid).",
                                      ["result"], registry=r)
        self.policy_info = Gauge("tiergate_policy_info", "1 for the running policy's version.", ["version"],
                                 registry=r,
                                multiprocess_mode="livemax")
        self.healthy = Gauge("tiergate_instance_healthy", "1 if the instance is serving.", ["tier", "instance"],
                             registry=r,
                                multiprocess_mode="livemostrecent")
        self.upstream_faults = Counter("tiergate_upstream_faults", "Backend faults (router/proxy.py): "
                                       "first_byte_timeout, stall_timeout, malformed, error (the backend's error "
                                       "event), broken (a stream cut after its first byte).",
                                       ["tier", "instance", "kind"], registry=r)
        self.queries_of_death = Counter("tiergate_queries_of_death", "Requests that failed on two instances and "
                                        "were not retried further (no instance counted as failing).", ["tier"],
                                        registry=r)
        self.ejections = Counter("tiergate_instance_ejections", "Outlier ejections of an instance "
                                 "(backends/resilience.py).", ["tier", "instance"], registry=r)

        self.tokenized_chars = Counter("tiergate_tokenized_chars", "Prompt characters handed to the tokenizer.",
                                       registry=r)
        self.prompts_refused = Counter("tiergate_prompts_refused", "Prompts refused as longer than the largest "
                                       "context before all of them was tokenized (reason: chars, proven from the "
                                       "characters alone; tokens, counted part of it).", ["reason"], registry=r)
        self.bodies_refused = Counter("tiergate_bodies_refused", "Request bodies refused with 413 (how: "
                                      "content_length, before reading; streamed, once the count passed the limit).",
                                      ["how"], registry=r)
        self.long_prompt_slots = Gauge("tiergate_long_prompt_slots", "Long-prompt tokenizer slots (state: slots, "
                                       "running, waiting).", ["state"], registry=r,
                                multiprocess_mode="livesum")
        self.long_prompts = Counter("tiergate_long_prompts", "Long prompts by whether they got a tokenizer slot "
                                    "(admitted) or found the queue full (shed, 503).", ["result"], registry=r)
        self.long_prompt_wait = Histogram("tiergate_long_prompt_wait_seconds", "Wait for a long-prompt tokenizer "
                                          "slot.", buckets=LAT_BUCKETS, registry=r)

        # shadow policy (router/shadow.py) and decision records (router/decision_records.py)
        self.shadow_decisions = Counter("tiergate_shadow_decisions", "Live requests the shadow policy also decided, "
                                        "by whether it chose the same candidate (agree: true, false).", ["agree"],
                                        registry=r)
        self.shadow_cost_delta = Gauge("tiergate_shadow_cost_delta_usd", "Running sum since start of the shadow "
                                       "choice's estimated USD minus the live choice's (negative: the shadow would "
                                       "have been cheaper); a gauge, as it can fall: use delta() or deriv().",
                                       registry=r,
                                multiprocess_mode="sum")
        self.shadow_cost = Counter("tiergate_shadow_estimated_cost_usd", "Estimated USD of each choice where "
                                   "both were priced (policy: live, shadow), for rate().", ["policy"], registry=r)
        self.shadow_failures = Counter("tiergate_shadow_failures", "Shadow decisions not made (reason: error, "
                                       "an exception in the shadow, isolated from the request; no_route, the "
                                       "shadow policy has no such route) and shadow files refused "
                                       "(policy_invalid).", ["reason"], registry=r)
        self.decision_records = Counter("tiergate_decision_records", "Decision records by result (written to "
                                        "the Redis stream; failed, Redis slow or down; dropped, the queue was "
                                        "full).", ["result"], registry=r)
        # admission between decision and dispatch (router/admission/, issue #14)
        self.queue_depth = Gauge("tiergate_queue_depth", "Requests waiting for a prefill window, per tier and SLO "
                                 "class, on this replica.", ["tier", "slo_class"], registry=r,
                                multiprocess_mode="livesum")
        self.queue_wait = Histogram("tiergate_queue_wait_seconds", "Time requests waited for a prefill window "
                                    "(outcome: released, bypassed at the class's max_queue_ms, shed, left: the "
                                    "client went away).", ["tier", "outcome"], registry=r,
                                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.window_tokens = Counter("tiergate_window_tokens", "Uncached prefill tokens admitted through the "
                                     "prefill windows (store: shared, Redis; local, this replica's fallback).",
                                     ["tier", "store"], registry=r)
        self.window_budget = Gauge("tiergate_window_budget_tokens", "An instance's window budget (burst) as last "
                                   "sized from its prefill rate, step time and KV use.", ["tier", "instance"],
                                   registry=r,
                                multiprocess_mode="livemostrecent")
        self.coalesced = Counter("tiergate_coalesced_requests", "Prefix claims at decision time (result: "
                                 "claimed, recorded for the choice; followed, moved to the instance a "
                                 "concurrent request had just claimed the prefix on; kept, that instance was "
                                 "worse by the policy).", ["tier", "result"], registry=r)
        self.shed = Counter("tiergate_shed_requests", "Requests shed by a full admission queue, by SLO class.",
                            ["tier", "slo_class"], registry=r)
        self.redis_batch_flushes = Counter("tiergate_redis_batch_flushes", "Micro-batched Redis round trips "
                                           "(router/redis_batch.py) by batch (settle, affinity_record) and start "
                                           "(at_once: the queue was idle; window: collected under load).",
                                           ["batch", "start"], registry=r)
        self.redis_batch_items = Counter("tiergate_redis_batch_items", "Items sent in micro-batched Redis round "
                                         "trips, by batch.", ["batch"], registry=r)
        self.redis_batch_overflow = Counter("tiergate_redis_batch_overflow", "Items a full micro-batch queue "
                                            "refused (settle: settled unbatched; affinity_record: dropped).",
                                            ["batch"], registry=r)

        # one of `--workers N`: values live in shared files (prometheus_client's multiprocess mode, chosen when
        # it is imported, which the supervisor's environment makes so)
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.tenant_label = tenant_label or (lambda tenant: tenant)
        # where each metric labelled by tenant has its tenant label (every tenant-labelled write goes via child)
        self._tenant_at = {id(self.requests): 1, id(self.tokens): 1, id(self.cost): 1, id(self.slo): 1,
                           id(self.admissions): 0, id(self.budget_remaining): 0, id(self.swept): 0,
                           id(self.budget_limit): 0}
        self._dropped = {id(self.budget_remaining), id(self.budget_limit)} if redacted else set()

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, memoised: label lookup costs more than the increment itself. A tenant
        label is written in the configured form (module header)."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            at = self._tenant_at.get(id(metric))
            if at is None:
                c = metric.labels(*labels)
            elif id(metric) in self._dropped:
                c = _NoOp()
            else:
                c = metric.labels(*labels[:at], self.tenant_label(labels[at]), *labels[at + 1:])
            self._children[key] = c
        return c

    def request_done(self, tier: str, tenant: str, route: str, status: int, prompt: int, cached: int,
                     completion: int, cost: float, overhead: float, latency: float, ttft: float | None,
                     first_token: float | None = None, tpot: float | None = None, slo_class: str = "none") -> None:
        """One closed-out request; times in seconds (`ttft`: the first byte; `first_token`: the first content
        token; `tpot`: per output token after it)."""
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
        if first_token is not None:
            child(self.first_token, tier, slo_class).observe(first_token)
        if tpot is not None:
            child(self.tpot, tier, slo_class).observe(tpot)

    def budget_left(self, tenant: str, period: str, left_usd: float, limit_usd: float | None) -> None:
        """A tenant's budget as of an admission: what is left of the period's, and the period's budget."""
        self.child(self.budget_remaining, tenant, period).set(left_usd)
        if limit_usd is not None:
            self.child(self.budget_limit, tenant, period).set(limit_usd)

    def upstream_fault(self, tier: str, instance: str, kind: str) -> None:
        """The forwarder's fault hook (router/relay.py `Relay.on_fault`)."""
        if kind == "query_of_death":
            self.child(self.queries_of_death, tier).inc()
        elif kind == "ejected":
            self.child(self.ejections, tier, instance).inc()
        else:
            self.child(self.upstream_faults, tier, instance, kind).inc()

    def long_prompt_done(self, result: str, waited_s: float) -> None:
        self.child(self.long_prompts, result).inc()
        if result == "admitted":
            self.long_prompt_wait.observe(waited_s)

    def render(self) -> bytes:
        """The exposition text: this process's registry, or under `tiergate serve --workers N` (where
        PROMETHEUS_MULTIPROC_DIR is set) every worker's, summed (router/workers.py; gauges by their mode)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


def write_instance_gauges(metrics: RouterMetrics, registry: Registry) -> None:
    """In-flight and health per instance, from the registry. Alone, at each scrape, afresh (an instance a
    reload removed leaves no series). Under `--workers N`, each worker writes its own every second
    (`instance_gauges_forever`) and the scrape sums them; a removed instance's series stays, at 0."""
    now = registry.clock()
    if metrics.multiprocess:
        children: list[Any] = [*metrics.in_flight._metrics.values(), *metrics.healthy._metrics.values()]
        for child in children:
            child.set(0)
    else:
        metrics.in_flight.clear()
        metrics.healthy.clear()
    for inst in registry.all_instances():
        metrics.in_flight.labels(inst.tier, inst.instance_id).set(inst.in_flight)
        metrics.healthy.labels(inst.tier, inst.instance_id).set(1 if inst.serving(now) else 0)


async def instance_gauges_forever(metrics: RouterMetrics, registry: Registry, interval_s: float = 1.0) -> None:
    """Under `--workers N`: keep this worker's instance gauges fresh for whichever worker is scraped."""
    import asyncio

    while True:
        write_instance_gauges(metrics, registry)
        await asyncio.sleep(interval_s)
