"""Scorer `load`.

Algorithm: score = 1 / (1 + in_flight / scale), where in_flight counts requests
dispatched to the instance and not yet finished (counted at dispatch). An idle
instance scores 1; one with `scale` requests in flight scores 0.5.
Parameters:
  scale (float, default 8.0): in-flight count at which the score halves.
"""

from __future__ import annotations

from policies.types import Candidate, RoutingRequest


class Load:
    name = "load"

    def __init__(self, scale: float = 8.0) -> None:
        if scale <= 0:
            raise ValueError("scale must be > 0")
        self.scale = scale

    def score(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[float], str]:
        scores = [1.0 / (1.0 + c.in_flight / self.scale) for c in cands]
        return scores, f"in-flight {min((c.in_flight for c in cands), default=0)}.." \
                       f"{max((c.in_flight for c in cands), default=0)}"
