"""Forward one routed request upstream: retries before the first byte, SSE pass-through, usage capture."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec

from backends.http_client import UpstreamClient, UpstreamConnectError, UpstreamResponse
from backends.registry import InstanceState, Registry
from backends.resilience import RetryBudget, parse_retry_after
from policies.plugins.slo_feasible import queued_requests
from policies.types import Candidate
from router.drain import StreamCut, StreamCuts
from router.errors import ApiError, error_body
from router.schemas import Usage, UsageEnvelope

_usage_dec = msgspec.json.Decoder(UsageEnvelope)
_any_dec = msgspec.json.Decoder()
_any_enc = msgspec.json.Encoder()
RETRYABLE = frozenset({429, 500, 502, 503, 504})
_TOO_LONG = re.compile(rb"maximum context length|context_length_exceeded|too long", re.I)
_FIRST_TOKEN = re.compile(rb'"(?:content|text)":\s*"[^"]')  # non-empty text: not the role-only first chunk


@dataclass
class Outcome:
    """What happened to one request; filled as it goes, logged and billed at the end."""

    tier: str | None = None
    instance: str | None = None
    status: int = 0
    usage: Usage | None = None
    streamed_chunks: int = 0
    first_byte_at: float | None = None
    attempts: int = 0
    error: str | None = None
    failed: list[str] = field(default_factory=list)
    expected_cached: int | None = None  # what the affinity index expected on the chosen instance
    backlog_at_dispatch: int = 0        # queued requests the chosen instance had when we sent this one
    first_token_at: float | None = None  # first non-empty token (a stream's first chunk may carry only the role)
    keep_chunk_usage: bool = False       # the client itself asked for continuous usage stats


@dataclass
class Upstream:
    status: int
    headers: dict[str, str]
    body: bytes | None                       # non-streaming body
    stream: AsyncIterator[bytes] | None      # streaming body


def _prefilled(inst: InstanceState, tokens: int) -> None:
    inst.pending_requests -= 1
    inst.pending_tokens -= tokens


def _split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events (each ending in a blank line) at the head of `buf`, and the rest."""
    events: list[bytes] = []
    while True:
        i = buf.find(b"\n\n")
        if i < 0:
            return events, buf
        events.append(buf[: i + 2])
        buf = buf[i + 2:]


def _logged(exc: ApiError) -> ApiError:
    exc.logged = True  # the close-out already wrote this request's canonical line
    return exc


class Forwarder:
    def __init__(self, client: UpstreamClient, registry: Registry, max_attempts: int,
                 on_retry: Callable[[str, str], None], budget: RetryBudget | None = None,
                 drain_s: float = 5.0) -> None:
        self.drain_s = drain_s
        self.drains: set[asyncio.Task[None]] = set()  # abandoned streams being read to their usage
        self.cuts = StreamCuts()  # streams being relayed, which a shutdown drain may cut (router/drain.py)
        self.budget = budget or RetryBudget(lambda: sum(i.in_flight for i in registry.all_instances()))
        self.client = client
        self.registry = registry
        self.max_attempts = max_attempts
        self.on_retry = on_retry

    async def send(self, ranked: list[Candidate], path: str, body_for: Callable[[str], bytes], stream: bool,
                   client_wants_usage: bool, out: Outcome, on_done: Callable[[], None],
                   prompt_tokens: dict[str, int] | None = None) -> Upstream:
        """Try candidates in rank order (each at most once) until one answers with a non-retryable status.

        Retries happen only here, before any byte reaches the client, and only while the
        retry budget allows. A 429/503 with Retry-After cools that instance down."""
        last: tuple[int, bytes] | None = None
        retry_after = 1.0
        prev_connect_error = False
        too_long = 0  # the largest context a backend has refused this prompt at
        for cand in ranked[: self.max_attempts]:
            if cand.max_model_len <= too_long:
                continue
            inst = self.registry.find(cand.tier, cand.instance_id)
            if inst is None:
                out.failed.append(f"{cand.key}: removed by a policy reload")
                continue
            # a connect error cost the failed backend nothing, so its retry is outside the budget
            retrying = out.attempts > 0 and not prev_connect_error
            prev_connect_error = False
            if retrying and not self.budget.try_acquire():
                out.failed.append("retry budget exhausted")
                self.on_retry(cand.tier, "budget_exhausted")
                break
            out.attempts += 1
            inst.in_flight += 1
            prefill = max(0, (prompt_tokens or {}).get(cand.tier, 0) - cand.cached_tokens)
            inst.pending_requests += 1
            inst.pending_tokens += prefill
            try:
                resp = await self.client.post(inst.url + path, body_for(cand.tier),
                                              {"content-type": "application/json"})
            except UpstreamConnectError as exc:
                inst.in_flight -= 1
                _prefilled(inst, prefill)
                prev_connect_error = True
                self.registry.record_failure(inst)
                out.failed.append(f"{cand.key}:{exc}")
                self.on_retry(cand.tier, "connect")
                continue
            finally:
                if retrying:
                    self.budget.release()
            if not (stream and resp.status == 200):  # streams: prefill ends at the first chunk
                _prefilled(inst, prefill)
            if resp.status == 400 and self._next_tier_may_fit(ranked, cand):
                raw = await resp.read()
                if _TOO_LONG.search(raw):  # context-window fallback: the next tier whose context fits
                    too_long = max(too_long, cand.max_model_len)
                    inst.in_flight -= 1
                    out.failed.append(f"{cand.key}:context_length")
                    self.on_retry(cand.tier, "context_length")
                    last = (400, raw)
                    continue
                inst.in_flight -= 1
                self.registry.record_success(inst)
                out.tier, out.instance, out.status = cand.tier, cand.instance_id, resp.status
                out.first_byte_at = time.perf_counter()
                on_done()
                return Upstream(resp.status, {}, raw, None)
            if resp.status in RETRYABLE:
                raw = await resp.read()
                inst.in_flight -= 1
                if resp.status >= 500:
                    self.registry.record_failure(inst)
                ra = parse_retry_after(resp.headers.get("retry-after")) if resp.status in (429, 503) else None
                if ra is not None:
                    self.registry.cool_down(inst, ra)
                    retry_after = max(retry_after, ra)
                out.failed.append(f"{cand.key}:{resp.status}")
                self.on_retry(cand.tier, str(resp.status))
                last = (resp.status, raw)
                continue
            self.registry.record_success(inst)
            out.tier, out.instance, out.status = cand.tier, cand.instance_id, resp.status
            out.expected_cached = cand.cached_tokens
            out.backlog_at_dispatch = queued_requests(cand)
            if stream and resp.status == 200:
                return Upstream(resp.status, {}, None,
                                self._relay(resp, inst, client_wants_usage, out, on_done, prefill))
            try:
                raw = await resp.read()
            except Exception as exc:  # the body broke before any byte reached the client: try the next one
                inst.in_flight -= 1
                self.registry.record_failure(inst)
                out.failed.append(f"{cand.key}:body {type(exc).__name__}")
                out.tier = out.instance = None
                self.on_retry(cand.tier, "body")
                continue
            inst.in_flight -= 1
            out.first_byte_at = time.perf_counter()
            if resp.status == 200:
                try:
                    out.usage = _usage_dec.decode(raw).usage
                except msgspec.DecodeError:
                    out.status = 502
                    out.error = "malformed upstream JSON"
                    on_done()
                    raise _logged(ApiError(502, "the backend returned a malformed response",
                                           code="bad_upstream")) from None
            on_done()
            return Upstream(resp.status, {}, raw, None)
        if last is not None and last[0] == 400:  # every larger tier refused the prompt as too long too
            out.status = 400
            on_done()
            raise _logged(ApiError(400, "the prompt exceeds the context of every candidate tier "
                                        f"({', '.join(out.failed)})", param="messages",
                                   code="context_length_exceeded"))
        if last is not None:
            status, raw = last
            out.status = 503 if status != 429 else 429
            on_done()
            raise _logged(ApiError(503 if status != 429 else 429,
                                   f"every candidate backend failed ({', '.join(out.failed)})",
                                   code="upstream_unavailable",
                                   headers={"Retry-After": str(max(1, math.ceil(min(retry_after, 60.0))))}))
        out.status = 503
        on_done()
        raise _logged(ApiError(503, "no backend could be reached" + (f" ({', '.join(out.failed)})"
                                                                     if out.failed else ""),
                               code="upstream_unavailable", headers={"Retry-After": "1"}))

    async def _relay(self, resp: UpstreamResponse, inst: InstanceState, client_wants_usage: bool, out: Outcome,
                     on_done: Callable[[], None], prefill: int = 0) -> AsyncIterator[bytes]:
        buf = b""
        pending = True
        abandoned = False   # the client went away: _drain closes out instead
        live = self.cuts.open()
        chunks = resp.iter_chunks()
        try:
            while (chunk := await live.next_chunk(chunks)) is not None:
                if out.first_byte_at is None:
                    out.first_byte_at = time.perf_counter()
                if pending and _FIRST_TOKEN.search(chunk):  # the first token: this request's prefill is done
                    pending = False
                    out.first_token_at = time.perf_counter()
                    _prefilled(inst, prefill)
                events, buf = _split_events(buf + chunk)
                pieces = [kept for e in events if (kept := self._keep_event(e, client_wants_usage, out))]
                if pieces:
                    yield b"".join(pieces)
            if buf.strip():
                yield buf
        except StreamCut:
            # the router's shutdown drain ran out of time: end with an error event (no [DONE]); the close
            # below aborts the upstream request and bills the usage of the last chunk relayed
            out.error = "stream cut by the router's shutdown drain"
            out.status = 503
            yield b"data: " + error_body(503, "the router is shutting down and ended this stream before it was "
                                              "complete", code="draining") + b"\n\n"
        except (GeneratorExit, asyncio.CancelledError):
            # the client went away: abort upstream (EOF) and bill what the backend produced until then
            if pending:
                _prefilled(inst, prefill)
            out.error = "client disconnected"
            abandoned = True
            task = asyncio.create_task(self._drain(resp, inst, out, on_done))
            self.drains.add(task)
            task.add_done_callback(self.drains.discard)
            raise
        except Exception as exc:  # upstream broke after the first byte: end with an error event
            out.error = f"upstream stream broke: {type(exc).__name__}"
            out.status = 502
            yield b"data: " + error_body(502, "the backend stream ended unexpectedly", code="upstream_stream_error") \
                + b"\n\n"
        finally:
            self.cuts.close(live)
            if not abandoned:
                if pending:
                    _prefilled(inst, prefill)
                inst.in_flight -= 1
                on_done()   # bill before anything else can be cancelled
                await resp.close()

    async def _drain(self, resp: UpstreamResponse, inst: InstanceState, out: Outcome,
                     on_done: Callable[[], None]) -> None:
        """Abort an abandoned stream and bill exactly what the backend sent before it stopped.

        EOF goes upstream (a half-close); vLLM and the simulator abort the request on it, and
        the chunks they wrote before that still arrive and are read here (at most `drain_s`),
        so the last per-chunk usage (continuous usage stats) is what the backend produced.
        Where half-close is not possible the stream is closed and the last usage seen is billed."""
        buf = b""
        try:
            if resp.half_close():
                async with asyncio.timeout(self.drain_s):
                    async for chunk in resp.iter_chunks():
                        events, buf = _split_events(buf + chunk)
                        for event in events:
                            self._keep_event(event, False, out)
        except Exception:
            pass  # the backend closed after the abort, as expected
        finally:
            inst.in_flight -= 1
            on_done()
            await resp.close()

    def _next_tier_may_fit(self, ranked: list[Candidate], cand: Candidate) -> bool:
        i = ranked.index(cand)
        return any(c.tier != cand.tier and c.max_model_len > cand.max_model_len
                   for c in ranked[i + 1: self.max_attempts])

    @staticmethod
    def _keep_event(event: bytes, client_wants_usage: bool, out: Outcome) -> bytes | None:
        """The event to pass on (None: drop it), noting its usage; per-chunk usage (continuous usage
        stats, asked for by the router for exact billing of cut streams) is removed again."""
        choices = b'"choices":[{' in event
        if choices:
            out.streamed_chunks += 1
        if b'"usage":{' not in event:
            return event
        payload = event[event.find(b"{"):].strip()
        if choices and not out.keep_chunk_usage:  # usage so far on a content chunk: the client did not ask
            try:
                obj = _any_dec.decode(payload)
                usage = msgspec.convert(obj.pop("usage", None), Usage | None)
            except (msgspec.DecodeError, msgspec.ValidationError, AttributeError):
                return event
            if usage is not None:
                out.usage = usage
            return b"data: " + _any_enc.encode(obj) + b"\n\n"
        try:
            env = _usage_dec.decode(payload)
        except msgspec.DecodeError:
            return event
        if env.usage is not None:
            out.usage = env.usage
        # the final usage-only chunk has "choices":[]; drop it when the client did not ask for usage
        return event if client_wants_usage else None
