"""Exact tokenization: the ChatML fast path equals the real template, long texts split exactly."""

from __future__ import annotations

import asyncio
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.tokenization import TierTokenizer, builtin_qwen3_path

_TOK: dict[str, TierTokenizer] = {}


def qwen3() -> TierTokenizer:
    if "q" not in _TOK:
        _TOK["q"] = TierTokenizer(None)
    return _TOK["q"]


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["", "\n", "\nlead", "trail\n", "  spaced  ", "<b>html</b>", "naïve café 你好"])


@st.composite
def plain_chat(draw: st.DrawFn) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(text)})
    for _ in range(draw(st.integers(1, 4))):
        msgs.append({"role": draw(st.sampled_from(["user", "assistant"])), "content": draw(text)})
    return msgs


def test_builtin_qwen3_template_takes_the_fast_path() -> None:
    assert qwen3().fast_chat


@settings(max_examples=300, deadline=None)
@given(msgs=plain_chat(), agp=st.booleans(), thinking=st.sampled_from([None, True, False]))
def test_fast_path_renders_exactly_like_the_jinja_template(msgs: list[dict[str, str]], agp: bool,
                                                           thinking: bool | None) -> None:
    tok = qwen3()
    extra = {} if thinking is None else {"enable_thinking": thinking}
    assert tok.render_chat(msgs, add_generation_prompt=agp, extra=extra) == \
        tok._render_jinja(msgs, agp, extra)


@settings(max_examples=200, deadline=None)
@given(msgs=plain_chat(), more=plain_chat(), thinking=st.sampled_from([None, False]))
def test_chat_ids_from_cached_segments_equal_encoding_the_whole_text(msgs: list[dict[str, str]],
                                                                     more: list[dict[str, str]],
                                                                     thinking: bool | None) -> None:
    tok = qwen3()
    extra = {} if thinking is None else {"enable_thinking": thinking}
    for conv in (msgs, msgs + [m for m in more if m["role"] != "system"]):  # the second reuses the first's segments
        whole = tok.encode_sync(tok._render_jinja(conv, True, extra))
        assert asyncio.run(tok.encode_chat(conv, extra=extra)) == whole


def test_compiled_template_matches_transformers_apply_chat_template() -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(builtin_qwen3_path(), local_files_only=True)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    convs: list[tuple[list[dict[str, Any]], Any]] = [
        ([{"role": "user", "content": "hi"}], None),
        ([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
          {"role": "assistant", "content": "<think>\nr\n</think>\n\nanswer"}, {"role": "user", "content": "q2"}], None),
        ([{"role": "user", "content": "weather?"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
          {"role": "tool", "content": "4C"}], tools),
    ]
    tok = qwen3()
    for msgs, tl in convs:
        want = hf.apply_chat_template(msgs, tools=tl, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat(msgs, tools=tl) == want


def test_non_chatml_template_keeps_jinja(tmp_path: Path) -> None:
    src = Path(builtin_qwen3_path())
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = TierTokenizer(str(tmp_path))
    assert not tok.fast_chat
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "[user] hi\n"


@pytest.mark.parametrize("chars", [20_000, 300_000])
def test_long_text_encodes_off_loop_with_identical_ids(chars: int) -> None:
    tok = qwen3()
    words = ["alpha", "beta,", "gamma.", "δέλτα", "1234", "\n\n", "x-y", "  "]
    body = " ".join(words[i % len(words)] + str(i % 7) for i in range(chars // 6))[:chars]
    with ThreadPoolExecutor(2) as ex:
        ids = asyncio.run(tok.encode(body, ex))
    assert ids == tok.encode_sync(body)
