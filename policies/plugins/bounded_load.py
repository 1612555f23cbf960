"""Filter `bounded_load`.

Algorithm: consistent hashing with bounded loads, applied per tier. With n
candidates of a tier carrying L in-flight requests in total, each may take the next
request only while in_flight + 1 <= max(ceil(c * (L + 1) / n), min_bound).
Candidates over the bound are dropped, so affinity or cost can never push one
instance past c x the mean load once load is real; below `min_bound` in-flight
requests nobody counts as overloaded (at a handful of requests the +1 granularity
would otherwise break conversations' affinity for nothing). If the bound would drop
every candidate of a tier, that tier keeps them all.
Parameters:
  c (float >= 1, default 1.25): the load bound as a multiple of the mean.
  min_bound (int >= 1, default 4): the bound never goes below this many requests.
"""

from __future__ import annotations

import math

from policies.types import Candidate, RoutingRequest, by_tier


class BoundedLoad:
    name = "bounded_load"

    def __init__(self, c: float = 1.25, min_bound: int = 4) -> None:
        if c < 1.0:
            raise ValueError("c must be >= 1")
        if min_bound < 1:
            raise ValueError("min_bound must be >= 1")
        self.c = c
        self.min_bound = min_bound

    def filter(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[Candidate], str]:
        allowed: set[str] = set()
        caps: list[str] = []
        for tier, group in by_tier(cands).items():
            cap = max(math.ceil(self.c * (sum(x.in_flight for x in group) + 1) / len(group)), self.min_bound)
            ok = [x for x in group if x.in_flight + 1 <= cap] or group
            allowed.update(x.key for x in ok)
            caps.append(f"{tier}<={cap}")
        keep = [x for x in cands if x.key in allowed]
        return keep, f"{len(keep)}/{len(cands)} within load bound ({', '.join(caps)})"
