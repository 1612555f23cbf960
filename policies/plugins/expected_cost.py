"""Scorer `expected_cost`.

Algorithm: expected USD cost of the request on a candidate =
    (prompt - cached) * price_input + cached * price_cached_input
    + expected_output * price_output                      (all per 1M tokens)
    + gpu_cost_per_hour / 3600 * gpu_seconds              (only for tiers with a GPU price)
where cached is the prefix the affinity index expects on that instance,
expected_output is the request's max_tokens (or the policy's default budget),
capped by the route's running mean of real completion lengths and by
`output_tokens_cap` when set, and gpu_seconds is the request's predicted share of
the GPU: its uncached prefill time (uncached / the tier's prefill rate) plus its
decode time (expected_output x the tier's observed time per output token) divided
by the batch it shares (running + 1), so an idle GPU's hour costs each request more
than a busy one's, as seed 000 turns a per-hour price into per-token cost. Score =
cheapest cost among the candidates / this cost, in (0, 1]: the cheapest scores 1 and
a candidate twice as expensive scores 0.5 (a ratio, never min-max normalized).
Parameters:
  output_tokens_cap (int | null, default null): cap on expected output tokens.
"""

from __future__ import annotations

from policies.types import Candidate, RoutingRequest, completion_budget


def expected_cost_usd(req: RoutingRequest, c: Candidate, output_tokens_cap: int | None = None) -> float:
    prompt = req.prompt_tokens.get(c.tier, 0)
    cached = min(c.cached_tokens, prompt)
    out = float(completion_budget(req))
    if req.expected_output_tokens is not None:
        out = min(out, max(req.expected_output_tokens, 1.0))
    if output_tokens_cap is not None:
        out = min(out, output_tokens_cap)
    cost = ((prompt - cached) * c.price_input + cached * c.price_cached_input + out * c.price_output) / 1e6
    if c.gpu_cost_per_hour > 0:
        prefill_s = (prompt - cached) / c.prefill_tps if c.prefill_tps > 0 else 0.0
        decode_s = out * c.tpot_s / (c.running + 1)
        cost += c.gpu_cost_per_hour / 3600.0 * (prefill_s + decode_s)
    return cost


class ExpectedCost:
    name = "expected_cost"

    def __init__(self, output_tokens_cap: int | None = None) -> None:
        if output_tokens_cap is not None and output_tokens_cap < 1:
            raise ValueError("output_tokens_cap must be >= 1")
        self.output_tokens_cap = output_tokens_cap

    def score(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[float], str]:
        costs = [expected_cost_usd(req, c, self.output_tokens_cap) for c in cands]
        if not costs:
            return [], "no candidates"
        low = min(costs)
        scores = [1.0 if cost <= 0 else (low / cost if low > 0 else 0.0) for cost in costs]
        return scores, f"cheapest ${low:.6f}"
