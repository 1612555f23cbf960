"""Scorer `list_price`: the tier's list price alone, as LiteLLM's lowest-cost routing ranks deployments.

Algorithm: list = price_input + price_output (USD per 1M tokens, the tier's prices as the policy lists
them); score = the cheapest list price among the candidates / this one, in [0, 1] (the cheapest scores 1;
a free tier scores the others 0). Nothing else enters: not the prompt's size, the prefix cache, the
load or the SLO. It is a baseline to compare against (`tiergate replay --compare`; LiteLLM's
`lowest-cost` strategy sums `input_cost_per_token + output_cost_per_token` per deployment), and a
plain "cheapest tier that fits" policy behind `context_fits`.
Parameters: none.
"""

from __future__ import annotations

from policies.types import Candidate, RoutingRequest


def list_usd(c: Candidate) -> float:
    return c.price_input + c.price_output


class ListPrice:
    name = "list_price"

    def score(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[float], str]:
        if not cands:
            return [], "no candidates"
        prices = [list_usd(c) for c in cands]
        low = min(prices)
        scores = [1.0 if p <= low else (low / p if low > 0 else 0.0) for p in prices]
        return scores, f"cheapest list price ${low:g} per 1M tokens (input + output)"
