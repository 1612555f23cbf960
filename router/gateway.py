"""The request pipeline: auth, decode, tokenize, gather candidates, choose, forward, close out.

No framework objects in here: the handler passes raw bytes and a header, and gets
back a `Reply`. Errors are raised as `ApiError` and rendered by the handler.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from backends.http_client import UpstreamClient
from backends.registry import Ewma, Registry
from backends.tokenization import TokenizerCache
from policies.schema import Policy
from policies.types import RoutingDecision, RoutingRequest
from router.accounting import Accountant, Admitted, cost_units
from router.affinity_store import AffinityStore
from router.budget_store import FlexBudget, Usage, price_units, usd
from router.errors import ApiError
from router.live_policy import PolicyView, build_view
from router.logs import get_logger
from router.metrics import RouterMetrics
from router.proxy import Forwarder, Outcome
from router.request_checks import check_nesting, check_request
from router.schemas import HOST_FIELDS, ChatRequest, CompletionRequest
from router.slo import resolve_slo

_decode_any = msgspec.json.Decoder()
MIN_FLEX_TOKENS = 16   # a request without max_tokens is refused rather than given a budget below this
_encode = msgspec.json.Encoder()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes | None = None
    stream: AsyncIterator[bytes] | None = None


def forward_body(body: dict[str, Any], model: str, stream: bool, max_tokens: int | None = None) -> bytes:
    """The client's body for one tier: its model id, host-naming fields dropped, usage asked for, and
    `max_tokens` when the client named none (the completion budget the router reserved)."""
    fwd = {k: v for k, v in body.items() if k not in HOST_FIELDS}
    fwd["model"] = model
    if max_tokens is not None:
        fwd["max_tokens"] = max_tokens
    if stream:
        so = dict(fwd.get("stream_options") or {})
        so["include_usage"] = True
        so["continuous_usage_stats"] = True  # exact billing of streams that end early (vLLM's option)
        fwd["stream_options"] = so
    return _encode.encode(fwd)


def _param_from_path(msg: str) -> str | None:
    i = msg.find(" - at `$")
    if i < 0:
        return None
    return msg[i + 8:].rstrip("`").lstrip(".") or None


class Gateway:
    def __init__(self, policy: Policy, registry: Registry, client: UpstreamClient, metrics: RouterMetrics,
                 tokenizers: TokenizerCache, executor: Any, *, max_attempts: int = 3,
                 expose_decision: bool = False, affinity_store: AffinityStore | None = None,
                 accountant: Accountant | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.view = build_view(policy, registry, tokenizers, executor, affinity_store)  # swapped on reload
        self.expose_decision = expose_decision
        self.accountant = accountant
        self.log = get_logger("tiergate.request")
        self.forwarder = Forwarder(client, registry, max_attempts,
                                   lambda tier, why: metrics.retries.labels(tier, why).inc())

    @property
    def policy(self) -> Policy:
        return self.view.policy

    def tenant(self, authorization: str | None, view: PolicyView | None = None) -> str:
        tenant = (view or self.view).keys.resolve(authorization)
        if tenant is None:
            msg = ("missing API key: send 'Authorization: Bearer <key>'" if not authorization else
                   "invalid API key") + ". Ask this router's operator for a key (they create one with " \
                "`tiergate keys new --tenant NAME`), or, on a trusted network, have them enable `anonymous:` " \
                "in the policy."
            raise ApiError(401, msg, code="invalid_api_key")
        return tenant

    def allowed_models(self, tenant: str, policy: Policy | None = None) -> list[str]:
        pol = policy or self.policy
        spec = pol.tenants[tenant]
        return [m for m in pol.routes if "*" in spec.allowed_models or m in spec.allowed_models]

    async def handle(self, kind: str, raw: bytes, authorization: str | None,
                     request_id: str | None = None, headers: Mapping[str, str] | None = None) -> Reply:
        v = self.view                       # this request's policy, whatever a reload does meanwhile
        tenant = self.tenant(authorization, v)
        try:
            return await self._handle(v, tenant, kind, raw, request_id or uuid.uuid4().hex, headers or {})
        except ApiError as exc:
            exc.tenant = tenant             # the key was valid: the rejection's log line names its tenant
            raise

    @staticmethod
    def _parse(kind: str, raw: bytes) -> tuple[dict[str, Any], ChatRequest | CompletionRequest]:
        check_nesting(raw)
        try:
            body = _decode_any.decode(raw)
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        check_request(body, kind)
        typ: type[ChatRequest] | type[CompletionRequest] = ChatRequest if kind == "chat" else CompletionRequest
        if "model" not in body:
            raise ApiError(400, "field 'model' is required", param="model", code="missing_field")
        if kind == "chat" and "messages" not in body:
            raise ApiError(400, "field 'messages' is required", param="messages", code="missing_field")
        if kind == "completions" and "prompt" not in body:
            raise ApiError(400, "field 'prompt' is required", param="prompt", code="missing_field")
        try:
            req = msgspec.convert(body, typ)
        except msgspec.ValidationError as exc:
            param = _param_from_path(str(exc))
            raise ApiError(400, f"invalid field '{param}': {str(exc).split(' - at ')[0]}", param=param,
                           code="invalid_value") from None
        limit = req.completion_limit
        if limit is not None and limit < 1:
            field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            raise ApiError(400, f"'{field}' must be at least 1", param=field, code="invalid_value")
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
        if isinstance(req, ChatRequest) and not req.messages:
            raise ApiError(400, "'messages' must contain at least one message", param="messages",
                           code="invalid_value")
        return body, req

    def _route(self, v: PolicyView, tenant: str, model: str) -> tuple[str, tuple[str, ...], frozenset[str] | None]:
        """(route name, the tiers this tenant may use in it, the tenant's tiers or None for all)."""
        pol = v.policy
        name = v.models.get(model.lower())
        if name is None:
            raise ApiError(404, f"The model '{model[:200]}' does not exist. Known models: "
                           f"{', '.join(self.allowed_models(tenant, pol))}", param="model", code="model_not_found")
        spec = pol.tenants[tenant]
        if "*" not in spec.allowed_models and name not in spec.allowed_models:
            raise ApiError(403, f"this key may not use model '{model[:200]}'", param="model",
                           code="model_not_allowed")
        tenant_tiers = None if "*" in spec.allowed_tiers else frozenset(spec.allowed_tiers)
        tiers = tuple(t for t in pol.routes[name].tiers if tenant_tiers is None or t in tenant_tiers)
        if not tiers:
            raise ApiError(403, f"this key may not use any tier of model '{model[:200]}'", param="model",
                           code="model_not_allowed")
        return name, tiers, tenant_tiers

    async def _handle(self, v: PolicyView, tenant: str, kind: str, raw: bytes, rid: str,
                      headers: Mapping[str, str]) -> Reply:
        t0 = time.perf_counter()
        pol = v.policy
        slo_class, ttft_target, tpot_target = resolve_slo(pol, tenant, headers)
        body, req = self._parse(kind, raw)
        route_name, tiers, tenant_tiers = self._route(v, tenant, req.model)
        route = pol.routes[route_name]
        limit = req.completion_limit
        if isinstance(req, ChatRequest):
            ids = await v.prompts.chat_ids(tiers, req, body)
        else:
            ids = await v.prompts.completion_ids(tiers, req)
        counts = {t: len(v) for t, v in ids.items()}
        hashes = await v.affinity.hashes(tiers, ids)
        cached, aff_status = await v.affinity.lookup(hashes)
        rreq = RoutingRequest(request_id=rid, tenant=tenant, virtual_model=route_name, route_tiers=tiers,
                              tenant_tiers=tenant_tiers, prompt_tokens=counts, max_tokens=limit,
                              default_completion_tokens=pol.defaults.completion_tokens,
                              slo_class=slo_class, ttft_target_s=ttft_target, tpot_target_s=tpot_target,
                              miss_cost_usd=cls.miss_cost_usd if (cls := pol.slo_classes.get(slo_class)) else 0.0,
                              expected_output_tokens=self._expected_output(route_name),
                              degrade_tiers=self._degrade(pol, tenant))
        decision = v.profiles[route.profile].decide(rreq, self.registry.candidates(tiers, cached))
        if decision.chosen is None:
            raise self._no_candidate(pol, rreq, decision)
        aid = uuid.uuid4().hex  # the accounting id: admission, settlement and the ledger record
        cap, admitted = await self._admit(pol, tenant, aid, decision, counts, limit, slo_class)
        if self.accountant is not None:
            decision = self._after_reload(decision, v, route.profile, rreq,
                                          tuple(t for t in tiers if t in self._tiers_tried(decision)), cached)
        client_wants_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        bodies: dict[str, bytes] = {}

        def body_for(tier: str) -> bytes:
            b = bodies.get(tier)
            if b is None:
                room = None if cap is None else max(1, min(cap, pol.tiers[tier].max_model_len - counts[tier]))
                b = bodies[tier] = forward_body(body, pol.tiers[tier].model, req.stream, room)
            return b

        out = Outcome(keep_chunk_usage=bool(client_wants_usage and req.stream_options
                                            and req.stream_options.continuous_usage_stats))
        overhead = time.perf_counter() - t0
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"

        closed = [False]
        wall_ms = int(time.time() * 1000)

        def done() -> None:
            closed[0] = True
            self._close_out(v, rid, tenant, route_name, counts, out, t0, overhead, decision, aff_status, rreq,
                            aid, wall_ms)

        try:
            up = await self.forwarder.send(decision.ranked, path, body_for, req.stream, client_wants_usage, out,
                                           done, counts, slo=rreq)
        except BaseException:
            if not closed[0]:  # cancelled before any answer (client gone): release the reservation
                out.status = out.status or 499
                out.error = out.error or "client disconnected before the response"
                done()
            raise
        if out.tier is not None and out.instance is not None and up.status == 200:
            v.affinity.record(out.tier, out.instance, hashes)
        headers = {"x-request-id": rid, "x-tiergate-tier": out.tier or "", "x-tiergate-instance": out.instance or "",
                   "x-tiergate-overhead-ms": f"{overhead * 1000:.3f}", **admitted.headers}
        if self.expose_decision:
            headers["x-tiergate-decision"] = _encode.encode(decision.summary()).decode()
        return Reply(up.status, headers, up.body, up.stream)

    def _tiers_tried(self, decision: RoutingDecision) -> set[str]:
        return {c.tier for c in decision.ranked[: self.forwarder.max_attempts]}

    async def _admit(self, pol: Policy, tenant: str, aid: str, decision: RoutingDecision, counts: dict[str, int],
                     limit: int | None, slo_class: str) -> tuple[int | None, Admitted]:
        """Reserve the worst case of the tiers this request may be sent to; -> (the max_tokens to forward when
        the client named none, what admission granted). Without max_tokens, a tenant with limits (or a
        tenant or class with its own `completion_tokens`) gets the reserved completion budget forwarded as
        max_tokens, so no answer can cost more than was reserved; near the end of a budget that budget
        shrinks to what is left (at least `MIN_FLEX_TOKENS`). A tenant without limits and without its own
        default keeps vLLM's behaviour (generate until EOS or the context ends)."""
        spec = pol.tenants[tenant]
        cls = pol.slo_classes.get(slo_class)
        default = spec.completion_tokens or (cls.completion_tokens if cls else None)
        tried = self._tiers_tried(decision)
        room = min(pol.tiers[t].max_model_len - counts[t] for t in tried)
        budget = limit if limit is not None else max(1, min(default or pol.defaults.completion_tokens, room))
        limited = self.accountant is not None and self.accountant.limited(spec)
        cap = budget if limit is None and (limited or default is not None) else None
        if self.accountant is None:
            return cap, Admitted()
        reserve = max(cost_units(pol.tiers[t], counts[t], 0, budget) for t in tried)
        flex = None
        if cap is not None:
            flex = FlexBudget(prompt_units=max(cost_units(pol.tiers[t], counts[t], 0, 0) for t in tried),
                              units_per_token=max(price_units(pol.tiers[t].prices.output) for t in tried),
                              wanted=budget, least=min(MIN_FLEX_TOKENS, budget))
        admitted = await self.accountant.admit(tenant, aid, max(counts[t] for t in tried) + budget, reserve, pol,
                                               flex)
        if cap is not None and admitted.granted is not None:
            cap = admitted.granted
        return cap, admitted

    def _after_reload(self, decision: RoutingDecision, v: PolicyView, profile: str, rreq: RoutingRequest,
                      tiers: tuple[str, ...], cached: dict[str, int]) -> RoutingDecision:
        """A reload that removed every instance this request was routed to while it awaited admission:
        decide again, among the tiers its reservation covers (else keep it, and the forwarder answers 503)."""
        ranked = decision.ranked[: self.forwarder.max_attempts]
        if not ranked or any(self.registry.find(c.tier, c.instance_id) is not None for c in ranked):
            return decision
        again = v.profiles[profile].decide(rreq, self.registry.candidates(tiers, cached))
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

    def _learn(self, tier: str, uncached: int, ttft_s: float, backlog: int) -> None:
        """Teach the tier's TTFT predictor from a served request (see policies/plugins/slo_feasible.py)."""
        rt = self.registry.tiers.get(tier)
        if rt is None:  # a reload removed the tier while the request ran
            return
        rt.uncached_tokens.add(float(uncached))
        rt.ttft_s.add(ttft_s)
        if backlog == 0 and uncached >= 256 and ttft_s > 0:  # an idle instance: TTFT is prefill time
            rt.prefill_tps.add(uncached / ttft_s)

    def _close_out(self, v: PolicyView, rid: str, tenant: str, route: str, counts: dict[str, int], out: Outcome,
                   t0: float, overhead: float, decision: RoutingDecision, affinity: str = "off",
                   rreq: RoutingRequest | None = None, aid: str | None = None, wall_ms: int = 0) -> None:
        now = time.perf_counter()
        tier = out.tier or "none"
        usage = out.usage
        if usage is not None:
            prompt, completion, cached = usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
        else:  # no usage from the backend (stream cut): bill what we counted
            prompt = counts.get(tier, 0) if out.first_byte_at is not None else 0
            completion, cached = out.streamed_chunks, 0
        units = cost_units(v.policy.tiers[out.tier], prompt, cached, completion) if out.tier is not None else 0
        cost = usd(units)
        if out.tier is not None and usage is not None and out.first_byte_at is not None:
            first_token = out.first_token_at if out.first_token_at is not None else out.first_byte_at
            self._learn(out.tier, prompt - cached, first_token - t0 - overhead, out.backlog_at_dispatch)
            if out.status == 200:
                self.registry.route_output_tokens.setdefault(route, Ewma()).add(float(completion))
                rt = self.registry.tiers.get(out.tier)
                if rt is not None and completion > 1 and out.first_token_at is not None:  # streamed: per token
                    rt.tpot_s.add((now - out.first_token_at) / (completion - 1))
        slo, slo_met = rreq, None
        first = out.first_token_at if out.first_token_at is not None else out.first_byte_at
        if slo is not None and slo.ttft_target_s is not None and out.tier is not None and out.status == 200 \
                and first is not None:
            slo_met = first - t0 <= slo.ttft_target_s
            self.metrics.child(self.metrics.slo, out.tier, tenant, slo.slo_class or "none",
                               "met" if slo_met else "missed").inc()
        if self.accountant is not None and aid is not None:
            first_ms = None if first is None else (first - t0) * 1000
            self.accountant.settle(tenant, aid, Usage(
                tier=tier, instance=out.instance or "", route=route, status=out.status, prompt=prompt, cached=cached,
                completion=completion, cost=units,
                base=cost_units(v.policy.tiers[v.baseline], prompt, cached, completion) if units else 0,
                nocache=cost_units(v.policy.tiers[out.tier], prompt, 0, completion) if out.tier else 0,
                latency_ms=(now - t0) * 1000, ttft_ms=first_ms, slo_met=slo_met,
                at_ms=wall_ms or int(time.time() * 1000),
                source="backend" if usage is not None else "counted"))
        self.metrics.request_done(tier if out.tier is not None else "none", tenant, route, out.status, prompt,
                                  cached, completion, cost, overhead, now - t0,
                                  None if out.first_byte_at is None else out.first_byte_at - t0)
        self.log.info("request", request_id=rid, accounting_id=aid, tenant=tenant, route=route, tier=out.tier,
                      instance=out.instance, status=out.status, prompt_tokens=prompt,
                      completion_tokens=completion, cached_tokens=cached, cost_usd=round(cost, 8),
                      ttft_ms=round((out.first_byte_at - t0) * 1000, 2) if out.first_byte_at else None,
                      latency_ms=round((now - t0) * 1000, 2), overhead_ms=round(overhead * 1000, 3),
                      attempts=out.attempts, failed=out.failed or None, error=out.error, affinity=affinity,
                      expected_cached_tokens=out.expected_cached,
                      decision=decision.summary(), slo_class=slo.slo_class if slo else None,
                      slo_met=slo_met)
