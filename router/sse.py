"""Server-sent events from a backend: split, checked, and read up to the point where the client gets its 200.

A well-formed event's `data:` payload is a JSON object or `[DONE]`; events without data (comments,
keep-alives) pass. An object with an `error` member is the backend's own error event (vLLM sends one,
then `[DONE]`, when generation fails after its 200: vllm/entrypoints/openai/serving_chat.py,
`chat_completion_stream_generator`, vllm-project/vllm@003fe5932dc9e1b331347894d3cbc5ddfe89e9eb).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec

FIRST_TOKEN = re.compile(rb'"(?:content|text)":\s*"[^"]')  # non-empty text: not the role-only first chunk
HEAD_MAX = 4 * 1024 * 1024   # past this much without a commit point, commit anyway (and check on the way)
Kind = Literal["ok", "empty", "done", "error", "malformed"]


class _Event(msgspec.Struct):
    error: Any = None


_event_dec = msgspec.json.Decoder(_Event)


class BadStream(Exception):
    """A stream failed its check: `kind` is "malformed" or "error" (the backend's own error event)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete SSE events (each ending in a blank line) at the head of `buf`, and the rest."""
    events: list[bytes] = []
    start = 0
    find = buf.find
    while (i := find(b"\n\n", start)) >= 0:     # by index: the rest is copied once, not after every event
        events.append(buf[start:i + 2])
        start = i + 2
    return events, (buf[start:] if start else buf)


def check_event(event: bytes) -> Kind:
    if event.startswith(b"data: ") and event.find(b"\n") == len(event) - 2:   # one data line: vLLM's form
        payload = event[6:-2].strip()
    else:
        data = [ln[5:] for ln in event.split(b"\n") if ln.startswith(b"data:")]
        if not data:
            return "empty"  # a comment or keep-alive
        payload = b"\n".join(d[1:] if d.startswith(b" ") else d for d in data).strip()
    if payload == b"[DONE]":
        return "done"
    try:
        ev = _event_dec.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # not JSON, or not an object
        return "malformed"
    return "error" if ev.error is not None else "ok"


def _opening(event: bytes) -> bool:
    """vLLM's first chat event: the role, with empty content (sent with the first token)."""
    return b'"role":' in event and FIRST_TOKEN.search(event) is None


async def read_head(chunks: AsyncIterator[bytes]) -> tuple[bytes, bool]:
    """Read a stream up to its commit point, checking each complete event: -> (the bytes read, whether the
    stream has ended). The commit point is the first event after a role-only opening one, `[DONE]`, the
    end of the stream, or `HEAD_MAX` bytes. Raises `BadStream` for a malformed or error event."""
    head = b""
    checked = 0
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            rest = head[checked:]
            if rest.strip() and (kind := check_event(rest)) in ("malformed", "error"):
                raise BadStream(kind) from None
            return head, True
        head += chunk
        while (i := head.find(b"\n\n", checked)) >= 0:
            event = head[checked: i + 2]
            checked = i + 2
            kind = check_event(event)
            if kind in ("malformed", "error"):
                raise BadStream(kind)
            if kind == "done" or (kind == "ok" and not _opening(event)):
                return head, False
        if len(head) > HEAD_MAX:
            return head, False
