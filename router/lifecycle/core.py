"""One request's lifecycle as plain code over ports: no sockets, no sleeps, no framework (the h11/h2 style).

A driver calls the stages in order, with a `Pending` that carries the request through them:

  route     the virtual model's route and the tiers this tenant may use in it (pure);
  start     the RoutingRequest: route, tenant, SLO targets, prompt tokens per tier, the route's learned
            output length, the tenant's degrade tiers (pure);
  gather    expected cached tokens per candidate, from the affinity index (one batched lookup: the
            affinity port, Redis live, the in-memory twin in replay);
  decide    the route's profile over the registry's candidates (filters, scorers, picker), or the
            ApiError that refuses the request (pure); `evaluate` decides without refusing (dry-run,
            explain), `refusal` is the error `decide` would raise;
  admit     reserve the worst case of the tiers it may be sent to (the budget port: `Accountant` over
            Redis or the twin), the completion cap to forward, then a re-decision when a policy reload
            removed every instance it was routed to meanwhile;
  dispatch  the instance's load counts (`dispatched`, `prefilled` at the first token, `released`) and
            what the outcome records of the chosen candidate (`chosen`);
  close_out bill the real usage exactly once, teach the tier's predictors (prefill rate, TTFT, TPOT, the
            route's output length), count the SLO, settle, metrics, the canonical log line and the
            decision record (the `records` sink: router/lifecycle/records.py).

The live driver (router/gateway.py) parses, authenticates and tokenizes before `start`, and forwards
(router/proxy.py) between `admit` and `close_out`; the replay driver (router/replay/) runs the same
stages against simulated engines on a virtual clock. Time comes from the injected `clock` (seconds,
monotonic: `time.perf_counter` live, virtual in replay) and `wall_ms` (the usage record's time).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.registry import Ewma, InstanceState, Registry
from policies.predict import queued_requests
from policies.schema import Policy, TenantSpec
from policies.types import Candidate, RoutingDecision, RoutingRequest
from router.accounting import Accountant, Admitted, cost_units, discounted
from router.budget_store import FlexBudget, Usage, price_units, usd
from router.errors import ApiError
from router.lifecycle.ports import Clock, View
from router.lifecycle.records import DecisionRecord, RecordSink, served_estimate
from router.metrics import RouterMetrics
from router.prefix_hash import PrefixHashes
from router.relay import Outcome, prefilled

__all__ = ["MIN_FLEX_TOKENS", "Lifecycle", "Pending", "allowed_models", "chosen", "dispatched", "prefilled",
           "released"]

MIN_FLEX_TOKENS = 16   # a request without max_tokens is refused rather than given a budget below this


@dataclass
class Pending:
    """One request on its way through the core."""

    view: View
    rid: str
    tenant: str
    route: str
    tiers: tuple[str, ...]
    counts: dict[str, int]                  # prompt tokens per tier
    t0: float                               # the driver's clock when the request arrived
    rreq: RoutingRequest
    cached: dict[str, int] = field(default_factory=dict)   # expected cached tokens by candidate key
    hashes: dict[str, PrefixHashes] = field(default_factory=dict)   # the prompt's sampled block hashes per tier
    affinity: str = "off"                   # the affinity lookup's status
    decision: RoutingDecision | None = None
    candidates: list[Candidate] = field(default_factory=list)   # the snapshot the decision was made on
    notes: dict[str, Any] = field(default_factory=dict)        # driver extras for the log line and record
    aid: str = ""                           # the accounting id: admission, settlement, the ledger record
    reserved: tuple[str, ...] = ()          # the tiers its admission reserved for (what it may still move to)
    wall_ms: int = 0
    overhead: float = 0.0                   # router time before the upstream request was sent
    closed: bool = False


def may_use(spec: TenantSpec, route: str) -> bool:
    return "*" in spec.allowed_models or route in spec.allowed_models


def allowed_models(pol: Policy, tenant: str) -> list[str]:
    spec = pol.tenants[tenant]
    return [m for m in pol.routes if may_use(spec, m)]


def dispatched(inst: InstanceState, prefill: int) -> None:
    """One request sent to `inst`, `prefill` uncached prompt tokens of it still to prefill."""
    inst.in_flight += 1
    inst.pending_requests += 1
    inst.pending_tokens += prefill


def released(inst: InstanceState) -> None:
    inst.in_flight -= 1


def chosen(out: Outcome, cand: Candidate, status: int, now: float) -> None:
    """The candidate that answered: what the close-out learns from."""
    out.tier, out.instance, out.status = cand.tier, cand.instance_id, status
    out.expected_cached = cand.cached_tokens
    out.backlog_at_dispatch = queued_requests(cand)
    out.first_byte_at = now


class Recorder(Protocol):
    def begin(self, p: Pending) -> None: ...

    def end(self, p: Pending, out: Outcome, usage: Usage) -> None: ...


class Lifecycle:
    def __init__(self, registry: Registry, *, accountant: Accountant | None = None,
                 metrics: RouterMetrics | None = None, max_attempts: int = 3, clock: Clock = time.perf_counter,
                 wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex, log: Any = None,
                 records: RecordSink | None = None) -> None:
        self.registry = registry
        self.accountant = accountant
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.clock = clock
        self.wall_ms = wall_ms
        self.new_id = new_id
        self.log = log                  # the canonical request line; None: no line (replay)
        self.recorder: Recorder | None = None   # router/replay/record.py (TIERGATE_RECORD_TRACE)
        self.records = records          # decision records (router/lifecycle/records.py); None: none

    # --- route, start, gather, decide --------------------------------------------------------
    @staticmethod
    def route(v: View, tenant: str, model: str) -> tuple[str, tuple[str, ...], frozenset[str] | None]:
        """(route name, the tiers this tenant may use in it, the tenant's tiers or None for all), or the
        ApiError (404 unknown model, 403 not this tenant's)."""
        pol = v.policy
        name = v.models.get(model.lower())
        if name is None:
            raise ApiError(404, f"The model '{model[:200]}' does not exist. Known models: "
                           f"{', '.join(allowed_models(pol, tenant))}", param="model", code="model_not_found")
        spec = pol.tenants[tenant]
        if not may_use(spec, name):
            raise ApiError(403, f"this key may not use model '{model[:200]}'", param="model",
                           code="model_not_allowed")
        tenant_tiers = None if "*" in spec.allowed_tiers else frozenset(spec.allowed_tiers)
        tiers = tuple(t for t in pol.routes[name].tiers if tenant_tiers is None or t in tenant_tiers)
        if not tiers:
            raise ApiError(403, f"this key may not use any tier of model '{model[:200]}'", param="model",
                           code="model_not_allowed")
        return name, tiers, tenant_tiers

    def start(self, v: View, rid: str, tenant: str, route: str, tiers: tuple[str, ...],
              tenant_tiers: frozenset[str] | None, counts: dict[str, int], limit: int | None,
              slo: tuple[str, float | None, float | None], t0: float) -> Pending:
        pol = v.policy
        slo_class, ttft_target, tpot_target = slo
        cls = pol.slo_classes.get(slo_class)
        rreq = RoutingRequest(request_id=rid, tenant=tenant, virtual_model=route, route_tiers=tiers,
                              tenant_tiers=tenant_tiers, prompt_tokens=counts, max_tokens=limit,
                              default_completion_tokens=pol.defaults.completion_tokens,
                              slo_class=slo_class, ttft_target_s=ttft_target, tpot_target_s=tpot_target,
                              miss_cost_usd=cls.miss_cost_usd if cls else 0.0,
                              expected_output_tokens=self._expected_output(route),
                              degrade_tiers=self._degrade(pol, tenant))
        return Pending(view=v, rid=rid, tenant=tenant, route=route, tiers=tiers, counts=counts, t0=t0, rreq=rreq)

    async def gather(self, p: Pending, hashes: dict[str, PrefixHashes]) -> None:
        """Expected cached tokens per candidate: one batched lookup in the affinity index."""
        p.hashes = hashes
        p.cached, p.affinity = await p.view.affinity.lookup(hashes)

    def evaluate(self, p: Pending, adjust: Callable[[list[Candidate]], list[Candidate]] | None = None,
                 tiers: tuple[str, ...] | None = None) -> RoutingDecision:
        """The route's profile over a snapshot of the candidates (kept in `p.candidates`); no refusal, no
        admission: what `decide` and a dry-run both run. The admission gate (router/admission/gate.py)
        decides again with `adjust` (the queue ahead of each candidate) among `tiers` (those the request's
        reservation covers)."""
        route = p.view.policy.routes[p.route]
        cands = self.registry.candidates(tiers or p.tiers, p.cached)
        p.candidates = adjust(cands) if adjust is not None else cands
        return p.view.profiles[route.profile].decide(p.rreq, p.candidates)

    def refusal(self, p: Pending, decision: RoutingDecision) -> ApiError | None:
        """The error `decide` raises for this decision (None: it chose a candidate)."""
        return None if decision.chosen is not None else self._no_candidate(p.view.policy, p.rreq, decision)

    def decide(self, p: Pending) -> RoutingDecision:
        decision = self.evaluate(p)
        if decision.chosen is None:
            raise self._no_candidate(p.view.policy, p.rreq, decision)
        p.decision = decision
        return decision

    # --- admit ------------------------------------------------------------------------------
    def tiers_tried(self, decision: RoutingDecision) -> set[str]:
        return {c.tier for c in decision.ranked[: self.max_attempts]}

    async def admit(self, p: Pending, limit: int | None) -> tuple[int | None, Admitted]:
        """Reserve the worst case of the tiers this request may be sent to; -> (the max_tokens to forward when
        the client named none, what admission granted). Without max_tokens, a tenant with limits (or a
        tenant or class with its own `completion_tokens`) gets the reserved completion budget forwarded as
        max_tokens, so no answer can cost more than was reserved; near the end of a budget that budget
        shrinks to what is left (at least `MIN_FLEX_TOKENS`). A tenant without limits and without its own
        default keeps vLLM's behaviour (generate until EOS or the context ends). Then, with accounting, a
        reload that removed every instance the request was routed to meanwhile re-decides it."""
        assert p.decision is not None
        p.aid = self.new_id()
        pol, counts = p.view.policy, p.counts
        spec = pol.tenants[p.tenant]
        cls = pol.slo_classes.get(p.rreq.slo_class)
        default = spec.completion_tokens or (cls.completion_tokens if cls else None)
        tried = self.tiers_tried(p.decision)
        room = min(pol.tiers[t].max_model_len - counts[t] for t in tried)
        budget = limit if limit is not None else max(1, min(default or pol.defaults.completion_tokens, room))
        limited = self.accountant is not None and self.accountant.limited(spec)
        cap = budget if limit is None and (limited or default is not None) else None
        if self.accountant is None:
            return cap, Admitted()
        f = cls.price_factor if cls is not None else 1.0
        reserve = max(cost_units(pol.tiers[t], counts[t], 0, budget, f) for t in tried)
        flex = None
        if cap is not None:
            flex = FlexBudget(prompt_units=max(cost_units(pol.tiers[t], counts[t], 0, 0, f) for t in tried),
                              units_per_token=max(discounted(price_units(pol.tiers[t].prices.output), f)
                                                  for t in tried),
                              wanted=budget, least=min(MIN_FLEX_TOKENS, budget))
        admitted = await self.accountant.admit(p.tenant, p.aid, max(counts[t] for t in tried) + budget, reserve,
                                               pol, flex)
        if cap is not None and admitted.granted is not None:
            cap = admitted.granted
        p.reserved = tuple(t for t in p.tiers if t in tried)
        p.decision = self._after_reload(p, p.reserved)
        if self.recorder is not None:
            self.recorder.begin(p)
        return cap, admitted

    async def coalesce(self, p: Pending) -> str | None:
        """Prefix coalescing (`admission.coalesce`, router/affinity_store.py `claim`): claim the prompt for
        the chosen instance at decision time. When a concurrent request (on any replica) has just claimed
        a longer part of it elsewhere, that instance's expected cached tokens are updated and the request
        decided again among the tiers its reservation covers, so the money objective sends it there unless
        the load or the SLO says otherwise. -> "claimed" (recorded for the choice), "followed" (moved to
        the claimer), "kept" (the claimer is worse), or None (no claim: off, or the index unavailable)."""
        d = p.decision
        if d is None or d.chosen is None or not p.view.policy.admission.coalesce:
            return None
        c = d.chosen
        got = await p.view.affinity.claim(c.tier, c.instance_id, p.cached, p.hashes)
        if got is None:
            return None
        who, tokens = got
        if who == c.instance_id:
            return "claimed"
        p.cached[f"{c.tier}/{who}"] = tokens
        again = self.evaluate(p, tiers=p.reserved or None)
        if again.chosen is None:
            return "kept"
        p.decision = again
        return "followed" if again.chosen.key == f"{c.tier}/{who}" else "kept"

    def _after_reload(self, p: Pending, tiers: tuple[str, ...]) -> RoutingDecision:
        """A reload that removed every instance this request was routed to while it awaited admission:
        decide again, among the tiers its reservation covers (else keep it, and the forwarder answers 503)."""
        decision = p.decision
        assert decision is not None
        ranked = decision.ranked[: self.max_attempts]
        if not ranked or any(self.registry.find(c.tier, c.instance_id) is not None for c in ranked):
            return decision
        profile = p.view.policy.routes[p.route].profile
        again = p.view.profiles[profile].decide(p.rreq, self.registry.candidates(tiers, p.cached))
        return again if again.chosen is not None else decision

    def _no_candidate(self, pol: Policy, rreq: RoutingRequest, decision: RoutingDecision) -> ApiError:
        if decision.rejected and all(v == "context_fits" for v in decision.rejected.values()):
            largest = max(pol.tiers[t].max_model_len for t in rreq.route_tiers)
            prompt = max(rreq.prompt_tokens.values())
            budget = rreq.max_tokens if rreq.max_tokens is not None else 0
            need = f"{prompt} prompt tokens" + (f" + {budget} max_tokens" if budget else "")
            return ApiError(400, f"{need} exceed the largest context available for model "
                                 f"'{rreq.virtual_model}' ({largest} tokens)",
                            param="messages", code="context_length_exceeded")
        if decision.rejected and "slo_feasible" in decision.rejected.values():
            target = f"{rreq.ttft_target_s * 1000:.0f} ms" if rreq.ttft_target_s else "its target"
            return ApiError(503, f"no backend is predicted to meet the TTFT target ({target}) right now",
                            code="slo_unattainable", headers={"Retry-After": "1"})
        return ApiError(503, "no backend instance is available for this model", code="no_backend",
                        headers={"Retry-After": "1"})

    def _degrade(self, pol: Policy, tenant: str) -> frozenset[str] | None:
        spec = pol.tenants[tenant].degrade
        if spec is None or self.accountant is None or not spec.tiers:
            return None
        used = self.accountant.used.get(tenant, 0.0)
        return frozenset(spec.tiers) if used >= spec.at_fraction else None

    def _expected_output(self, route: str) -> float | None:
        e = self.registry.route_output_tokens.get(route)
        return e.value if e is not None and e.samples >= 5 else None

    # --- close out --------------------------------------------------------------------------
    def learn(self, tier: str, uncached: int, ttft_s: float, backlog: int) -> None:
        """Teach the tier's TTFT predictor from a served request (policies/predict.py)."""
        rt = self.registry.tiers.get(tier)
        if rt is None:  # a reload removed the tier while the request ran
            return
        rt.uncached_tokens.add(float(uncached))
        rt.ttft_s.add(ttft_s)
        if backlog == 0 and uncached >= 256 and ttft_s > 0:  # an idle instance: TTFT is prefill time
            rt.prefill_tps.add(uncached / ttft_s)

    def close_out(self, p: Pending, out: Outcome) -> Usage:
        """Bill, learn, count the SLO, settle, metrics and the log line; once per request."""
        p.closed = True
        now = self.clock()
        t0, v = p.t0, p.view
        tier = out.tier or "none"
        usage = out.usage
        if usage is not None:
            prompt, completion, cached = usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
        else:  # no usage from the backend (stream cut): bill what we counted
            prompt = p.counts.get(tier, 0) if out.first_byte_at is not None else 0
            completion, cached = out.streamed_chunks, 0
        cls = v.policy.slo_classes.get(p.rreq.slo_class)
        f = cls.price_factor if cls is not None else 1.0       # the class's discount (a batch class)
        units = cost_units(v.policy.tiers[out.tier], prompt, cached, completion, f) if out.tier is not None else 0
        if out.tier is not None and usage is not None and out.first_byte_at is not None:
            first_token = out.first_token_at if out.first_token_at is not None else out.first_byte_at
            self.learn(out.tier, prompt - cached, first_token - t0 - p.overhead, out.backlog_at_dispatch)
            if out.status == 200:
                self.registry.route_output_tokens.setdefault(p.route, Ewma()).add(float(completion))
                rt = self.registry.tiers.get(out.tier)
                if rt is not None and completion > 1 and out.first_token_at is not None:  # streamed: per token
                    rt.tpot_s.add((now - out.first_token_at) / (completion - 1))
        slo, slo_met = p.rreq, None
        first = out.first_token_at if out.first_token_at is not None else out.first_byte_at
        if slo.ttft_target_s is not None and out.tier is not None and out.status == 200 and first is not None:
            slo_met = first - t0 <= slo.ttft_target_s
            if self.metrics is not None:
                self.metrics.child(self.metrics.slo, out.tier, p.tenant, slo.slo_class or "none",
                                   "met" if slo_met else "missed").inc()
        record = Usage(
            tier=tier, instance=out.instance or "", route=p.route, status=out.status, prompt=prompt, cached=cached,
            completion=completion, cost=units,
            base=cost_units(v.policy.tiers[v.baseline], prompt, cached, completion, f) if units else 0,
            nocache=cost_units(v.policy.tiers[out.tier], prompt, 0, completion, f) if out.tier else 0,
            latency_ms=(now - t0) * 1000, ttft_ms=None if first is None else (first - t0) * 1000, slo_met=slo_met,
            at_ms=p.wall_ms or self.wall_ms(), source="backend" if usage is not None else "counted")
        if self.accountant is not None and p.aid:
            self.accountant.settle(p.tenant, p.aid, record)
        if self.recorder is not None:
            self.recorder.end(p, out, record)
        self._report(p, out, record, now)
        return record

    def _report(self, p: Pending, out: Outcome, u: Usage, now: float) -> None:
        t0, cost = p.t0, usd(u.cost)
        tpot = (now - out.first_token_at) * 1000 / (u.completion - 1) \
            if out.first_token_at is not None and u.completion > 1 and out.status == 200 else None
        if self.metrics is not None:   # the first token: a stream's, or a served body's (all its tokens at once)
            seen = u.ttft_ms is not None and (out.first_token_at is not None or out.status == 200)
            first = u.ttft_ms / 1000 if seen and u.ttft_ms is not None else None
            self.metrics.request_done(out.tier if out.tier is not None else "none", p.tenant, p.route, out.status,
                                      u.prompt, u.cached, u.completion, cost, p.overhead, now - t0,
                                      None if out.first_byte_at is None else out.first_byte_at - t0,
                                      first_token=first, tpot=None if tpot is None else tpot / 1000,
                                      slo_class=p.rreq.slo_class or "none")
        if self.log is None and self.records is None:
            return
        decision = p.decision
        est = served_estimate(decision, out.tier, out.instance)
        if self.records is not None:
            self.records.write(DecisionRecord(
                request_id=p.rid, at_ms=u.at_ms, tenant=p.tenant, route=p.route, slo_class=p.rreq.slo_class,
                decision=decision, tier=out.tier, instance=out.instance, status=out.status, est=est, cost_usd=cost,
                ttft_ms=u.ttft_ms, tpot_ms=tpot, latency_ms=u.latency_ms, prompt_tokens=u.prompt,
                cached_tokens=u.cached, completion_tokens=u.completion, notes=p.notes))
        if self.log is None:
            return
        pred_ttft, pred_tpot = est.get("ttft_s"), est.get("tpot_s")
        self.log.info("request", request_id=p.rid, accounting_id=p.aid or None, tenant=p.tenant, route=p.route,
                      tier=out.tier, instance=out.instance, status=out.status, prompt_tokens=u.prompt,
                      completion_tokens=u.completion, cached_tokens=u.cached, cost_usd=round(cost, 8),
                      ttft_ms=round((out.first_byte_at - t0) * 1000, 2) if out.first_byte_at else None,
                      latency_ms=round((now - t0) * 1000, 2), overhead_ms=round(p.overhead * 1000, 3),
                      attempts=out.attempts, failed=out.failed or None, error=out.error, affinity=p.affinity,
                      expected_cached_tokens=out.expected_cached,
                      decision=decision.summary() if decision is not None else None,
                      slo_class=p.rreq.slo_class, slo_met=u.slo_met,
                      est_cost_usd=round(est["usd"], 9) if "usd" in est else None,
                      pred_ttft_ms=None if pred_ttft is None else round(pred_ttft * 1000, 2),
                      pred_tpot_ms=None if pred_tpot is None else round(pred_tpot * 1000, 3),
                      tpot_ms=None if tpot is None else round(tpot, 3), **p.notes)
