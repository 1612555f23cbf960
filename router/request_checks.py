"""Field checks on a decoded request body, before anything is routed or forwarded.

`check_request(body, kind)` raises `ApiError(400, ..., param=<field>, code="invalid_value")` for
the first field that a vLLM tier would refuse or that the router cannot read: message roles and
content shapes, sampling ranges, numbers of the wrong type. Fields it does not know pass through
untouched. The ranges are vLLM's `SamplingParams._verify_args` (vllm/sampling_params.py @ 00388f65),
except that roles are OpenAI's (vLLM also takes custom roles; its chat templates do not).

`check_nesting(raw)` bounds JSON nesting before the body is decoded: the decoder recurses, and
thousands of `[` would end in a RecursionError. One `bytes.count` per bracket kind on the
hot path; a precise scan (strings skipped) runs only when the counts exceed the bound, in linear
time and memory whatever the body (30 MB of bracketed text: 0.05 s; 10M bare `[]`: 0.2 s).
"""

from __future__ import annotations

import math
import re
from typing import Any

from router.errors import ApiError

ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})
MAX_DEPTH = 64
_STRING = re.compile(rb'"[^"]*"')
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_INT64 = (-(2**63), 2**63 - 1)


def check_nesting(raw: bytes, limit: int = MAX_DEPTH) -> None:
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return
    # Escapes out of the way first, so that every '"' left delimits a string; strings dropped; brackets
    # alone kept; then the depth is followed `limit - depth` brackets at a time, which can't pass the
    # limit inside a step. (The regex `"(?:[^"\\]|\\.)*"` saved state per character: a 30 MB string
    # of bracketed text took 14 s and 3.7 GB; a Python loop per bracket took 4 s for 10M of them.)
    text = raw.replace(b"\\\\", b"__").replace(b'\\"', b"__") if b"\\" in raw else raw
    seq = _STRING.sub(b"", text).translate(_BRACKETS, _NOT_BRACKETS)
    depth = pos = 0
    while pos < len(seq):
        step = limit - depth
        if step <= 0:
            if seq[pos] == 0x5B:   # "[" (or "{")
                raise ApiError(400, f"request body nests JSON deeper than {limit} levels", code="invalid_json")
            depth, pos = depth - 1, pos + 1
            continue
        chunk = seq[pos:pos + step]
        depth += 2 * chunk.count(b"[") - len(chunk)
        pos += step


def _bad(field: str, what: str, value: Any) -> ApiError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return ApiError(400, f"'{field}' must be {what}, got {shown}", param=field, code="invalid_value")


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(body: dict[str, Any], field: str, lo: float, hi: float, lo_open: bool = False) -> None:
    v = body.get(field)
    if v is None:
        return
    ok = _is_num(v) and math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi
    if not ok:
        left = "above" if lo_open else "from"
        raise _bad(field, f"a number {left} {lo:g} to {hi:g}", v)


def _integer(body: dict[str, Any], field: str, lo: int, hi: int = _INT64[1]) -> None:
    v = body.get(field)
    if v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(field, f"an integer from {lo} to {hi}", v)


def _typed(body: dict[str, Any], field: str, typ: type, what: str) -> None:
    v = body.get(field)
    if v is not None and not isinstance(v, typ):
        raise _bad(field, what, v)


def _sampling(body: dict[str, Any]) -> None:
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1, lo_open=True)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _number(body, "min_p", 0, 1)
    _number(body, "repetition_penalty", 0, math.inf, lo_open=True)
    _integer(body, "top_k", -1)
    _integer(body, "seed", *_INT64)
    _integer(body, "min_tokens", 0)
    _typed(body, "user", str, "a string")
    _typed(body, "ignore_eos", bool, "true or false")
    stop = body.get("stop")
    if stop is not None:
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise _bad("stop", "a non-empty string or a list of non-empty strings", stop)
    bias = body.get("logit_bias")
    if bias is not None and not (isinstance(bias, dict) and all(
            k.lstrip("-").isdigit() and _is_num(v) and math.isfinite(v) for k, v in bias.items())):
        raise _bad("logit_bias", "an object from token ids to numbers", bias)


def _content(field: str, content: Any, role: str) -> None:
    if isinstance(content, str) or (content is None and role in ("assistant", "function")):
        return
    if not isinstance(content, list):
        raise _bad(field, "a string or a list of content parts", content)
    for j, part in enumerate(content):
        where = f"{field}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad(where, "a content part object with a string 'type'", part)
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise _bad(f"{where}.text", "a string", part.get("text"))


def _messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise _bad("messages", "a list of message objects", messages)
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "a message object", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"{where}.role", "one of " + ", ".join(sorted(ROLES)), role)
        _content(f"{where}.content", m.get("content"), role)
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise _bad(f"{where}.name", "a string", m["name"])
        calls = m.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)):
            raise _bad(f"{where}.tool_calls", "a list of tool call objects with a 'function'", calls)


def _tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise _bad("tools", "a list of {type: function, function: {name, ...}} objects", tools)
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("none", "auto", "required") and not isinstance(choice, dict):
        raise _bad("tool_choice", "'none', 'auto', 'required' or a named tool object", choice)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and isinstance(fmt.get("type"), str)):
        raise _bad("response_format", "an object with a string 'type'", fmt)


def _prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    ok = isinstance(prompt, list) and bool(prompt) and (
        all(isinstance(p, str) for p in prompt)
        or all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= _INT64[1] for p in prompt))
    if not ok:
        raise _bad("prompt", "a string, a list of strings or a list of token ids (integers >= 0)", prompt)


def check_request(body: dict[str, Any], kind: str) -> None:
    """Raise ApiError(400) naming the first bad field of a chat ("chat") or completions body."""
    _sampling(body)
    if kind == "chat":
        if "messages" in body:
            _messages(body["messages"])
        _tools(body)
        _typed(body, "logprobs", bool, "true or false")
        _integer(body, "top_logprobs", 0, 20)
    else:
        if "prompt" in body:
            _prompt(body["prompt"])
        _integer(body, "logprobs", 0, 20)
        _typed(body, "echo", bool, "true or false")
        _typed(body, "suffix", str, "a string")
