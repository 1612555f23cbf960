"""Forward one routed request upstream: deadlines, checked answers, retries before the first byte, the
query-of-death guard, then the relay (router/relay.py).

Each attempt (numbers: router/deadlines.py):
  * the first byte must come within the first-byte deadline. For a stream that is its first events,
    through the first one after vLLM's role-only opening event, read and checked (router/sse.py) before
    the client gets its 200; for a response that is not streamed, the whole body, which must decode;
  * before the client has a byte, a timeout, a connect error, a 5xx, a malformed body or event, or the
    backend's error event sends the request to the next candidate: each instance at most once,
    `max_attempts` in all, retries within the retry budget (backends/resilience.py: a retry to an
    idle instance is never refused);
  * success (`record_success`) is recorded after a well-formed answer only: a body that decodes, a
    stream that ended cleanly (router/relay.py, which also ends a stream that stalls or breaks later).
Outlier accounting: connect errors and timeouts count at once. A 5xx (but 503, which says "overloaded"),
a malformed answer or an error event may be the request's fault rather than the instance's, so it is held
pending: counted once the request is served elsewhere or has nowhere else to go, dropped when another
instance refuses the request with a 4xx. A request that fails this way on two instances is a query of
death: it is not retried further, neither failure counts, and the client gets a 502 `query_of_death`.
It is counted in metrics and logged with a hash of the forwarded body, never the body.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import msgspec

from backends.http_client import UpstreamClient, UpstreamConnectError, UpstreamResponse
from backends.registry import InstanceState, Registry
from backends.resilience import RetryBudget, parse_retry_after
from policies.plugins.slo_feasible import queued_requests
from policies.schema import TierSpec
from policies.types import Candidate, RoutingRequest
from router.deadlines import Deadlines
from router.errors import ApiError
from router.lifecycle.core import dispatched, released
from router.logs import get_logger
from router.relay import Outcome, Relay, prefilled
from router.schemas import UsageEnvelope
from router.sse import BadStream, read_head

__all__ = ["RETRYABLE", "Forwarder", "Outcome", "Upstream"]

_usage_dec = msgspec.json.Decoder(UsageEnvelope)
RETRYABLE = frozenset({429, 500, 502, 503, 504})
SUSPECT = frozenset({500, 502, 504})   # 5xx answers that may be the request's fault (503: overloaded)
_TOO_LONG = re.compile(rb"maximum context length|context_length_exceeded|too long", re.I)


@dataclass
class Upstream:
    status: int
    headers: dict[str, str]
    body: bytes | None                       # non-streaming body
    stream: AsyncIterator[bytes] | None      # streaming body


@dataclass
class _Tries:
    """One request's way through its candidates."""

    last: tuple[int, bytes] | None = None   # the last retryable answer
    retry_after: float = 1.0
    free_retry: bool = False                 # the last attempt was a connect error: the next is outside the budget
    too_long: int = 0                        # the largest context a backend has refused this prompt at
    suspects: list[tuple[InstanceState, str]] = field(default_factory=list)  # failures held pending
    refused: bool = False                    # an instance answered 4xx, or the request is a query of death
    on_dispatch: Callable[[Candidate], None] | None = None   # called as each attempt is sent
    propagate: Mapping[str, str] | None = None   # x-request-id, traceparent: sent to every instance tried


class _Attempt:
    """One request on one instance: its load counts, given back exactly once (or handed to the relay)."""

    def __init__(self, inst: InstanceState, prefill: int) -> None:
        self.inst = inst
        self.prefill = prefill
        self.resp: UpstreamResponse | None = None
        self.prefill_done = False
        self.released = False
        self.handed = False    # the relay owns the counts and the response now

    def prefilled(self) -> None:
        if not self.prefill_done:
            self.prefill_done = True
            prefilled(self.inst, self.prefill)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.prefilled()
            released(self.inst)


def _logged(exc: ApiError) -> ApiError:
    exc.logged = True  # the close-out already wrote this request's canonical line
    return exc


class Forwarder(Relay):
    def __init__(self, client: UpstreamClient, registry: Registry, max_attempts: int,
                 on_retry: Callable[[str, str], None], budget: RetryBudget | None = None,
                 drain_s: float = 5.0, deadlines: Deadlines | None = None) -> None:
        super().__init__(registry, drain_s)
        self.budget = budget or RetryBudget(lambda: sum(i.in_flight for i in registry.all_instances()))
        self.client = client
        self.max_attempts = max_attempts
        self.on_retry = on_retry
        self.deadlines = deadlines or Deadlines()
        self.log = get_logger("tiergate.proxy")

    async def send(self, ranked: list[Candidate], path: str, body_for: Callable[[str], bytes], stream: bool,
                   client_wants_usage: bool, out: Outcome, on_done: Callable[[], None],
                   prompt_tokens: dict[str, int] | None = None, slo: RoutingRequest | None = None,
                   on_dispatch: Callable[[Candidate], None] | None = None,
                   propagate: Mapping[str, str] | None = None) -> Upstream:
        """Try candidates in rank order (each at most once) until one answers well-formed with a status
        that is not retried; `slo`: the routing request, whose targets and predictions set the deadlines;
        `on_dispatch(cand)`: called as each attempt is sent (the gateway records the prompt's prefix
        there, so the next request with that prefix finds it while this one is still queued or prefilling)."""
        tries = _Tries(on_dispatch=on_dispatch, propagate=propagate)
        ranked = self._present(ranked, out)
        try:
            for cand in ranked[: self.max_attempts]:
                inst = self._usable(cand, tries, out)
                if inst is None:
                    continue
                slot = self._retry_slot(cand, inst, tries, out)
                if slot is None:
                    break
                try:
                    up = await self._attempt(cand, inst, tries, path, body_for(cand.tier), stream,
                                             client_wants_usage, out, on_done, prompt_tokens, slo,
                                             self._next_tier_may_fit(ranked, cand))
                finally:
                    if slot:
                        self.budget.release()
                if up is not None:
                    return up
                if len(tries.suspects) >= 2:
                    raise self._query_of_death(tries, out, on_done, body_for(tries.suspects[0][0].tier))
            raise self._give_up(tries, out, on_done)
        finally:
            if not tries.refused:   # failures held pending: the request was served elsewhere, or went nowhere
                for inst, _ in tries.suspects:
                    self.count_failure(inst)

    def _present(self, ranked: list[Candidate], out: Outcome) -> list[Candidate]:
        """`ranked` as decided, unless a policy reload or DNS discovery removed some of its instances between
        the decision and now: those leave the list, and their tiers' current instances that serve and were
        not ranked follow it, least loaded first, so a request caught by the swap is served, not refused."""
        find = self.registry.find
        if all(find(c.tier, c.instance_id) is not None for c in ranked):
            return ranked
        kept = [c for c in ranked if find(c.tier, c.instance_id) is not None]
        out.failed.extend(f"{c.key}: removed (a policy reload or DNS discovery)" for c in ranked if c not in kept)
        keys = {c.key for c in kept}
        tiers = tuple(dict.fromkeys(c.tier for c in ranked))
        now = self.registry.clock()
        extra = [c for c in self.registry.candidates(tiers) if c.key not in keys
                 and (i := find(c.tier, c.instance_id)) is not None and i.serving(now)]
        return kept + sorted(extra, key=lambda c: c.in_flight)

    def _usable(self, cand: Candidate, tries: _Tries, out: Outcome) -> InstanceState | None:
        if cand.max_model_len <= tries.too_long:
            return None
        inst = self.registry.find(cand.tier, cand.instance_id)
        if inst is None:
            out.failed.append(f"{cand.key}: removed (a policy reload or DNS discovery)")
        return inst

    def _retry_slot(self, cand: Candidate, inst: InstanceState, tries: _Tries, out: Outcome) -> bool | None:
        """None: the retry budget refuses this retry; True: it holds a budget slot; False: needs none."""
        retrying = out.attempts > 0 and not tries.free_retry  # a connect error cost the failed backend nothing
        tries.free_retry = False
        if not retrying:
            return False
        verdict = self.budget.admit(self._idle(inst))
        if verdict == "denied":
            out.failed.append("retry budget exhausted")
            self.on_retry(cand.tier, "budget_exhausted")
            return None
        return verdict == "slot"

    def _idle(self, inst: InstanceState) -> bool:
        """Serving, and nothing waits there for its first token (backends/resilience.py: retry budget)."""
        return inst.serving(self.registry.clock()) and inst.waiting <= 0 and \
            inst.pending_requests + inst.peer_pending_requests == 0

    async def _attempt(self, cand: Candidate, inst: InstanceState, tries: _Tries, path: str, body: bytes,
                       stream: bool, client_wants_usage: bool, out: Outcome, on_done: Callable[[], None],
                       prompt_tokens: dict[str, int] | None, slo: RoutingRequest | None,
                       may_fall_back: bool) -> Upstream | None:
        """One try on one instance: the answer for the client, or None to try the next candidate."""
        out.attempts += 1
        a = _Attempt(inst, max(0, (prompt_tokens or {}).get(cand.tier, 0) - cand.cached_tokens))
        dispatched(inst, a.prefill)
        if tries.on_dispatch is not None:
            tries.on_dispatch(cand)
        rt = self.registry.tiers.get(cand.tier)
        spec = rt.spec if rt is not None else None
        limit = self.deadlines.first_byte_s(slo, cand, spec)
        if not stream:
            limit = self.deadlines.body_s(slo, cand, limit)
        try:
            async with asyncio.timeout(limit):
                headers = {**inst.headers, **tries.propagate} if tries.propagate else inst.headers
                a.resp = await self.client.post(inst.url + path, body, headers)
                return await self._answer(cand, a, tries, stream, client_wants_usage, out, on_done, slo, spec,
                                          may_fall_back)
        except UpstreamConnectError as exc:
            tries.free_retry = True
            self._failed(cand, inst, out, str(exc), "connect")
        except TimeoutError:
            self._failed(cand, inst, out, f"no {'first byte' if stream else 'answer'} within {limit:.1f} s",
                         "first_byte_timeout")
            self.on_fault(cand.tier, cand.instance_id, "first_byte_timeout")
        except BadStream as exc:   # a stream's first events were malformed, or the backend's error event
            self._suspect(cand, inst, tries, out, f"{exc.kind} SSE event", exc.kind)
        except Exception as exc:   # the answer broke before any byte reached the client
            self._failed(cand, inst, out, f"body {type(exc).__name__}", "body")
        finally:
            if not a.handed:
                a.release()
                if a.resp is not None:
                    await a.resp.close()
        out.tier = out.instance = None
        return None

    def _failed(self, cand: Candidate, inst: InstanceState, out: Outcome, why: str, reason: str) -> None:
        """A failure of the instance, counted at once."""
        self.count_failure(inst)
        out.failed.append(f"{cand.key}:{why}")
        self.on_retry(cand.tier, reason)

    def _suspect(self, cand: Candidate, inst: InstanceState, tries: _Tries, out: Outcome, why: str,
                 kind: str | None = None) -> None:
        """A failure that may be the request's: held pending (see the module doc)."""
        tries.suspects.append((inst, why))
        tries.last = tries.last or (502, b"")
        out.failed.append(f"{cand.key}:{why}")
        self.on_retry(cand.tier, kind or why)
        if kind is not None:
            self.on_fault(cand.tier, cand.instance_id, kind)

    async def _answer(self, cand: Candidate, a: _Attempt, tries: _Tries, stream: bool, client_wants_usage: bool,
                      out: Outcome, on_done: Callable[[], None], slo: RoutingRequest | None,
                      spec: TierSpec | None, may_fall_back: bool) -> Upstream | None:
        resp, inst = a.resp, a.inst
        assert resp is not None
        status = resp.status
        if stream and status == 200:
            return await self._open_stream(cand, a, tries, client_wants_usage, out, on_done, slo, spec)
        raw = await resp.read()
        a.prefilled()
        if status == 400 and may_fall_back and _TOO_LONG.search(raw):
            # context-window fallback: the next tier whose context fits
            tries.too_long = max(tries.too_long, cand.max_model_len)
            out.failed.append(f"{cand.key}:context_length")
            self.on_retry(cand.tier, "context_length")
            tries.last = (400, raw)
            return None
        if status in RETRYABLE:
            self._retryable(cand, inst, tries, resp, raw, out)
            return None
        if status == 200:
            try:
                out.usage = _usage_dec.decode(raw).usage
            except (msgspec.DecodeError, RecursionError):
                self._suspect(cand, inst, tries, out, "malformed JSON body", "malformed")
                return None
        elif 400 <= status < 500:
            tries.refused = True   # the request itself was refused: failures held pending were its own
        self.registry.record_success(inst)
        self._chosen(cand, out, status)
        a.release()
        on_done()
        return Upstream(status, {}, raw, None)

    def _retryable(self, cand: Candidate, inst: InstanceState, tries: _Tries, resp: UpstreamResponse, raw: bytes,
                   out: Outcome) -> None:
        status = resp.status
        if status in SUSPECT:
            tries.suspects.append((inst, f"HTTP {status}"))
        elif status >= 500:
            self.count_failure(inst)
        ra = parse_retry_after(resp.headers.get("retry-after")) if status in (429, 503) else None
        if ra is not None:
            self.registry.cool_down(inst, ra)
            tries.retry_after = max(tries.retry_after, ra)
        out.failed.append(f"{cand.key}:{status}")
        self.on_retry(cand.tier, str(status))
        tries.last = (status, raw)

    async def _open_stream(self, cand: Candidate, a: _Attempt, tries: _Tries, client_wants_usage: bool,
                           out: Outcome, on_done: Callable[[], None], slo: RoutingRequest | None,
                           spec: TierSpec | None) -> Upstream:
        """Read and check the stream's first events (BadStream: the next candidate), then hand it to the relay."""
        assert a.resp is not None
        chunks = a.resp.iter_chunks()
        head, ended = await read_head(chunks)
        self._chosen(cand, out, 200)
        a.handed = True   # the relay gives the counts back, and closes the response
        stall_s = self.deadlines.stall_s(slo, cand, spec)
        return Upstream(200, {}, None, self.relay(a.resp, chunks, head, ended, a.inst, client_wants_usage, out,
                                                  on_done, a.prefill, stall_s))

    @staticmethod
    def _chosen(cand: Candidate, out: Outcome, status: int) -> None:
        out.tier, out.instance, out.status = cand.tier, cand.instance_id, status
        out.expected_cached = cand.cached_tokens
        out.backlog_at_dispatch = queued_requests(cand)
        out.first_byte_at = time.perf_counter()

    def _query_of_death(self, tries: _Tries, out: Outcome, on_done: Callable[[], None], body: bytes) -> ApiError:
        tries.refused = True
        where = ", ".join(f"{i.tier}/{i.instance_id} ({why})" for i, why in tries.suspects)
        digest = hashlib.sha256(body).hexdigest()[:16]
        tier = tries.suspects[0][0].tier
        self.on_fault(tier, "", "query_of_death")
        self.log.warning("query_of_death", tier=tier, instances=[f"{i.tier}/{i.instance_id}" for i, _ in
                                                                 tries.suspects], body_sha256=digest)
        out.status = 502
        out.error = f"query of death: failed on two instances (body sha256 {digest})"
        on_done()
        return _logged(ApiError(502, f"this request failed on two backend instances ({where}) and was not retried "
                                     "further: it looks like a query of death, so neither instance was counted "
                                     "as failing", code="query_of_death", headers={"x-should-retry": "false"}))

    def _give_up(self, tries: _Tries, out: Outcome, on_done: Callable[[], None]) -> ApiError:
        if tries.last is not None and tries.last[0] == 400:  # every larger tier refused the prompt as too long too
            out.status = 400
            on_done()
            return _logged(ApiError(400, "the prompt exceeds the context of every candidate tier "
                                         f"({', '.join(out.failed)})", param="messages",
                                    code="context_length_exceeded"))
        if tries.last is not None:
            status = 429 if tries.last[0] == 429 else 503
            out.status = status
            on_done()
            return _logged(ApiError(status, f"every candidate backend failed ({', '.join(out.failed)})",
                                    code="upstream_unavailable",
                                    headers={"Retry-After": str(max(1, math.ceil(min(tries.retry_after, 60.0))))}))
        out.status = 503
        on_done()
        return _logged(ApiError(503, "no backend could be reached" + (f" ({', '.join(out.failed)})"
                                                                      if out.failed else ""),
                                code="upstream_unavailable", headers={"Retry-After": "1"}))

    def _next_tier_may_fit(self, ranked: list[Candidate], cand: Candidate) -> bool:
        i = ranked.index(cand)
        return any(c.tier != cand.tier and c.max_model_len > cand.max_model_len
                   for c in ranked[i + 1: self.max_attempts])
