"""Filter `slo_feasible`: keep candidates predicted to meet the request's TTFT and TPOT targets.

Predictors (policies/predict.py, re-exported here): predicted TTFT from the queue ahead and the
prompt's uncached part at the tier's prefill rate; predicted TPOT from the tier's observed time per
output token, scaled to the decode batch the request would join (running + pending + 1) by the step
model a + b x batch (`decode_knee` = a / b). A prediction whose rate is unknown is not made, and that
target does not count against the candidate (it passes).

Filter: keep candidates whose predicted TTFT <= the TTFT target x `margin` and predicted TPOT <= the
TPOT target x `margin`. A request without either target passes untouched. If none is feasible:
  fallback "least_late" keeps the candidate(s) with the least predicted lateness (within 5%), lateness
  being the larger of predicted / (target x margin) - 1 over the targets it has predictions for, so the
  request is still served as well as possible;
  fallback "reject" keeps none, and the router answers 503 with Retry-After.
Parameters:
  margin (float > 0, default 1.0): multiplies both targets (0.8 = keep 20% headroom).
  fallback ("least_late" | "reject", default "least_late").
  decode_knee (float > 0, default 32): the TPOT model's a / b (policies/predict.py).
"""

from __future__ import annotations

from policies.predict import Predictor, PredictParams
from policies.predict import predicted_ttft_s as predicted_ttft_s
from policies.predict import queued_requests as queued_requests
from policies.types import Candidate, RoutingRequest


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1000:.0f} ms"


class SloFeasible:
    name = "slo_feasible"

    def __init__(self, margin: float = 1.0, fallback: str = "least_late", decode_knee: float = 32.0) -> None:
        if margin <= 0:
            raise ValueError("margin must be > 0")
        if fallback not in ("least_late", "reject"):
            raise ValueError("fallback must be 'least_late' or 'reject'")
        if decode_knee <= 0:
            raise ValueError("decode_knee must be > 0")
        self.margin = margin
        self.fallback = fallback
        self.decode_knee = decode_knee
        self._params = PredictParams(decode_knee=decode_knee)

    def lateness(self, req: RoutingRequest, cands: list[Candidate]) -> list[float | None]:
        """Per candidate: the largest predicted / target - 1 (<= 0 is on time); None: nothing predicted."""
        ttft_t = None if req.ttft_target_s is None else req.ttft_target_s * self.margin
        tpot_t = None if req.tpot_target_s is None else req.tpot_target_s * self.margin
        times = Predictor(req, cands, self._params, tpot=tpot_t is not None).times
        out: list[float | None] = []
        inf = float("inf")
        for c in cands:
            late: float | None = None
            ttft, tpot, _, _ = times(c)
            if ttft is not None and ttft_t is not None:
                late = ttft / ttft_t - 1.0 if ttft_t > 0 else inf
            if tpot is not None and tpot_t is not None:
                r = tpot / tpot_t - 1.0 if tpot_t > 0 else inf
                late = r if late is None else max(late, r)
            out.append(late)
        return out

    def filter(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[Candidate], str]:
        if (req.ttft_target_s is None and req.tpot_target_s is None) or not cands:
            return list(cands), "no SLO target"
        within = f"within ttft {_ms(req.ttft_target_s)} / tpot {_ms(req.tpot_target_s)} x {self.margin:g}"
        late = self.lateness(req, cands)
        keep = [c for c, x in zip(cands, late, strict=True) if x is None or x <= 0]
        if keep:
            return keep, f"{len(keep)}/{len(cands)} predicted {within}"
        if self.fallback == "reject":
            return [], f"none predicted {within}: reject"
        least = min(x for x in late if x is not None)
        keep = [c for c, x in zip(cands, late, strict=True) if x is not None and x <= least * 1.05]
        return keep, f"none predicted {within}: least late by {least:.0%}"
