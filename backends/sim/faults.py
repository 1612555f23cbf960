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
    stall_between_chunks_s: float = 0.0  # extra sleep between streamed chunks
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

    def draw(self, rng: random.Random) -> int | None:
        """An injected status for this request, or None."""
        r = rng.random()
        if r < self.error_rate:
            return self.error_status
        if r < self.error_rate + self.rate_limit_rate:
            return 429
        return None
