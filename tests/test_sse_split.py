"""router/sse.py `split_events`: complete events at the head of a buffer, and the rest, for any buffer."""

from __future__ import annotations

import random

import pytest

from router.sse import split_events


@pytest.mark.parametrize("seed", range(20))
def test_split_events_returns_every_complete_event_and_the_rest(seed: int) -> None:
    rng = random.Random(seed)
    pieces = [b"data: {}\n\n", b": keep-alive\n\n", b"data: [DONE]\n\n", b"event: x\ndata: 1\n\n", b"\n", b"da"]
    buf = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40)))
    events, rest = split_events(buf)
    assert b"".join(events) + rest == buf
    assert all(e.endswith(b"\n\n") and e.find(b"\n\n") == len(e) - 2 for e in events)
    assert b"\n\n" not in rest
