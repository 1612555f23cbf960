"""Filter `tier_allowed`.

Algorithm: keep a candidate only if its tier is one of the route's tiers and, when
the tenant names allowed tiers, one of those too.
Parameters: none.
"""

from __future__ import annotations

from typing import Any

from policies.types import Candidate, RoutingRequest


class TierAllowed:
    name = "tier_allowed"

    def __init__(self, **_params: Any) -> None:
        if _params:
            raise ValueError(f"tier_allowed takes no params, got {sorted(_params)}")

    def filter(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[Candidate], str]:
        route = set(req.route_tiers)
        keep = [c for c in cands if c.tier in route and (req.tenant_tiers is None or c.tier in req.tenant_tiers)]
        return keep, f"{len(keep)}/{len(cands)} in route and tenant tiers"
