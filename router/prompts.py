"""Exact prompt token ids per tier, computed once per distinct tokenizer, off the event loop.

Bounded: a prompt that can't fit the largest context of the request's tiers is refused (400
`context_length_exceeded`, naming the field) as soon as that is proven, without tokenizing the
rest (backends/tokenization.py `encode(limit=)`, backends/token_bounds.py). Prompts of at least
`cache.long_chars` characters take one of the tokenizer cache's `gate` slots first (FIFO, at most
`slots` at once; a full queue answers 503 `tokenizer_busy`), so a burst of huge prompts can't take
every CPU and all their token ids can't be in memory at once. Shorter prompts go through each
tokenizer's batching stage (backends/tokenize_batch.py), whose full queue answers the same 503.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from backends.token_bounds import GateFull, PromptTooLong
from backends.tokenization import TierTokenizer, TokenizerCache
from policies.schema import Policy
from router.errors import ApiError
from router.schemas import ChatRequest, CompletionRequest


def _chars(msgs: list[dict[str, Any]]) -> int:
    return sum(len(m["content"]) for m in msgs if isinstance(m.get("content"), str))


def normalize_messages(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in raw:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        out.append({**m, "content": "" if content is None else content})
    return out


def _busy(what: str) -> ApiError:
    return ApiError(503, f"too many {what} are being tokenized on this router right now; retry shortly",
                    code="tokenizer_busy", headers={"Retry-After": "1"})


class PromptTokenizer:
    def __init__(self, policy: Policy, cache: TokenizerCache, executor: ThreadPoolExecutor) -> None:
        self.executor = executor
        self.by_tier: dict[str, TierTokenizer] = {name: cache.get(t.tokenizer) for name, t in policy.tiers.items()}
        self.max_len = {name: t.max_model_len for name, t in policy.tiers.items()}
        self.cache = cache

    @contextlib.asynccontextmanager
    async def _slot(self, chars: int) -> AsyncIterator[None]:
        """A tokenizer slot for a long prompt (FIFO); short prompts go straight on."""
        if chars < self.cache.long_chars:
            yield
            return
        try:
            async with self.cache.gate.slot():
                yield
        except GateFull:
            raise _busy("long prompts") from None

    def _too_long(self, exc: PromptTooLong, field: str, model: str, tok: TierTokenizer) -> ApiError:
        self.cache.stats.refused("chars" if exc.counted == 0 else "tokens")
        if exc.counted == 0 and tok.bounds is not None:
            what = (f"the {exc.chars} characters in '{field}' are more than {exc.limit} tokens can hold (one token "
                    f"stands for at most {tok.bounds.chars_per_token:g} characters with this tokenizer), so they")
        else:
            what = (f"at least {exc.counted} prompt tokens in '{field}' (tokenizing stopped there, {exc.chars} "
                    f"characters in all)")
        return ApiError(400, f"{what} exceed the largest context available for model '{model[:200]}' "
                             f"({exc.limit} tokens)",
                        param=field, code="context_length_exceeded")

    async def chat_ids(self, tiers: tuple[str, ...], req: ChatRequest, raw: dict[str, Any]) -> dict[str, list[int]]:
        msgs = normalize_messages(raw.get("messages") or [])
        extra = req.chat_template_kwargs
        limit = max(self.max_len[t] for t in tiers)
        done: dict[int, list[int]] = {}
        out: dict[str, list[int]] = {}
        async with self._slot(_chars(msgs)):
            for t in tiers:
                tok = self.by_tier[t]
                if id(tok) not in done:
                    try:
                        done[id(tok)] = await tok.encode_chat(msgs, self.executor, tools=req.tools,
                                                              add_generation_prompt=req.add_generation_prompt,
                                                              extra=extra, limit=limit)
                    except PromptTooLong as exc:
                        raise self._too_long(exc, "messages", req.model, tok) from None
                    except GateFull:   # TokenizerBusy: the batching stage's queue is full
                        raise _busy("prompts") from None
                    except Exception as exc:
                        raise ApiError(400, f"messages could not be rendered with the chat template: {exc}",
                                       param="messages", code="invalid_messages") from None
                out[t] = done[id(tok)]
        return out

    async def completion_ids(self, tiers: tuple[str, ...], req: CompletionRequest) -> dict[str, list[int]]:
        prompt = req.prompt
        if isinstance(prompt, list) and not (all(isinstance(p, str) for p in prompt)
                                             or all(isinstance(p, int) for p in prompt)):
            raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token ids",
                           param="prompt", code="invalid_value")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "batched prompts (more than one string) are not supported; send one "
                               "request per prompt", param="prompt", code="unsupported_value")
            prompt = prompt[0]
        limit = max(self.max_len[t] for t in tiers)
        done: dict[int, list[int]] = {}
        out: dict[str, list[int]] = {}
        async with self._slot(len(prompt) if isinstance(prompt, str) else 0):
            for t in tiers:
                tok = self.by_tier[t]
                if id(tok) not in done:
                    if isinstance(prompt, str):
                        try:
                            done[id(tok)] = await tok.encode(prompt, self.executor, limit=limit)
                        except PromptTooLong as exc:
                            raise self._too_long(exc, "prompt", req.model, tok) from None
                        except GateFull:
                            raise _busy("prompts") from None
                    else:
                        done[id(tok)] = [int(i) for i in prompt]  # token ids, as vLLM accepts them
                out[t] = done[id(tok)]
        return out
