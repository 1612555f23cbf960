"""The live driver of the request lifecycle: auth, decode, tokenize, then the core, and the forwarding.

No framework objects in here: the handler passes raw bytes and a header, and gets
back a `Reply`. Errors are raised as `ApiError` and rendered by the handler. Gathering
candidates, deciding, admission and the close-out (billing, learning, settling, the
canonical log line) are the sans-I/O core's (router/lifecycle/core.py), which
`tiergate replay` runs too; this module keeps parsing, auth, tokenization and the
HTTP forwarding (router/proxy.py). Around the core: the dry-run (`dry_run`: parse, route, tokenize,
gather and decide exactly as a live request, no admission and no forwarding), the explain document
(`x-tiergate-explain: 1`, router/explain.py) and the shadow policy (router/shadow.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from backends.http_client import UpstreamClient
from backends.registry import Registry
from backends.tokenization import TokenizerCache
from policies.schema import Policy
from policies.types import Candidate, RoutingDecision
from router.accounting import Accountant
from router.admission.live import LiveGate
from router.affinity_store import AffinityStore
from router.errors import ApiError
from router.explain import decision_doc, header_value, wants_explain, with_explain
from router.lifecycle.core import Lifecycle, Pending, allowed_models
from router.lifecycle.records import RecordSink
from router.live_policy import PolicyView, build_view
from router.load_sync import LoadSync
from router.logs import get_logger
from router.metrics import RouterMetrics
from router.proxy import Forwarder, Outcome
from router.request_checks import check_nesting, check_request
from router.schemas import HOST_FIELDS, ChatRequest, CompletionRequest
from router.shadow import Shadow
from router.slo import resolve_slo
from router.trace_context import propagation
from router.tracing import Tracing, trace_close, trace_phases

__all__ = ["Gateway", "Reply", "forward_body"]

_decode_any = msgspec.json.Decoder()
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
                 accountant: Accountant | None = None, records: RecordSink | None = None,
                 shadow: Shadow | None = None, explain_max_candidates: int = 16,
                 gate: LiveGate | None = None, load_sync: LoadSync | None = None,
                 tracing: Tracing | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self.view = build_view(policy, registry, tokenizers, executor, affinity_store)  # swapped on reload
        self.expose_decision = expose_decision
        self.accountant = accountant
        self.log = get_logger("tiergate.request")
        self.forwarder = Forwarder(client, registry, max_attempts,
                                   lambda tier, why: metrics.retries.labels(tier, why).inc())
        # the request lifecycle (router/lifecycle/core.py), the same code `tiergate replay` runs
        self.core = Lifecycle(registry, accountant=accountant, metrics=metrics, max_attempts=max_attempts,
                              log=self.log, records=records)
        self.shadow = shadow
        self.gate = gate
        self.load_sync = load_sync
        self.tracing = tracing           # None: off (router/tracing.py)
        self.explain_max_candidates = explain_max_candidates

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
        return allowed_models(policy or self.policy, tenant)

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

    async def _prepare(self, v: PolicyView, tenant: str, kind: str, raw: bytes, rid: str,
                       headers: Mapping[str, str]) -> tuple[dict[str, Any], ChatRequest | CompletionRequest,
                                                            Pending, dict[str, Any]]:
        """Parse, route, tokenize, start and gather: what the live path and the dry-run share."""
        core = self.core
        t0 = core.clock()
        slo = resolve_slo(v.policy, tenant, headers)
        body, req = self._parse(kind, raw)
        route_name, tiers, tenant_tiers = core.route(v, tenant, req.model)
        if isinstance(req, ChatRequest):
            ids = await v.prompts.chat_ids(tiers, req, body)
        else:
            ids = await v.prompts.completion_ids(tiers, req)
        counts = {t: len(v) for t, v in ids.items()}
        hashes = await v.affinity.hashes(tiers, ids)
        p = core.start(v, rid, tenant, route_name, tiers, tenant_tiers, counts, req.completion_limit, slo, t0)
        ls = self.load_sync
        if ls is not None and ls.needs_refresh():   # idle until now: the peers' load, beside the lookup
            await asyncio.gather(core.gather(p, hashes), ls.refresh())
        else:
            await core.gather(p, hashes)
            if ls is not None:
                ls.wake()
        return body, req, p, hashes

    def explain(self, v: PolicyView, p: Pending, decision: RoutingDecision) -> dict[str, Any]:
        return decision_doc(decision, p.candidates, p.rreq, profile=v.policy.routes[p.route].profile,
                            policy_version=v.version, max_candidates=self.explain_max_candidates)

    async def dry_run(self, v: PolicyView, tenant: str, kind: str, raw: bytes, rid: str,
                      headers: Mapping[str, str]) -> dict[str, Any]:
        """The decision a live request with this body would get now: no admission, no forwarding, nothing
        recorded. Where no candidate survives, `error` holds the refusal the live path would answer."""
        _, _, p, _ = await self._prepare(v, tenant, kind, raw, rid, headers)
        decision = self.core.evaluate(p)
        doc = self.explain(v, p, decision)
        refusal = self.core.refusal(p, decision)
        if refusal is not None:
            doc["error"] = {"status": refusal.status, **_decode_any.decode(refusal.body())["error"]}
        return doc

    async def _handle(self, v: PolicyView, tenant: str, kind: str, raw: bytes, rid: str,
                      headers: Mapping[str, str]) -> Reply:
        core = self.core
        pol = v.policy
        body, req, p, hashes = await self._prepare(v, tenant, kind, raw, rid, headers)
        t0, counts, limit = p.t0, p.counts, req.completion_limit
        tr = self.tracing.begin(kind, req.model, headers, t0, t1 := core.clock()) if self.tracing else None
        live = core.decide(p)
        if self.shadow is not None:
            self.shadow.observe(p, live)     # never raises, never changes `live`
        t2 = core.clock() if tr else 0.0
        cap, admitted = await core.admit(p, limit)
        if tr is not None:   # the phases so far, timed by the router's clock (router/tracing.py)
            trace_phases(tr, p, t0, t1, t2, core.clock())
        decision = p.decision
        assert decision is not None
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
        p.overhead = core.clock() - t0
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        p.wall_ms = core.wall_ms()

        def done() -> None:
            if tr is None:
                core.close_out(p, out)
            else:
                trace_close(tr, core, self.registry, p, out, pol, limit)

        claim = await core.coalesce(p)      # a new prefix: claimed now, or follow who just claimed it
        decision = p.decision or decision
        if claim is not None:
            tier = decision.chosen.tier if decision.chosen is not None else "none"
            self.metrics.child(self.metrics.coalesced, tier, claim).inc()
            p.notes["claim"] = claim
        claimed = decision.chosen.key if claim == "claimed" and decision.chosen is not None else None

        def on_dispatch(c: Candidate) -> None:   # the claim recorded the first choice already
            if c.key != claimed:
                v.affinity.record(c.tier, c.instance_id, hashes)

        try:
            if self.gate is not None:   # prefill windows and the queue (router/admission/live.py)
                await self.gate.admit(core, p)
                decision = p.decision or decision
            propagate = propagation(rid, headers)
            if tr is not None:
                tr.upstream(core.clock(), propagate)
            up = await self.forwarder.send(decision.ranked, path, body_for, req.stream, client_wants_usage, out,
                                           done, counts, slo=p.rreq, on_dispatch=on_dispatch, propagate=propagate)
        except BaseException as exc:
            if not p.closed:  # shed, or cancelled before any answer (client gone): release the reservation
                if isinstance(exc, ApiError):
                    out.status, out.error = exc.status, exc.message
                out.status = out.status or 499
                out.error = out.error or "client disconnected before the response"
                done()
            raise
        reply_headers = {"x-request-id": rid, "x-tiergate-tier": out.tier or "",
                         "x-tiergate-instance": out.instance or "",
                         "x-tiergate-overhead-ms": f"{p.overhead * 1000:.3f}", **admitted.headers}
        if self.expose_decision:
            reply_headers["x-tiergate-decision"] = _encode.encode(decision.summary()).decode()
        stream = up.stream
        if wants_explain(headers):
            doc = self.explain(v, p, decision)
            doc["served"] = f"{out.tier}/{out.instance}" if out.tier is not None else None
            if stream is not None:
                stream = with_explain(stream, doc, kind)
            else:
                reply_headers["x-tiergate-explain"] = header_value(doc)
        return Reply(up.status, reply_headers, up.body, stream)
