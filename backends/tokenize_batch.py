"""Batched tokenization under load: the texts of concurrent requests go to one `encode_batch` call.

`tokenizers`' `encode_batch` releases the GIL, so a batch encoded in a worker thread costs the event
loop one thread round trip (~35 µs of loop time, ~45 µs more wall time than inline) however many texts
it carries, where encoding a text on the loop costs ~170 ns a character (Qwen3; bench/tokenize_batch.py).
There is no timed window: a batch forms only from texts that arrive while the previous one is being
encoded.

Algorithm (one `EncodeBatcher` per tokenizer and event loop; its state lives on the loop):

* A caller submits texts (one prompt, or a chat's uncached segments) and gets exactly its own ids
  back, one list per text, in order.
* No batch in flight and the submission has at most `inline_chars` characters: it is encoded at
  once on the event loop. Nothing else waits, so the window closes at once; the round trip would
  save the loop at most ~0.15 ms and cost this request ~45 µs.
* No batch in flight and more characters: it goes to the executor alone, as a batch of one.
* A batch in flight: the submission queues. When the batch finishes, its callers get their ids and
  the queue leaves as the next batch: ONE `encode_batch_fast` (else `encode_batch`) call over the
  texts of the queued submissions in arrival order, up to `batch_chars` characters (at least one
  submission); the rest waits for the batch after. At most one batch is in flight per tokenizer, so
  one worker thread tokenizes while the loop keeps serving, and a text that queues waits at most
  about two batches' time when the queue is short.
* Bound: at most `queue_chars` characters wait (an empty submission counts one). A submission that
  would pass the bound is refused at once with `TokenizerBusy` unless the queue is empty (so one
  larger than the bound can still run): the router answers 503 `tokenizer_busy` with Retry-After,
  as for a full long-prompt queue. Shedding, rather than waiting or encoding on the loop, keeps
  both the memory and the delay of the queue bounded while the worker can't keep up.
* Errors: a batch whose `encode_batch` raises is encoded again submission by submission in the
  worker thread, so an error reaches only the caller whose text caused it.
* Cancellation: a cancelled waiter leaves the queue (its characters with it); a cancelled caller
  whose batch is in flight has its result dropped. The other callers are not affected.

Parameters (`BatchLimits`): `inline_chars` = 1,024 (~0.17 ms of loop time), `batch_chars` = 32,768
(~5 ms of worker time: the most a short text arriving during a batch waits for it; it equals the
largest text the batcher takes, backends/tokenization.py PIECE_CHARS), `queue_chars` = 1,048,576
(~150 ms of worker time waiting).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from backends.token_bounds import GateFull, TokenizeStats

EncodeFn = Callable[[list[str]], list[list[int]]]   # texts -> ids per text; releases the GIL while it works
Outcome = list[list[int]] | BaseException


class TokenizerBusy(GateFull):
    """The tokenization queue is full (`BatchLimits.queue_chars`): shed the request (503, retry later)."""


@dataclass(frozen=True)
class BatchLimits:
    inline_chars: int = 1_024       # encoded on the loop when no batch is in flight
    batch_chars: int = 32_768       # a batch takes queued submissions up to this many characters
    queue_chars: int = 1_048_576    # characters that may wait; more are refused (TokenizerBusy)


class _Submission:
    __slots__ = ("chars", "executor", "future", "texts")

    def __init__(self, texts: list[str], executor: Executor | None, future: asyncio.Future[list[list[int]]]) -> None:
        self.texts = texts
        self.executor = executor
        self.future = future
        self.chars = max(1, sum(len(t) for t in texts))

    def deliver(self, outcome: Outcome) -> None:
        if self.future.done():          # the caller was cancelled: drop the result
            return
        if isinstance(outcome, asyncio.CancelledError):
            self.future.cancel()
        elif isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


def encode_submissions(encode: EncodeFn, batch: list[list[str]]) -> list[Outcome]:
    """Run in the worker thread: one `encode` call over every submission's texts, each submission's ids
    sliced back out; if that raises, each submission alone, so an error is only its own."""
    flat = [text for texts in batch for text in texts]
    try:
        ids = encode(flat)
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
        return [_encode_alone(encode, texts) for texts in batch]
    out: list[Outcome] = []
    at = 0
    for texts in batch:
        out.append(ids[at:at + len(texts)])
        at += len(texts)
    return out


def _encode_alone(encode: EncodeFn, texts: list[str]) -> Outcome:
    try:
        return encode(texts)
    except Exception as exc:
        return exc


class EncodeBatcher:
    """The batching stage of one tokenizer on one event loop (module doc). `stats()` returns the
    `TokenizeStats` to count batches in (read on every batch, so a tokenizer's stats may be swapped)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, encode: EncodeFn, stats: Callable[[], TokenizeStats],
                 limits: BatchLimits | None = None) -> None:
        self.loop = loop
        self.limits = limits or BatchLimits()
        self._encode = encode
        self._stats = stats
        self._queue: OrderedDict[_Submission, None] = OrderedDict()
        self.queued_chars = 0
        self._in_flight: list[_Submission] | None = None

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    @property
    def waiting(self) -> int:
        """Submissions queued behind the batch in flight."""
        return len(self._queue)

    async def encode(self, texts: Sequence[str], executor: Executor | None = None) -> list[list[int]]:
        """The ids of each of `texts`, in order. Raises `TokenizerBusy` when the queue is full, and
        whatever the tokenizer raised for these texts."""
        texts = list(texts)
        chars = sum(len(t) for t in texts)
        if self._in_flight is None and chars <= self.limits.inline_chars:
            return self._encode(texts)
        sub = _Submission(texts, executor, self.loop.create_future())
        if self._in_flight is None:
            self._launch([sub])
        else:
            self._enqueue(sub)
        try:
            return await sub.future
        except asyncio.CancelledError:
            if sub in self._queue:
                del self._queue[sub]
                self.queued_chars -= sub.chars
            raise

    def _enqueue(self, sub: _Submission) -> None:
        if self._queue and self.queued_chars + sub.chars > self.limits.queue_chars:
            self._stats().batch_shed += 1
            raise TokenizerBusy
        self._queue[sub] = None
        self.queued_chars += sub.chars

    def _launch(self, batch: list[_Submission]) -> None:
        stats = self._stats()
        stats.batches += 1
        stats.batch_callers += len(batch)
        stats.batched_texts += sum(len(s.texts) for s in batch)
        try:
            fut = self.loop.run_in_executor(batch[0].executor, encode_submissions, self._encode,
                                            [s.texts for s in batch])
        except Exception as exc:          # the executor is shut down
            for s in batch:
                s.deliver(exc)
            return
        self._in_flight = batch
        fut.add_done_callback(self._finished)

    def _finished(self, fut: asyncio.Future[list[Outcome]]) -> None:
        batch, self._in_flight = self._in_flight or [], None
        outcomes: Sequence[Outcome]
        if fut.cancelled():
            outcomes = [asyncio.CancelledError()] * len(batch)
        elif (exc := fut.exception()) is not None:
            outcomes = [exc] * len(batch)
        else:
            outcomes = fut.result()
        for sub, outcome in zip(batch, outcomes, strict=True):
            sub.deliver(outcome)
        self._next()

    def _next(self) -> None:
        """Launch the queue's next batch; a launch that fails delivers its error and the one after is tried."""
        while self._in_flight is None and self._queue:
            batch: list[_Submission] = []
            chars = 0
            while self._queue:
                sub = next(iter(self._queue))
                if batch and chars + sub.chars > self.limits.batch_chars:
                    break
                del self._queue[sub]
                self.queued_chars -= sub.chars
                batch.append(sub)
                chars += sub.chars
            self._launch(batch)

