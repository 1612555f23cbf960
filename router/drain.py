"""Graceful drain: what a router does between SIGTERM and its exit.

Timeline, with t = 0 at the signal (`tiergate serve` calls `begin`, then runs `run`):
- at once, `/ready` answers 503 (draining): load balancers and k8s Services stop sending new requests;
- until `grace_s`: new requests are still served, since taking the pod out of every endpoint list takes
  a moment to propagate;
- after `grace_s`: new requests get 503 `draining` with `Connection: close`, so clients go elsewhere;
- until `timeout_s`: requests and streams already running go on;
- at `timeout_s`: streams still running end with an SSE error event and are billed for what was sent
  (`StreamCuts.cut_all`; the forwarder's relay does the ending and the billing);
- then `run` returns and the server shuts down (and `tiergate serve` stops its children).

Nothing here is global: the app factory gets one controller and wires it to its forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import FrameType

import uvicorn
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from router.errors import error_body
from router.logs import get_logger

PROBES = frozenset({"/health", "/ready", "/metrics"})  # answered (and not counted) while draining
_REFUSED = error_body(503, "this router is shutting down; send the request again (another replica takes it)",
                      code="draining")


class StreamCut(Exception):
    """The drain ended this stream (raised by `LiveStream.next_chunk`)."""


class LiveStream:
    """One relayed stream. `expire` ends a read in progress at once (a cancel of the relaying task that
    `next_chunk` recognises as its own and turns into `StreamCut`, as asyncio.timeout does, without
    a timeout object per chunk), or makes the next read raise `StreamCut`."""

    __slots__ = ("_by_cut", "_reader", "cut")

    def __init__(self) -> None:
        self.cut = False
        self._reader: asyncio.Task[object] | None = None   # the relaying task, while it awaits a chunk
        self._by_cut = False

    async def next_chunk(self, chunks: AsyncIterator[bytes]) -> bytes | None:
        """The next upstream chunk (None at the end); raises `StreamCut` once the drain cut this stream."""
        if self.cut:
            raise StreamCut
        self._reader = asyncio.current_task()
        try:
            return await anext(chunks)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            # ours alone (no other cancel pending, e.g. the client leaving): the drain cut the stream
            if self._by_cut and self._reader is not None and self._reader.uncancel() == 0:
                raise StreamCut from None
            raise
        finally:
            self._reader = None

    def expire(self) -> None:
        """Cut. Only the loop's thread calls it, so a set `_reader` is suspended in the read right now."""
        if self.cut:
            return
        self.cut = True
        if self._reader is not None:
            self._by_cut = True
            self._reader.cancel("stream cut by the shutdown drain")


class StreamCuts:
    """The streams being relayed now, which a drain may cut."""

    def __init__(self) -> None:
        self._live: set[LiveStream] = set()

    def open(self) -> LiveStream:
        live = LiveStream()
        self._live.add(live)
        return live

    def close(self, live: LiveStream) -> None:
        self._live.discard(live)

    def cut_all(self) -> int:
        n = 0
        for live in list(self._live):
            if not live.cut:
                live.expire()
                n += 1
        return n

    def __len__(self) -> int:
        return len(self._live)


class DrainController:
    """The drain state of one router process, and the drain itself (see the module doc)."""

    def __init__(self, grace_s: float, timeout_s: float, *, cut_wait_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self.cut_wait_s = cut_wait_s   # after the cut, how long streams get to send their error event
        self.clock = clock
        self.cuts = StreamCuts()
        self.active = 0                # requests being served (streams until their last byte), probes aside
        self.began_at: float | None = None
        self.refused = 0
        self._changed: asyncio.Event | None = None
        self.log = get_logger("tiergate")

    @property
    def draining(self) -> bool:
        return self.began_at is not None

    def begin(self, grace_s: float | None = None) -> bool:
        """Start draining now (False: it already was). Safe in a signal handler: it only sets fields.
        `grace_s` overrides the configured grace (Ctrl-C drains with none)."""
        if self.began_at is not None:
            return False
        if grace_s is not None:
            self.grace_s = grace_s
        self.began_at = self.clock()
        return True

    def refusing(self) -> bool:
        return self.began_at is not None and self.clock() >= self.began_at + self.grace_s

    async def run(self) -> int:
        """Drain (call after `begin`): returns how many streams had to be cut."""
        assert self.began_at is not None, "begin() first"
        began = self.began_at
        self.log.info("drain_started", active=self.active, grace_s=self.grace_s, timeout_s=self.timeout_s)
        await asyncio.sleep(max(0.0, began + self.grace_s - self.clock()))
        self.log.info("drain_refusing_new_requests", active=self.active)
        cut = 0
        if not await self._wait_idle(began + self.timeout_s):
            cut = self.cuts.cut_all()
            self.log.warning("drain_timeout_cut_streams", streams=cut, active=self.active)
            await self._wait_idle(self.clock() + self.cut_wait_s)
        self.log.info("drained", active=self.active, streams_cut=cut, refused=self.refused,
                      seconds=round(self.clock() - began, 3))
        return cut

    async def _wait_idle(self, until: float) -> bool:
        """Wait until no request is running (True) or `until` passes (False)."""
        changed = self._event()
        while self.active > 0:
            left = until - self.clock()
            if left <= 0:
                return False
            changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await changed.wait()
        return True

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _leave(self) -> None:
        self.active -= 1
        if self._changed is not None:
            self._changed.set()

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware: counts the requests being served and refuses new ones once the grace is over."""
        async def drained(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or scope["path"] in PROBES:
                await app(scope, receive, send)
                return
            if self.refusing():
                self.refused += 1
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                        (b"retry-after", b"1"), (b"content-length", str(len(_REFUSED)).encode())]})
                await send({"type": "http.response.body", "body": _REFUSED, "more_body": False})
                return
            self.active += 1
            try:
                await app(scope, receive, send)
            finally:
                self._leave()
        return drained


class DrainingServer(uvicorn.Server):
    """uvicorn, where SIGTERM drains (`DrainController`) instead of closing the listener at once.

    SIGINT (Ctrl-C) drains with no grace. A second signal, or one before the server is up, exits at
    once. Unlike uvicorn's own handling, the signal is not raised again after serving, so the caller
    goes on to stop its children (uvicorn re-raised SIGTERM, which killed the process right there)."""

    def __init__(self, config: uvicorn.Config, drain: DrainController) -> None:
        super().__init__(config)
        self.drain = drain
        self._drain_task: asyncio.Task[int] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler: it only sets fields (the drain itself starts on the next tick)."""
        if self.drain.draining or self.should_exit:
            self.should_exit = self.force_exit = True
        elif not self.started:
            self.should_exit = True
        else:
            self.drain.begin(grace_s=0.0 if sig == signal.SIGINT else None)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and self._drain_task is None:
            self._drain_task = asyncio.create_task(self.drain.run(), name="drain")
        if self._drain_task is not None and self._drain_task.done():
            self.should_exit = True
        return await super().on_tick(counter)
