"""Splitting long texts into pieces whose ids, encoded apart, are exactly the whole text's.

Byte-level BPE pre-tokenizers always split before " <letter>", so a text cut there encodes to the
same ids in pieces as whole (`is_byte_level` says whether a tokenizer is one, with no normalizer but
NFC). Where no such boundary is found within `PIECE_CHARS` characters (long runs of CJK text) the
cut is forced and the ids may differ by a few tokens; `PieceCursor.cuts` counts those.
"""

from __future__ import annotations

import json
import re
from typing import Any

PIECE_CHARS = 32_768    # longer texts are split into pieces of about this many characters; shorter ones are batched
_SPLIT_RE = re.compile(r"(?<=\S) (?=[^\W\d_])")


def even_groups(pieces: list[str], k: int) -> list[list[str]]:
    """`k` contiguous groups of roughly equal character count (order is kept)."""
    if k <= 1 or len(pieces) <= 1:
        return [pieces]
    total = sum(len(p) for p in pieces)
    out: list[list[str]] = [[]]
    acc = 0
    for p in pieces:
        if acc >= total * len(out) / k and len(out) < k:
            out.append([])
        out[-1].append(p)
        acc += len(p)
    return [g for g in out if g]


def split_for_encoding(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Split at ' <letter>' boundaries near every `piece_chars` characters."""
    if len(text) <= piece_chars:
        return [text]
    return PieceCursor(text, piece_chars).take(len(text))


class PieceCursor:
    """`split_for_encoding`, a few pieces at a time: `take(chars)` returns the next pieces, about
    `chars` characters in all. `cuts` counts forced cuts (no ' <letter>' boundary within
    `piece_chars` characters, as in long runs of CJK text), where ids may differ by a few tokens."""

    def __init__(self, text: str, piece_chars: int = PIECE_CHARS) -> None:
        self.text = text
        self.piece_chars = piece_chars
        self.start = 0
        self.cuts = 0

    @property
    def done(self) -> bool:
        return self.start >= len(self.text)

    def take(self, chars: int) -> list[str]:
        text, n, step = self.text, len(self.text), self.piece_chars
        pieces: list[str] = []
        stop = min(n, self.start + max(chars, 1))
        while self.start < stop:
            start = self.start
            target = start + step
            if target >= n:
                pieces.append(text[start:])
                self.start = n
                break
            m = _SPLIT_RE.search(text, target, min(n, target + step))
            end = target + step if m is None else m.start()
            self.cuts += m is None and end < n
            pieces.append(text[start:end])
            self.start = end
        return [p for p in pieces if p]


def is_byte_level(backend: Any) -> bool:
    try:
        spec = json.loads(backend.to_str())
    except Exception:
        return False
    pre = spec.get("pre_tokenizer") or {}
    kinds: list[str] = []
    if pre.get("type") == "Sequence":
        kinds = [p.get("type", "") for p in pre.get("pretokenizers", [])]
    else:
        kinds = [pre.get("type", "")]
    normalizer = spec.get("normalizer") or {}
    return "ByteLevel" in kinds and normalizer.get("type") in (None, "NFC")
