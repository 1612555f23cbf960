"""OpenTelemetry traces of routed requests, off by default (`TIERGATE_TRACING=otlp` turns them on).

Off, the request path holds `None` and checks it once per request: no span objects, no clock reads
beyond those the router takes anyway (bench/overhead.py measures it). On:

* One trace per request: a SERVER span named `{operation} {model}` (GenAI semantic conventions:
  `gen_ai.operation.name` chat | text_completion, `gen_ai.request.model` as the client asked,
  `gen_ai.response.model` the tier's model, `gen_ai.provider.name` vllm, `gen_ai.usage.input_tokens`,
  `gen_ai.usage.output_tokens`, `gen_ai.request.max_tokens`, `http.response.status_code`,
  `error.type` on failure) plus `tiergate.*` (tenant, route, tier, instance, cached tokens, cost, slo
  class). It continues the client's W3C `traceparent` when one came in.
* Children: `tokenize` (parse, route and exact tokenization), `decide` (the policy pipeline),
  `admit` (budget admission in Redis), `upstream` (a CLIENT span from the first attempt to the last
  byte, with `server.address`/`server.port` and `tiergate.attempts`; its context is what vLLM gets
  in `traceparent`, so the engine's own spans hang below it), and `settle` (billing handed to the
  batched settlement writer; the Redis write itself is shared by many requests).
  The phases are timed by the router's own clock and recorded after the fact with explicit
  timestamps, so only the request and upstream spans live while the request runs.

Export: OTLP over HTTP (`opentelemetry-exporter-otlp-proto-http`), configured by the standard
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_HEADERS`
variables, through a BatchSpanProcessor (its own thread, never the event loop). `OTEL_SERVICE_NAME`
names the service (default tiergate); `TIERGATE_TRACING_SAMPLE_RATIO` (default 1.0) samples root
traces, and a sampled-in client parent is honoured (ParentBased). Needs `pip install tiergate[tracing]`.
No prompt or completion text is ever put on a span.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from router.logs import get_logger

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

    from backends.registry import Registry
    from policies.schema import Policy
    from router.lifecycle.core import Lifecycle, Pending
    from router.relay import Outcome


class Tracing:
    """A tracer of the app's own (no global provider is set)."""

    def __init__(self, processor: SpanProcessor, sample_ratio: float = 1.0, service: str | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service or os.environ.get("OTEL_SERVICE_NAME", "tiergate")}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
        self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("tiergate")
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_settings(cls, mode: str, sample_ratio: float) -> Tracing | None:
        """`mode`: off (None) or otlp; ValueError for anything else, or when the packages are missing."""
        if mode == "off":
            return None
        if mode != "otlp":
            raise ValueError(f"tracing must be off or otlp, not {mode!r}")
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise ValueError("tracing=otlp needs the OpenTelemetry packages: pip install 'tiergate[tracing]'") \
                from exc
        return cls(BatchSpanProcessor(OTLPSpanExporter()), sample_ratio)

    def begin(self, kind: str, model: str, headers: Mapping[str, str], started: float, now: float) -> RequestTrace:
        """The request's trace; `started`, `now`: the router's clock at arrival and now."""
        return RequestTrace(self, kind, model, headers, started, now)

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking: call from a thread)."""
        self.provider.shutdown()


class RequestTrace:
    def __init__(self, tracing: Tracing, kind: str, model: str, headers: Mapping[str, str], started: float,
                 now: float) -> None:
        from opentelemetry import trace

        self._trace = trace
        self.t = tracing
        self._epoch_ns = time.time_ns() - int(now * 1e9)    # the router's clock -> Unix ns
        op = "chat" if kind == "chat" else "text_completion"
        parent = tracing.propagator.extract(carrier=dict(headers))
        self.root = tracing.tracer.start_span(
            f"{op} {model}", context=parent, kind=trace.SpanKind.SERVER, start_time=self.ns(started),
            attributes={"gen_ai.operation.name": op, "gen_ai.request.model": model, "gen_ai.provider.name": "vllm"})
        self._ctx = trace.set_span_in_context(self.root)
        self.upstream_span: Any = None

    def ns(self, t: float) -> int:
        return self._epoch_ns + int(t * 1e9)

    def phase(self, name: str, start: float, end: float, **attributes: Any) -> None:
        """A finished child span, timed by the router's clock."""
        span = self.t.tracer.start_span(name, context=self._ctx, start_time=self.ns(start),
                                        attributes={k: v for k, v in attributes.items() if v is not None})
        span.end(end_time=self.ns(end))

    def upstream(self, now: float, propagate: dict[str, str]) -> None:
        """Start the upstream span and put its context in the headers vLLM gets."""
        self.upstream_span = self.t.tracer.start_span(
            "upstream", context=self._ctx, kind=self._trace.SpanKind.CLIENT, start_time=self.ns(now))
        propagate.pop("traceparent", None)
        propagate.pop("tracestate", None)
        self.t.propagator.inject(carrier=propagate, context=self._trace.set_span_in_context(self.upstream_span))

    def finish(self, p: Pending, out: Outcome, model: str | None, max_tokens: int | None, start: float,
               end: float, url: str | None) -> None:
        """End every span: `start`/`end` of the settle step; `url` of the instance that answered."""
        self.phase("settle", start, end, **{"tiergate.accounting_id": p.aid or None})
        u = out.usage
        attrs: dict[str, Any] = {
            "gen_ai.response.model": model, "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.usage.input_tokens": u.prompt_tokens if u else None,
            "gen_ai.usage.output_tokens": u.completion_tokens if u else None,
            "http.response.status_code": out.status or None, "tiergate.tenant": p.tenant, "tiergate.route": p.route,
            "tiergate.tier": out.tier, "tiergate.instance": out.instance, "tiergate.attempts": out.attempts,
            "tiergate.cached_tokens": u.cached_tokens if u else None, "tiergate.slo_class": p.rreq.slo_class}
        if out.status >= 400 or out.error:
            attrs["error.type"] = str(out.status or "error")
            self.root.set_status(self._trace.Status(self._trace.StatusCode.ERROR, out.error or None))
        if self.upstream_span is not None:
            if url:
                parts = urlsplit(url)
                self.upstream_span.set_attributes({"server.address": parts.hostname or "",
                                                   "server.port": parts.port or 80})
            self.upstream_span.set_attributes({"tiergate.attempts": out.attempts,
                                               "http.response.status_code": out.status or 0})
            self.upstream_span.end(end_time=self.ns(start))
        self.root.set_attributes({k: v for k, v in attrs.items() if v is not None})
        self.root.end(end_time=self.ns(end))


def trace_phases(tr: RequestTrace, p: Pending, t0: float, t1: float, t2: float, t3: float) -> None:
    """tokenize [t0, t1), decide [t1, t2), admit [t2, t3); a tracing fault never reaches the request."""
    try:
        tr.phase("tokenize", t0, t1, **{"gen_ai.usage.input_tokens": max(p.counts.values(), default=None)})
        tr.phase("decide", t1, t2, **{"tiergate.candidates": len(p.candidates), "tiergate.affinity": p.affinity})
        tr.phase("admit", t2, t3, **{"tiergate.reserved_tiers": ",".join(p.reserved) or None})
    except Exception as exc:   # tracing must not fail a request
        get_logger("tiergate.tracing").warning("tracing_failed", error=type(exc).__name__)


def trace_close(tr: RequestTrace, core: Lifecycle, registry: Registry, p: Pending, out: Outcome, pol: Policy,
                max_tokens: int | None) -> None:
    """The request's close-out (billing, metrics, its log line), timed as `settle`, then the trace's end."""
    start = core.clock()
    core.close_out(p, out)
    end = core.clock()
    try:
        inst = registry.find(out.tier, out.instance) if out.tier and out.instance else None
        model = pol.tiers[out.tier].model if out.tier in pol.tiers else None
        tr.finish(p, out, model, max_tokens, start, end, inst.url if inst is not None else None)
    except Exception as exc:
        get_logger("tiergate.tracing").warning("tracing_failed", error=type(exc).__name__)
