"""Filter `budget_degrade`.

Algorithm: when the request's tenant is near its budget (the router sets
`degrade_tiers` once the tenant has used `degrade.at_fraction` of a budget), keep only
candidates on those (cheaper) tiers whose predicted TTFT (see `slo_feasible`) meets the
request's target x `margin`. If none of them would meet it, or the request has no
target and none is on those tiers, keep every candidate: degradation never trades the
SLO for money. Requests of tenants not near their budget pass untouched.
Parameters:
  margin (float > 0, default 1.0): multiplies the TTFT target.
"""

from __future__ import annotations

from policies.plugins.slo_feasible import predicted_ttft_s
from policies.types import Candidate, RoutingRequest


class BudgetDegrade:
    name = "budget_degrade"

    def __init__(self, margin: float = 1.0) -> None:
        if margin <= 0:
            raise ValueError("margin must be > 0")
        self.margin = margin

    def filter(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[Candidate], str]:
        if not req.degrade_tiers:
            return list(cands), "tenant not near its budget"
        cheap = [c for c in cands if c.tier in req.degrade_tiers]
        if req.ttft_target_s is not None:
            target = req.ttft_target_s * self.margin
            cheap = [c for c in cheap if (p := predicted_ttft_s(req, c)) is None or p <= target]
        if not cheap:
            return list(cands), "near budget, but no cheaper tier meets the SLO: not degraded"
        return cheap, f"near budget: {len(cheap)}/{len(cands)} on {', '.join(sorted(req.degrade_tiers))}"
