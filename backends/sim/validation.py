"""Request validation in the simulator, as vLLM does it: invalid input is a 400, never a 500.

vLLM parses the body into its pydantic `ChatCompletionRequest` / `CompletionRequest`
(vllm/entrypoints/openai/chat_completion/protocol.py @ d5dba2d7) and answers a validation
error with 400 (`validation_exception_handler`, vllm/entrypoints/serve/utils/server_utils.py
@ 0753ceeb); `SamplingParams._verify_args` (vllm/sampling_params.py @ 00388f65) then checks
the ranges below, also a 400. Messages take any string role in vLLM (its custom message type);
content is a string, null, or a list of parts with a `type`. Unknown fields are ignored.
Unlike pydantic's lax mode, numbers given as strings are refused here.
"""

from __future__ import annotations

import math
from typing import Any

_INT64 = (-(2**63), 2**63 - 1)


class Invalid(Exception):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _num(body: dict[str, Any], field: str, ok: Any, rule: str) -> None:
    v = body.get(field)
    if v is None:
        return
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or not ok(v):
        raise Invalid(f"{field} must be {rule}, got {v!r:.40}.", field)


def _int(body: dict[str, Any], field: str, lo: int, hi: int = _INT64[1]) -> None:
    v = body.get(field)
    if v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise Invalid(f"{field} must be an integer in [{lo}, {hi}], got {v!r:.40}.", field)


def _kind(body: dict[str, Any], field: str, typ: type, what: str) -> None:
    v = body.get(field)
    if v is not None and not isinstance(v, typ):
        raise Invalid(f"{field} must be {what}.", field)


def sampling(body: dict[str, Any]) -> None:
    _num(body, "temperature", lambda v: 0 <= v <= 2, "in [0, 2]")
    _num(body, "top_p", lambda v: 0 < v <= 1, "in (0, 1]")
    _num(body, "presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
    _num(body, "frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
    _num(body, "repetition_penalty", lambda v: v > 0, "greater than zero")
    _num(body, "min_p", lambda v: 0 <= v <= 1, "in [0, 1]")
    _int(body, "top_k", -1)
    _int(body, "seed", *_INT64)
    _int(body, "min_tokens", 0)
    _int(body, "n", 1)
    for field in ("stream", "ignore_eos", "echo", "add_generation_prompt"):
        _kind(body, field, bool, "a boolean")
    _kind(body, "stream_options", dict, "an object")
    _kind(body, "chat_template_kwargs", dict, "an object")
    stop = body.get("stop")
    if stop is not None:
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise Invalid("stop must be a string or a list of strings.", "stop")
        if not all(items):
            raise Invalid("stop cannot contain an empty string.", "stop")
    for field in ("max_tokens", "max_completion_tokens"):
        v = body.get(field)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise Invalid(f"{field} must be an integer.", field)


def messages(msgs: Any) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise Invalid("'messages' must be a non-empty list of message objects", "messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise Invalid(f"messages.{i} must be an object with a string 'role'", f"messages.{i}")
        content = m.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(
                isinstance(p, dict) and isinstance(p.get("type"), str)
                and (p["type"] != "text" or isinstance(p.get("text"), str)) for p in content):
            raise Invalid(f"messages.{i}.content must be a string or a list of content parts",
                          f"messages.{i}.content")


def tools(body: dict[str, Any]) -> None:
    ts = body.get("tools")
    if ts is not None and not (isinstance(ts, list) and all(
            isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in ts)):
        raise Invalid("tools must be a list of function tools with a name", "tools")


def prompt_ids(ids: list[int], vocab_size: int) -> None:
    """A prompt has tokens, each in the vocabulary (vLLM's 'decoder prompt cannot be empty' and
    'out of vocabulary', tests/entrypoints/llm/test_prompt_validation.py @ d3390218)."""
    if not ids:
        raise Invalid("The decoder prompt cannot be empty", "prompt")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise Invalid(f"Token id {bad} is out of vocabulary", "prompt")
