"""Per-instance fault injection for the simulator (CLI flags and POST /admin/faults)."""

from __future__ import annotations

import random

import msgspec


class Faults(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    error_rate: float = 0.0          # share of requests answered with `error_status`
    error_status: int = 500          # 500 or 503
    rate_limit_rate: float = 0.0     # share of requests answered 429
    retry_after_s: int = 1           # Retry-After on 429 and 503
    hang_before_headers_s: float = 0.0  # sleep before any response header
    hang_after_headers_s: float = 0.0   # streams: sleep after the 200 and its headers, before the first event
    stall_between_chunks_s: float = 0.0  # extra sleep between streamed chunks
    stall_at_chunk: int = 0          # N > 0: stall once, before chunk N (0-based), instead of between every chunk
    fail_on_input: str = ""          # answer 500 when the request body contains this (a "query of death")
    cut_after_chunks: int = 0        # close the connection after N chunks (0 = never)
    malformed: str = ""              # "json" (bad body) or "sse" (bad event) or ""
    slow_start_s: float = 0.0        # engine steps are slower for this long after start
    slow_start_factor: float = 5.0   # step-time multiplier at start, decaying to 1

    def validate(self) -> None:
        if self.error_status not in (500, 502, 503, 504):
            raise ValueError("error_status must be 500, 502, 503 or 504")
        for name in ("error_rate", "rate_limit_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.malformed not in ("", "json", "sse"):
            raise ValueError("malformed must be '', 'json' or 'sse'")
        for name in ("hang_before_headers_s", "hang_after_headers_s", "stall_between_chunks_s", "stall_at_chunk"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be >= 0")

    def stall_before(self, chunk: int) -> float:
        """Seconds to stall before writing streamed chunk number `chunk` (0-based)."""
        if self.stall_between_chunks_s <= 0:
            return 0.0
        if self.stall_at_chunk:
            return self.stall_between_chunks_s if chunk == self.stall_at_chunk else 0.0
        return self.stall_between_chunks_s if chunk > 0 else 0.0

    def poisoned(self, raw: bytes) -> bool:
        """The query-of-death fault: the body contains `fail_on_input` (as it is, or JSON-escaped)."""
        if not self.fail_on_input:
            return False
        return self.fail_on_input.encode() in raw or msgspec.json.encode(self.fail_on_input)[1:-1] in raw

    def draw(self, rng: random.Random) -> int | None:
        """An injected status for this request, or None."""
        r = rng.random()
        if r < self.error_rate:
            return self.error_status
        if r < self.error_rate + self.rate_limit_rate:
            return 429
        return None
