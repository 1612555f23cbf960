"""A fast renderer for ChatML chat templates, proven equal to the jinja template at load time.

Rendering a chat template through jinja costs ~30 µs per short chat, more than all the
routing work together. Most traffic is plain chat: string contents, roles system, user
and assistant, no tools. For ChatML-family templates (Qwen2.5/Qwen3 and friends) that
renders as `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message plus the
generation prompt, with two known Qwen3 variations:

* `think_last`: a trailing assistant message after the last user turn gets an empty
  `<think>\\n\\n</think>\\n\\n` block (Qwen3's reasoning template);
* `think_off`: `enable_thinking=False` appends the same empty block to the generation
  prompt.

`probe()` renders a fixed set of probe conversations with the real template and
accepts a variant only if it matches every probe byte for byte; otherwise the tokenizer
keeps using jinja for everything. `plain()` decides per request whether the fast path
applies; anything unusual (tools, tool calls, reasoning fields, think or tool-response
markers in the text, unknown template kwargs, non-string content) goes to jinja.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

ROLES = frozenset({"system", "user", "assistant"})
MARKERS = ("<think>", "</think>", "<tool_response>", "</tool_response>", "<|im_start|>", "<|im_end|>")
KNOWN_KWARGS = frozenset({"enable_thinking"})


class ChatMLVariant:
    def __init__(self, think_last: bool, think_off: bool) -> None:
        self.think_last = think_last
        self.think_off = think_off

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
               enable_thinking: bool | None) -> str:
        return "".join(self.segments(messages, add_generation_prompt, enable_thinking))

    def segments(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool,
                 enable_thinking: bool | None) -> list[str]:
        """The rendered text in pieces that each start with a special token (<|im_start|>).

        Tokenizers split on special tokens before anything else, so the ids of the
        whole text are exactly the concatenated ids of these pieces: a conversation's
        earlier messages can be tokenized once and reused on every later turn."""
        parts: list[str] = []
        n = len(messages)
        last_user = n - 1  # Qwen3: with no user turn, the last message counts as the query
        for i in range(n - 1, -1, -1):
            if messages[i]["role"] == "user":
                last_user = i
                break
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "assistant" and self.think_last and i > last_user and i == n - 1:
                parts.append("<|im_start|>assistant\n<think>\n\n</think>\n\n" + content.lstrip("\n") + "<|im_end|>\n")
            else:
                parts.append("<|im_start|>" + role + "\n" + content + "<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
            if self.think_off and enable_thinking is False:
                parts[-1] += "<think>\n\n</think>\n\n"
        return parts


def plain(messages: Sequence[Mapping[str, Any]], tools: Any, extra: Mapping[str, Any] | None) -> bool:
    """True when the request is plain chat that a verified ChatML variant renders exactly."""
    if tools or not messages:
        return False
    if extra and not KNOWN_KWARGS.issuperset(extra):
        return False
    for i, m in enumerate(messages):
        role = m.get("role")
        content = m.get("content")
        if role not in ROLES or not isinstance(content, str) or len(m) != 2:
            return False
        if role == "system" and i != 0:
            return False
        if "<" in content and any(k in content for k in MARKERS):
            return False
    return True


_PROBES: list[tuple[list[dict[str, str]], bool, dict[str, Any]]] = [
    ([{"role": "user", "content": "hi"}], True, {}),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], True, {}),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     True, {}),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     False, {}),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "\nb"}], False, {}),
    ([{"role": "user", "content": "x"}], True, {"enable_thinking": False}),
    ([{"role": "assistant", "content": "only"}], False, {}),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], True, {}),
    ([{"role": "user", "content": "x"}], True, {"enable_thinking": True}),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": " y\n"}],
     False, {}),
]


def probe(render: Callable[[list[dict[str, str]], bool, dict[str, Any]], str]) -> ChatMLVariant | None:
    """The variant that reproduces the real template on every probe, or None."""
    for think_last in (False, True):
        for think_off in (False, True):
            v = ChatMLVariant(think_last, think_off)
            try:
                if all(render(msgs, agp, kw) == v.render(msgs, agp, kw.get("enable_thinking"))
                       for msgs, agp, kw in _PROBES):
                    return v
            except Exception:
                return None
    return None
