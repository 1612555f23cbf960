"""Exact prompt token ids per tier, computed once per distinct tokenizer, off the event loop."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from backends.tokenization import TierTokenizer, TokenizerCache
from policies.schema import Policy
from router.errors import ApiError
from router.schemas import ChatRequest, CompletionRequest


def normalize_messages(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in raw:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        out.append({**m, "content": "" if content is None else content})
    return out


class PromptTokenizer:
    def __init__(self, policy: Policy, cache: TokenizerCache, executor: ThreadPoolExecutor) -> None:
        self.executor = executor
        self.by_tier: dict[str, TierTokenizer] = {name: cache.get(t.tokenizer) for name, t in policy.tiers.items()}

    async def chat_ids(self, tiers: tuple[str, ...], req: ChatRequest, raw: dict[str, Any]) -> dict[str, list[int]]:
        msgs = normalize_messages(raw.get("messages") or [])
        extra = req.chat_template_kwargs
        done: dict[int, list[int]] = {}
        out: dict[str, list[int]] = {}
        for t in tiers:
            tok = self.by_tier[t]
            if id(tok) not in done:
                try:
                    done[id(tok)] = await tok.encode_chat(msgs, self.executor, tools=req.tools,
                                                          add_generation_prompt=req.add_generation_prompt,
                                                          extra=extra)
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
        done: dict[int, list[int]] = {}
        out: dict[str, list[int]] = {}
        for t in tiers:
            tok = self.by_tier[t]
            if id(tok) not in done:
                if isinstance(prompt, str):
                    done[id(tok)] = await tok.encode(prompt, self.executor)
                else:
                    done[id(tok)] = [int(i) for i in prompt]  # token ids, as vLLM accepts them
            out[t] = done[id(tok)]
        return out
