"""Filter `healthy`.

Algorithm: drop instances whose health state is not serving (failed active probe,
ejected as an outlier, or circuit open). If that would leave no candidate and
`panic_when_empty` is set, keep them all (Envoy's panic mode) rather than fail.
Parameters:
  panic_when_empty (bool, default true).
"""

from __future__ import annotations

from policies.types import Candidate, RoutingRequest


class Healthy:
    name = "healthy"

    def __init__(self, panic_when_empty: bool = True) -> None:
        self.panic_when_empty = panic_when_empty

    def filter(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[Candidate], str]:
        keep = [c for c in cands if c.healthy]
        if not keep and cands and self.panic_when_empty:
            return list(cands), f"panic: all {len(cands)} unhealthy, keeping all"
        return keep, f"{len(keep)}/{len(cands)} healthy"
