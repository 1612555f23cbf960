"""Bounded resources per request: the body limit, the body reader, the long-tokenization gate's
settings and metrics, and giving memory back after large requests.

**Body limit.** The smaller of the `max_body_bytes` setting (an explicit cap) and a limit derived
from the policy, which no request whose prompt fits a context can exceed:

    derived = max over tiers (max_model_len * JSON_ESCAPE * bytes_per_token(tier's tokenizer)) + JSON_SLACK

`bytes_per_token` is proven from the tokenizer's vocabulary (backends/token_bounds.py: the longest
token in bytes, times 3 where NFC may compose text; Qwen3: 128 * 3 = 384): the most UTF-8 bytes of
prompt text one token can stand for. `JSON_ESCAPE` = 6: one byte of text costs at most 6 bytes in
a JSON string (a control byte as `\\u00XX`; 2-, 3- and 4-byte characters as 6, 6 and 12 bytes).
`JSON_SLACK` (1 MiB) covers what is not prompt text: keys, roles, numbers, whitespace, schemas.
A tier whose tokenizer has no proven bound leaves only the cap. The bound is loose (Qwen3: 2,304
bytes a token), so with the demo's 262,144-token tier the 32 MiB cap decides; a policy whose
largest context is 8,192 tokens gets 19 MiB. The limit follows policy reloads (it is computed
per policy version).

The body is refused with 413 before any of it is read when `Content-Length` says too much, and
while it streams (chunked, no length) as soon as the count passes the limit. The server then
discards the rest of the body (router/http_limits.py bounds how much) so the client reads the 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from typing import Any

from backends.token_bounds import FifoGate
from backends.tokenization import TokenizerCache
from router.errors import ApiError
from router.live_policy import PolicyView
from router.metrics import RouterMetrics
from router.settings import Settings

JSON_ESCAPE = 6
JSON_SLACK = 1024 * 1024

Receive = Callable[[], Any]


def derived_body_limit(view: PolicyView) -> int | None:
    """The policy's bound on a fitting request's body (module doc), or None where a tokenizer has none."""
    worst = 0.0
    for name, tier in view.policy.tiers.items():
        bounds = view.prompts.by_tier[name].bounds
        if bounds is None:
            return None
        worst = max(worst, tier.max_model_len * JSON_ESCAPE * bounds.bytes_per_token)
    return int(worst) + JSON_SLACK


def too_large(limit: int, announced: int | None) -> ApiError:
    size = f"Content-Length {announced}" if announced is not None else "request body"
    return ApiError(413, f"{size} exceeds this router's limit of {limit} bytes (the largest prompt any model "
                         f"here takes, or the max_body_bytes setting)", code="request_too_large")


async def read_body(receive: Receive, content_length: str | None, limit: int) -> bytes:
    """The whole body, or ApiError 413 as soon as it is known to exceed `limit` (before reading it when
    `Content-Length` says so). A client that leaves mid-body gets 499 (logged; nobody reads it)."""
    if content_length is not None:
        try:
            announced = int(content_length)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number", code="invalid_request") from None
        if announced > limit:
            raise too_large(limit, announced)
    chunks: list[bytes] = []
    total = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ApiError(499, "client closed the connection while sending the body", code="client_closed")
        body = msg.get("body", b"")
        if body:
            total += len(body)
            if total > limit:
                raise too_large(limit, None)
            chunks.append(body)
        if not msg.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class RequestLimits:
    """Per-app limits: sizes the tokenizer cache's gate, feeds the metrics, computes the body limit per
    policy version, and trims the allocator after large bodies (`done`)."""

    def __init__(self, settings: Settings, metrics: RouterMetrics, tokenizers: TokenizerCache) -> None:
        self.cap = settings.max_body_bytes
        self.trim_after = settings.malloc_trim_after_bytes
        gate = tokenizers.gate = FifoGate(settings.long_prompt_slots, settings.long_prompt_queue)
        tokenizers.long_chars = settings.long_prompt_chars
        tokenizers.stats.on_chars.append(metrics.tokenized_chars.inc)
        tokenizers.stats.on_refused.append(lambda reason: metrics.child(metrics.prompts_refused, reason).inc())
        metrics.long_prompt_slots.labels("running").set_function(lambda: gate.running)
        metrics.long_prompt_slots.labels("waiting").set_function(lambda: gate.waiting)
        metrics.long_prompt_slots.labels("slots").set_function(lambda: gate.slots)
        gate.on_result.append(lambda result, waited: metrics.long_prompt_done(result, waited))
        self.metrics = metrics
        self._limits: dict[str, int] = {}
        self._trim = Trimmer()

    def body_limit(self, view: PolicyView) -> int:
        got = self._limits.get(view.version)
        if got is None:
            derived = derived_body_limit(view)
            got = self.cap if derived is None else min(self.cap, derived)
            self._limits = {view.version: got}   # only the running policy's
        return got

    async def read(self, receive: Receive, content_length: str | None, view: PolicyView) -> bytes:
        try:
            return await read_body(receive, content_length, self.body_limit(view))
        except ApiError as exc:
            if exc.status == 413:
                how = "content_length" if content_length is not None else "streamed"
                self.metrics.child(self.metrics.bodies_refused, how).inc()
            raise

    def done(self, size: int) -> None:
        """A request whose body had `size` bytes is over: after a large one, give freed memory back."""
        if self.trim_after > 0 and size >= self.trim_after:
            self._trim.request()


class Trimmer:
    """`malloc_trim(0)` on a worker thread after large requests, at most one a second (a burst of large
    requests gets one trim at once and one after it). Why: glibc keeps freed heap memory, and after a
    large buffer is freed it raises its mmap threshold (up to 32 MiB), so the next large buffers land on
    the heap too; a trim hands the free pages of every arena back. Measured with bench/hardening.py
    (8 concurrent 32 MiB bodies): RSS 3 s after them 251 MB without trimming, 174 MB with (209 MB
    before them); `MALLOC_ARENA_MAX=2` alone left 414 MB. One trim of ~600 MB of free heap takes
    ~50 ms of a worker thread. Before trimming it runs a full garbage collection: a failed request's body
    and parsed JSON can sit in a reference cycle through its exception's traceback, and only a collection
    frees them (without it, RSS 3 s after the 8 bodies was 1,024 MB on 2026-12-03; with it 180 MB; a
    young-generation collection alone left 292 MB). The collection holds the GIL while it runs (its
    duration on a busy router is not measured). No-op where libc has no malloc_trim."""

    def __init__(self, min_interval_s: float = 1.0) -> None:
        self._fn = _malloc_trim()
        self.min_interval_s = min_interval_s
        self._pending = False
        self._last = float("-inf")
        self.trims = 0

    def request(self) -> None:
        if self._fn is None or self._pending:
            return
        loop = asyncio.get_running_loop()
        self._pending = True
        loop.call_later(max(0.0, self._last + self.min_interval_s - loop.time()), self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        fut = loop.run_in_executor(None, self._run)
        fut.add_done_callback(lambda f: self._done(loop, f))

    def _done(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
        self._pending = False
        self._last = loop.time()
        self.trims += 1
        if not fut.cancelled():
            fut.exception()

    def _run(self) -> None:
        assert self._fn is not None
        gc.collect()          # the request's body and JSON may sit in reference cycles (tracebacks): free them first
        self._fn(0)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    with contextlib.suppress(OSError, AttributeError):
        fn = ctypes.CDLL(name).malloc_trim
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
        return fn
    return None
