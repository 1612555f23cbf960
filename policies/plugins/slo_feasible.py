"""Filter `slo_feasible`, and the TTFT predictor it uses.

Predictor (pure): predicted TTFT on a candidate =
    (pending_tokens + others * mean_uncached_tokens + uncached) / prefill_tps
where uncached = prompt_tokens - cached_tokens (the affinity index's expectation),
pending_tokens = the uncached prompt tokens of the requests this router sent there
that have not had their first token yet (exact, counted at dispatch), others = the
engine's scraped waiting requests beyond those (other replicas' traffic) times the
tier's running mean of uncached prompt tokens per request, and prefill_tps the
tier's prefill rate: seeded by the policy's
`prefill_tokens_per_s`, then learned from the tier's own responses (TTFT of requests
sent to an idle instance). Decode work sharing the batch is not modelled. A
candidate whose tier has no known rate is not predicted (it passes).

Filter: keep candidates whose predicted TTFT <= the request's TTFT target x
`margin`. Requests without a target pass untouched. If none is feasible:
  fallback "least_late" keeps the candidate(s) with the least predicted lateness
  (within 5%), so the request is still served as well as possible;
  fallback "reject" keeps none, and the router answers 503 with Retry-After.
Parameters:
  margin (float > 0, default 1.0): multiplies the target (0.8 = keep 20% headroom).
  fallback ("least_late" | "reject", default "least_late").
"""

from __future__ import annotations

from policies.types import Candidate, RoutingRequest


def queued_requests(c: Candidate) -> int:
    """Requests ahead of a new one: ours still prefilling, plus the engine's other waiting ones."""
    return c.pending_requests + max(0, c.waiting - c.pending_requests)


def predicted_ttft_s(req: RoutingRequest, c: Candidate) -> float | None:
    if c.prefill_tps <= 0:
        return None
    prompt = req.prompt_tokens.get(c.tier, 0)
    uncached = max(prompt - min(c.cached_tokens, prompt), 1)
    others = queued_requests(c) - c.pending_requests
    return (c.pending_tokens + others * c.mean_uncached_tokens + uncached) / c.prefill_tps


class SloFeasible:
    name = "slo_feasible"

    def __init__(self, margin: float = 1.0, fallback: str = "least_late") -> None:
        if margin <= 0:
            raise ValueError("margin must be > 0")
        if fallback not in ("least_late", "reject"):
            raise ValueError("fallback must be 'least_late' or 'reject'")
        self.margin = margin
        self.fallback = fallback

    def filter(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[Candidate], str]:
        if req.ttft_target_s is None or not cands:
            return list(cands), "no TTFT target"
        target = req.ttft_target_s * self.margin
        preds = [predicted_ttft_s(req, c) for c in cands]
        keep = [c for c, p in zip(cands, preds, strict=True) if p is None or p <= target]
        if keep:
            return keep, f"{len(keep)}/{len(cands)} predicted within {target * 1000:.0f} ms"
        if self.fallback == "reject":
            return [], f"none predicted within {target * 1000:.0f} ms: reject"
        late = [p - target for p in preds if p is not None]
        least = min(late)
        keep = [c for c, p in zip(cands, preds, strict=True) if p is not None and p - target <= least * 1.05]
        return keep, f"none within {target * 1000:.0f} ms: least late by {least * 1000:.0f} ms"
