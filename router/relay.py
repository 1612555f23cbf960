"""Relay one upstream stream to the client after its first events were checked (router/proxy.py).

Bytes pass through untouched, but for the per-chunk usage the router asked for (removed again unless the
client asked) and the final usage chunk (dropped unless the client asked). Every event is checked
(router/sse.py). The stream ends with an OpenAI-style error event (`data: {"error": {...}}`, no
`[DONE]`) when the backend stalls past the stall deadline (router/deadlines.py), sends a malformed event
or breaks, and when the shutdown drain cuts it (router/drain.py); each of the backend's faults counts as
an outlier failure of the instance, and a clean end as a success. Whatever happens, the request is billed
once, for the usage of the last chunk relayed (`on_done`); a client that leaves gets its upstream
request aborted, and the usage produced until then is read and billed (`_drain`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec

from backends.http_client import UpstreamResponse
from backends.registry import InstanceState, Registry
from router.deadlines import Stalled, StallWatch
from router.drain import StreamCut, StreamCuts
from router.errors import error_body
from router.schemas import Usage, UsageEnvelope
from router.sse import FIRST_TOKEN, BadStream, check_event, split_events

_usage_dec = msgspec.json.Decoder(UsageEnvelope)
_any_dec = msgspec.json.Decoder()
_any_enc = msgspec.json.Encoder()


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
    gpu_s: float | None = None           # the engine's exact GPU time for it, where it reports one (the simulator)


def prefilled(inst: InstanceState, tokens: int) -> None:
    inst.pending_requests -= 1
    inst.pending_tokens -= tokens


def _error_event(status: int, message: str, code: str) -> bytes:
    return b"data: " + error_body(status, message, code=code) + b"\n\n"


class Relay:
    """The streams of one forwarder: those being relayed (`cuts`, which a drain may cut) and those whose
    client left (`drains`, read to their usage)."""

    def __init__(self, registry: Registry, drain_s: float) -> None:
        self.registry = registry
        self.drain_s = drain_s
        self.drains: set[asyncio.Task[None]] = set()  # abandoned streams being read to their usage
        self.cuts = StreamCuts()  # streams being relayed, which a shutdown drain may cut (router/drain.py)
        # metrics (RouterMetrics.upstream_fault): (tier, instance, kind), kind one of first_byte_timeout,
        # stall_timeout, malformed, error, broken, query_of_death, ejected
        self.on_fault: Callable[[str, str, str], None] = lambda tier, instance, kind: None

    def count_failure(self, inst: InstanceState) -> None:
        """An outlier failure of the instance (backends/resilience.py)."""
        if self.registry.record_failure(inst):
            self.on_fault(inst.tier, inst.instance_id, "ejected")

    def _backend_fault(self, inst: InstanceState, out: Outcome, status: int, error: str, kind: str) -> None:
        out.error = error
        out.status = status
        self.count_failure(inst)
        self.on_fault(inst.tier, inst.instance_id, kind)

    async def relay(self, resp: UpstreamResponse, chunks: AsyncIterator[bytes], head: bytes, ended: bool,
                    inst: InstanceState, client_wants_usage: bool, out: Outcome, on_done: Callable[[], None],
                    prefill: int, stall_s: float) -> AsyncIterator[bytes]:
        """`head`: what the forwarder read and checked before the client got its 200; `ended`: it was all."""
        buf = b""
        pending = True
        abandoned = clean = False   # abandoned: the client went away, and _drain closes out instead
        live = self.cuts.open()
        watch = StallWatch(stall_s)
        try:
            chunk: bytes | None = head
            while chunk is not None:
                if pending and FIRST_TOKEN.search(chunk):  # the first token: this request's prefill is done
                    pending = False
                    out.first_token_at = time.perf_counter()
                    prefilled(inst, prefill)
                events, buf = split_events(buf + chunk)
                pieces, malformed = self._keep_events(events, client_wants_usage, out)
                if pieces:
                    yield b"".join(pieces)
                if malformed:
                    raise BadStream("malformed")
                chunk = None if ended else await watch.read(live.next_chunk(chunks))
            if buf.strip():
                if check_event(buf) == "malformed":
                    raise BadStream("malformed")
                yield buf
            clean = True
        except StreamCut:
            # the router's shutdown drain ran out of time: end with an error event (no [DONE]); the close
            # below aborts the upstream request and bills the usage of the last chunk relayed
            out.error = "stream cut by the router's shutdown drain"
            out.status = 503
            yield _error_event(503, "the router is shutting down and ended this stream before it was complete",
                               "draining")
        except Stalled:
            self._backend_fault(inst, out, 504, f"upstream stream stalled for {stall_s:.1f} s", "stall_timeout")
            yield _error_event(504, f"the backend sent nothing for {stall_s:.1f} s; the stream was ended",
                               "upstream_timeout")
        except BadStream:
            self._backend_fault(inst, out, 502, "upstream sent a malformed SSE event", "malformed")
            yield _error_event(502, "the backend sent a malformed event; the stream was ended", "bad_upstream")
        except (GeneratorExit, asyncio.CancelledError):
            # the client went away: abort upstream (EOF) and bill what the backend produced until then
            if pending:
                prefilled(inst, prefill)
            abandoned = True
            self._abandon(resp, inst, out, on_done)
            raise
        except Exception as exc:  # upstream broke after the first byte: end with an error event
            self._backend_fault(inst, out, 502, f"upstream stream broke: {type(exc).__name__}", "broken")
            yield _error_event(502, "the backend stream ended unexpectedly", "upstream_stream_error")
        finally:
            watch.close()
            self.cuts.close(live)
            if not abandoned:
                if clean and out.error is None:
                    self.registry.record_success(inst)  # a stream that ended well-formed, with no error event
                if pending:
                    prefilled(inst, prefill)
                await self._close_out(resp, inst, on_done)

    @staticmethod
    async def _close_out(resp: UpstreamResponse, inst: InstanceState, on_done: Callable[[], None]) -> None:
        inst.in_flight -= 1
        on_done()   # bill before anything else can be cancelled
        await resp.close()

    def _abandon(self, resp: UpstreamResponse, inst: InstanceState, out: Outcome, on_done: Callable[[], None]) -> None:
        out.error = "client disconnected"
        task = asyncio.create_task(self._drain(resp, inst, out, on_done))
        self.drains.add(task)
        task.add_done_callback(self.drains.discard)

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
                        events, buf = split_events(buf + chunk)
                        for event in events:
                            self.keep_event(event, False, out)
        except Exception:
            pass  # the backend closed after the abort, as expected (or sent garbage: nothing more to bill)
        finally:
            await self._close_out(resp, inst, on_done)

    @classmethod
    def _keep_events(cls, events: list[bytes], client_wants_usage: bool, out: Outcome) -> tuple[list[bytes], bool]:
        """The events to pass on, up to a malformed one; and whether one was."""
        pieces: list[bytes] = []
        for e in events:
            try:
                kept = cls.keep_event(e, client_wants_usage, out)
            except BadStream:
                return pieces, True
            if kept:
                pieces.append(kept)
        return pieces, False

    @staticmethod
    def keep_event(event: bytes, client_wants_usage: bool, out: Outcome) -> bytes | None:
        """The event to pass on (None: drop it), noting its usage; per-chunk usage (continuous usage
        stats, asked for by the router for exact billing of cut streams) is removed again.
        Raises `BadStream` for a malformed event."""
        choices = b'"choices":[{' in event
        if choices:
            out.streamed_chunks += 1
        if b'"usage":{' not in event:
            kind = check_event(event)
            if kind == "malformed":
                raise BadStream(kind)
            if kind == "error":   # the backend's own error event (then its [DONE]): passed on as it is
                out.error = "the backend sent an error event"
            return event
        payload = event[event.find(b"{"):].strip()
        if choices and not out.keep_chunk_usage:  # usage so far on a content chunk: the client did not ask
            try:
                obj = _any_dec.decode(payload)
                usage = msgspec.convert(obj.pop("usage", None), Usage | None)
            except (msgspec.DecodeError, AttributeError, RecursionError):   # not JSON, or not an object
                raise BadStream("malformed") from None
            except msgspec.ValidationError:
                return event
            if usage is not None:
                out.usage = usage
            return b"data: " + _any_enc.encode(obj) + b"\n\n"
        try:
            env = _usage_dec.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            raise BadStream("malformed") from None
        except msgspec.ValidationError:
            return event
        if env.usage is not None:
            out.usage = env.usage
        # the final usage-only chunk has "choices":[]; drop it when the client did not ask for usage
        return event if client_wants_usage else None
