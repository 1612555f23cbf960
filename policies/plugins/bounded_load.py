"""Filter `bounded_load`.

Algorithm: consistent hashing with bounded loads, applied per tier. With n
candidates of a tier carrying L in-flight requests in total, each may take the next
request only while in_flight + 1 <= ceil(c * (L + 1) / n). Candidates over the bound
are dropped, so affinity or cost can never push one instance past c x the mean
load. If the bound would drop every candidate of a tier, that tier keeps them all.
Parameters:
  c (float >= 1, default 1.25): the load bound as a multiple of the mean.
"""

from __future__ import annotations

import math

from policies.types import Candidate, RoutingRequest


class BoundedLoad:
    name = "bounded_load"

    def __init__(self, c: float = 1.25) -> None:
        if c < 1.0:
            raise ValueError("c must be >= 1")
        self.c = c

    def filter(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[Candidate], str]:
        by_tier: dict[str, list[Candidate]] = {}
        for cand in cands:
            by_tier.setdefault(cand.tier, []).append(cand)
        allowed: set[str] = set()
        caps: list[str] = []
        for tier, group in by_tier.items():
            cap = math.ceil(self.c * (sum(x.in_flight for x in group) + 1) / len(group))
            ok = [x for x in group if x.in_flight + 1 <= cap] or group
            allowed.update(x.key for x in ok)
            caps.append(f"{tier}<={cap}")
        keep = [x for x in cands if x.key in allowed]
        return keep, f"{len(keep)}/{len(cands)} within load bound ({', '.join(caps)})"
