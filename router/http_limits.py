"""Connection limits for uvicorn's httptools protocol: header size and count, a header read
timeout, a body idle timeout, and a bound on request body discarded after an early answer.

uvicorn 0.55 has none of these for httptools: llhttp accepts headers of any size (httptools
accumulates a partial value until it ends), and nothing times out a connection that is still
sending its head or its body, only an idle keep-alive connection (`timeout_keep_alive`) and, for
h11 only, `h11_max_incomplete_event_size`. `protocol_class(limits)` returns a subclass of
uvicorn's `HttpToolsProtocol` to pass as `uvicorn.Config(http=...)`:

- **header size**: more than `max_header_bytes` of request line and headers, counted as raw bytes
  while the head is incomplete and as parsed bytes once the parser hands them over, gets 431 and
  the connection is closed; so does a header count over `max_headers`;
- **header timeout**: the head must be complete `header_timeout_s` after the connection opens or
  after the first byte of the next request on it, else 408 and close (slowloris; a connection that
  sent nothing is closed without an answer);
- **body idle**: while a request body is arriving, `body_idle_timeout_s` of silence closes the
  connection (the app reads a disconnect). Silence while the app has paused reading doesn't count;
- **discard**: after the app answered without reading the whole body (413), uvicorn reads and drops
  the rest so that the client can read the answer; past `discard_bytes` the connection is closed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from router.errors import error_body
from router.settings import Settings


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 65_536
    max_headers: int = 100
    header_timeout_s: float = 10.0
    body_idle_timeout_s: float = 30.0
    discard_bytes: int = 32 * 1024 * 1024

    @classmethod
    def from_settings(cls, s: Settings) -> HttpLimits:
        return cls(max_header_bytes=s.http_max_header_bytes, max_headers=s.http_max_headers,
                   header_timeout_s=s.http_header_timeout_s, body_idle_timeout_s=s.http_body_idle_timeout_s,
                   discard_bytes=s.max_body_bytes)


class _Refused(Exception):
    """Raised from a parser callback; uvicorn turns the parser error into `send_400_response`."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[HttpLimits] = HttpLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_open = True           # receiving a request line and headers
        self._head_raw = 0               # raw bytes received while the head is open
        self._head_began = False         # a byte of this head arrived
        self._head_parsed = 0            # url and header bytes the parser handed over
        self._headers_seen = 0
        self._refusal: tuple[int, str, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_open = False
        self._body_seen = 0.0            # loop time of the last data while the body is open
        self._body_timer: asyncio.TimerHandle | None = None
        self._discarded = 0

    # connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_open:
            self._head_raw += len(data)
            self._head_began = True
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._head_open and self._head_raw > self.limits.max_header_bytes:
            self._refuse(431, "request headers exceed the size limit", "request_header_fields_too_large")
        elif self._body_open:
            self._body_seen = self.loop.time()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:   # a limit, raised from a parser callback
            self._close_with(*self._refusal)
        else:
            super().send_400_response(msg)

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._parsed(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers_seen += 1
        if self._headers_seen > self.limits.max_headers:
            self._refusal = (431, f"more than {self.limits.max_headers} request headers",
                             "request_header_fields_too_large")
            raise _Refused
        self._parsed(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = self._head_began = False
        self._head_raw = self._head_parsed = self._headers_seen = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        self._body_open = True
        self._body_seen = self.loop.time()
        if self._body_timer is None and self.limits.body_idle_timeout_s > 0:
            self._body_timer = self.loop.call_later(self.limits.body_idle_timeout_s, self._body_idle)

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:   # answered early: this is dropped
            self._discarded += len(body)
            if self._discarded > self.limits.discard_bytes and not self.transport.is_closing():
                self.transport.close()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_open = False
        self._discarded = 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # limits
    def _parsed(self, n: int) -> None:
        self._head_parsed += n
        if self._head_parsed > self.limits.max_header_bytes:
            self._refusal = (431, "request headers exceed the size limit", "request_header_fields_too_large")
            raise _Refused

    def _arm_head_timer(self) -> None:
        if self.limits.header_timeout_s > 0:
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self._head_open or self.transport.is_closing():
            return
        if self._head_began:
            self._close_with(408, "request headers were not received in time", "request_timeout")
        else:   # a connection that never sent a byte gets no answer, as for an idle keep-alive one
            self.transport.close()

    def _body_idle(self) -> None:
        self._body_timer = None
        if not self._body_open or self.transport.is_closing():
            return
        due = self._body_seen + self.limits.body_idle_timeout_s
        if self.flow.read_paused:   # the app isn't reading: not the client's silence
            self._body_seen = self.loop.time()
            due = self._body_seen + self.limits.body_idle_timeout_s
        if self.loop.time() < due:
            self._body_timer = self.loop.call_at(due, self._body_idle)
            return
        self.transport.close()   # the app's receive() gets http.disconnect

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._refusal = (status, message, code)
        self._close_with(status, message, code)

    def _close_with(self, status: int, message: str, code: str) -> None:
        """Answer `status` with OpenAI's error JSON and close, unless a response is under way."""
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            body = error_body(status, message, code=code)
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head.extend([name, b": ", value, b"\r\n"])
            head.extend([b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                         b"\r\nconnection: close\r\n\r\n", body])
            self.transport.write(b"".join(head))
        self.transport.close()


def protocol_class(limits: HttpLimits) -> type[asyncio.Protocol]:
    """A `LimitedHttpToolsProtocol` class bound to `limits`, for `uvicorn.Config(http=...)`."""
    return type("TiergateHttpProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
