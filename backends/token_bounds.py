"""Bounds that let the router refuse a prompt without tokenizing all of it, and a fair gate for
long tokenizations.

**Characters per token, proven from the vocabulary.** For a byte-level BPE tokenizer (Qwen2/3,
Llama 3, GPT-2 family) every token stands for a fixed byte string of the normalized text, so with
`B` = the longest token in bytes (model vocabulary and added tokens):

    bytes(normalize(text)) <= n_tokens * B

The normalizer is the identity or NFC. NFC can shrink text: a precomposed character may stand for
up to three characters (U+01D5 = U + diaeresis + macron) and for up to three times its UTF-8 bytes
(U+0390: 2 bytes, 6 bytes decomposed). Any text whose NFC is `t` is canonically equivalent to `t`,
so it has at most `len(NFD(t))` characters and `utf8(NFD(t))` bytes, and per character `c` of `t`:
`len(NFD(c)) <= 1.5 * utf8(c)` and `utf8(NFD(c)) <= 3 * utf8(c)` (maxima over every code point;
tests/test_limits.py checks them). Hence, for the text as the client sent it:

    chars(text) <= n_tokens * B * CHAR_FACTOR        (CHAR_FACTOR = 1.5 with NFC, 1 without)
    utf8(text)  <= n_tokens * B * BYTE_FACTOR        (BYTE_FACTOR = 3 with NFC, 1 without)

so `chars(text) > N * B * CHAR_FACTOR` proves `n_tokens > N`: the direction that is safe is the
*largest* number of characters one token can stand for. Qwen3: B = 128 (a run of 128 spaces),
so more than 192 characters per allowed token can't fit. Tokenizers with other normalizers or
pre-tokenizers that drop text (whitespace splitting) get no bound (None) and are only stopped by
chunked counting.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

CHAR_FACTOR_NFC = 1.5   # max over code points c of len(NFD(c)) / utf8(c)  (U+01D5)
BYTE_FACTOR_NFC = 3.0   # max over code points c of utf8(NFD(c)) / utf8(c)  (U+0390)
_KEEPS_TEXT = frozenset({"ByteLevel", "Digits"})   # pre-tokenizers that never drop characters


class PromptTooLong(Exception):
    """Tokenizing stopped: the text has more than `limit` tokens. `counted` is the count when it
    stopped (a lower bound), or 0 when the characters alone proved it (`chars` of them)."""

    def __init__(self, limit: int, counted: int, chars: int) -> None:
        super().__init__(f"more than {limit} tokens")
        self.limit = limit
        self.counted = counted
        self.chars = chars


@dataclass(frozen=True)
class TokenBounds:
    max_token_bytes: int     # B: the longest token's bytes (vocabulary and added tokens)
    char_factor: float
    byte_factor: float

    @property
    def chars_per_token(self) -> float:
        """No token stands for more characters of the client's text than this."""
        return self.max_token_bytes * self.char_factor

    @property
    def bytes_per_token(self) -> float:
        """No token stands for more UTF-8 bytes of the client's text than this."""
        return self.max_token_bytes * self.byte_factor


def token_bounds(backend: Any) -> TokenBounds | None:
    """The bounds of a `tokenizers.Tokenizer`, or None where none is proven (see the module doc)."""
    try:
        spec = json.loads(backend.to_str())
    except Exception:
        return None
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC") or (spec.get("model") or {}).get("type") != "BPE":
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if "ByteLevel" not in kinds:
        return None
    for p in steps:
        if p.get("type") == "Split" and p.get("behavior") != "Removed":
            continue
        if p.get("type") not in _KEEPS_TEXT:
            return None
    # byte-level vocabularies write each byte as one character, so len() of a token is its bytes
    longest = max((len(tok) for tok in backend.get_vocab(with_added_tokens=False)), default=1)
    added = backend.get_added_tokens_decoder().values() if hasattr(backend, "get_added_tokens_decoder") else ()
    longest = max([longest, *(len(a.content.encode()) for a in added)])
    nfc = normalizer == "NFC"
    return TokenBounds(longest, CHAR_FACTOR_NFC if nfc else 1.0, BYTE_FACTOR_NFC if nfc else 1.0)


class TokenizeStats:
    """Characters handed to the tokenizer and prompts refused early (by reason: chars, tokens), for
    metrics and for tests that prove work was skipped; and the batching stage's work
    (backends/tokenize_batch.py): batches sent to the worker thread, the callers and texts they carried,
    and submissions refused because its queue was full. Updated on the event loop only; the hooks feed
    the metrics."""

    def __init__(self) -> None:
        self.chars = 0
        self.batches = 0
        self.batch_callers = 0
        self.batched_texts = 0
        self.batch_shed = 0
        self.refusals: dict[str, int] = {}
        self.on_chars: list[Callable[[int], None]] = []
        self.on_refused: list[Callable[[str], None]] = []

    def add(self, chars: int) -> None:
        self.chars += chars
        for hook in self.on_chars:
            hook(chars)

    def refused(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        for hook in self.on_refused:
            hook(reason)


class GateFull(Exception):
    """The gate's queue is full: shed the request (503, retry later)."""


class FifoGate:
    """At most `slots` holders at once, the rest served first come first served, at most `queue`
    waiting. A waiter that is cancelled leaves the queue; a slot it was handed passes on.
    `on_result(result, waited_s)` hooks see each "admitted" (with its wait) and "shed"."""

    def __init__(self, slots: int = 2, queue: int = 64) -> None:
        self.slots = max(1, slots)
        self.queue = max(0, queue)
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.on_result: list[Callable[[str, float], None]] = []

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.running < self.slots and not self._waiters:
            self.running += 1
            self._result("admitted", 0.0)
            return
        if len(self._waiters) >= self.queue:
            self._result("shed", 0.0)
            raise GateFull
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():   # handed a slot as we were cancelled: pass it on
                self._release()
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise
        self._result("admitted", loop.time() - t0)

    def _result(self, result: str, waited_s: float) -> None:
        for hook in self.on_result:
            hook(result, waited_s)

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)   # the slot moves to the next waiter; `running` stays
                return
        self.running -= 1
