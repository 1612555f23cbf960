"""Scorer `expected_money`: one objective in USD, the least expected money wins.

Algorithm: for each candidate (tier x instance), in USD:
    tokens = (uncached x price_input + cached x price_cached_input + out x price_output) / 1e6
    gpu    = gpu_cost_per_hour / 3600 x (uncached / prefill_tps + out x tpot(batch) / batch)
    miss   = P(miss the TTFT or TPOT target) x miss_cost_usd
    money  = [tokens and/or gpu, as `bill` says] + miss
  cached   = the prefix the affinity index expects on that instance, at most the prompt; the prefix
             cache counts here once, and nowhere else (no separate affinity score);
  uncached = prompt_tokens(tier) - cached;
  out      = the request's max_tokens (or the policy's default budget), capped by the route's running
             mean of real completion lengths and by `output_tokens_cap`;
  gpu      = the request's share of the GPU at the batch it would join (batch = running + ours on
             their way in + 1): its prefill time plus its decode time divided by the batch, so an idle
             GPU's hour costs each request more than a busy one's. A term is 0 where its rate is
             unknown (prefill_tps or tpot 0), and for a tier without a GPU price;
  P(miss), tpot(batch): policies/predict.py (lognormal around the predicted TTFT and TPOT; load enters
             only here: the queue ahead raises the predicted TTFT, the batch the TPOT);
  miss_cost_usd = the request's SLO class's price of a missed target (RoutingRequest.miss_cost_usd).
  bill (what the objective counts of a tier's price):
    "both" (default): token prices, plus GPU time on tiers that name `gpu_cost_per_hour`. A tier's GPU
        price is extra cost that tier carries (Candidate: "0 = priced per token only"), the same as
        the `expected_cost` scorer, so setting it is the opt-in and the default adds nothing else;
    "tokens": token prices only, what tenants are billed; GPU prices are ignored;
    "gpu": GPU time only, what the operator pays for the hardware; a tier without a GPU price keeps its
        token prices (else it would look free).
Score = least money among the candidates / this money: the cheapest scores 1 and one twice as expensive
0.5, a ratio, never min-max normalized, so with `max_score` the least money wins. It lies in (0, 1],
except beside a candidate that costs nothing at all (free tokens, no miss cost), where the others
score 0. Each candidate's estimate (usd, usd_tokens, usd_gpu, usd_miss,
p_miss, and ttft_s / tpot_s where predicted) goes to RoutingDecision.estimates.
Parameters:
  bill ("tokens" | "gpu" | "both", default "both"): see above.
  output_tokens_cap (int | null, default null): cap on expected output tokens.
  ttft_cv, tpot_cv, decode_knee, prior_miss_p: the predictor's (policies/predict.py), same defaults.
"""

from __future__ import annotations

from policies.predict import Prediction, PredictParams, expected_cached_tokens, expected_output_tokens, predict
from policies.types import Candidate, RoutingRequest

BILLS = ("tokens", "gpu", "both")


def token_usd(req: RoutingRequest, c: Candidate, out: float) -> float:
    cached = expected_cached_tokens(req, c)
    uncached = req.prompt_tokens.get(c.tier, 0) - cached
    return (uncached * c.price_input + cached * c.price_cached_input + out * c.price_output) / 1e6


def gpu_seconds(req: RoutingRequest, c: Candidate, out: float, p: Prediction) -> float:
    """The request's share of the GPU: prefill alone, decode shared with the batch it joins."""
    uncached = req.prompt_tokens.get(c.tier, 0) - expected_cached_tokens(req, c)
    prefill = uncached / c.prefill_tps if c.prefill_tps > 0 else 0.0
    decode = out * p.tpot_s / p.batch if p.tpot_s is not None else 0.0
    return prefill + decode


def money(req: RoutingRequest, c: Candidate, p: Prediction, bill: str = "both",
          output_tokens_cap: int | None = None) -> dict[str, float]:
    """The candidate's estimate: usd (the objective) and its parts, with the predictions behind them."""
    out = expected_output_tokens(req, output_tokens_cap)
    tokens = token_usd(req, c, out)
    gpu = c.gpu_cost_per_hour / 3600.0 * gpu_seconds(req, c, out, p) if c.gpu_cost_per_hour > 0 else 0.0
    if bill == "tokens":
        billed = tokens
    elif bill == "gpu":
        billed = gpu if c.gpu_cost_per_hour > 0 else tokens
    else:
        billed = tokens + gpu
    miss = p.p_miss * max(req.miss_cost_usd, 0.0)
    est = {"usd": billed + miss, "usd_tokens": tokens, "usd_gpu": gpu, "usd_miss": miss, "p_miss": p.p_miss}
    if p.ttft_s is not None:
        est["ttft_s"] = p.ttft_s
    if p.tpot_s is not None:
        est["tpot_s"] = p.tpot_s
    return est


class ExpectedMoney:
    name = "expected_money"

    def __init__(self, bill: str = "both", output_tokens_cap: int | None = None, ttft_cv: float = 0.5,
                 tpot_cv: float = 0.25, decode_knee: float = 32.0, prior_miss_p: float = 0.0) -> None:
        if bill not in BILLS:
            raise ValueError(f"bill must be one of {', '.join(BILLS)}")
        if output_tokens_cap is not None and output_tokens_cap < 1:
            raise ValueError("output_tokens_cap must be >= 1")
        self.bill = bill
        self.output_tokens_cap = output_tokens_cap
        self.params = PredictParams(ttft_cv=ttft_cv, tpot_cv=tpot_cv, decode_knee=decode_knee,
                                    prior_miss_p=prior_miss_p)

    def estimates(self, req: RoutingRequest, cands: list[Candidate]) -> list[dict[str, float]]:
        return [money(req, c, p, self.bill, self.output_tokens_cap)
                for c, p in zip(cands, predict(req, cands, self.params), strict=True)]

    def score_estimates(self, req: RoutingRequest,
                        cands: list[Candidate]) -> tuple[list[float], str, list[dict[str, float]]]:
        if not cands:
            return [], "no candidates", []
        ests = self.estimates(req, cands)
        usd = [e["usd"] for e in ests]
        low = min(usd)
        scores = [1.0 if u <= low else low / u for u in usd]
        best = ests[usd.index(low)]
        ttft = f"{best['ttft_s'] * 1000:.0f} ms" if "ttft_s" in best else "unknown"
        tpot = f"{best['tpot_s'] * 1000:.1f} ms" if "tpot_s" in best else "unknown"
        why = (f"least ${low:.6f} on {cands[usd.index(low)].key} (ttft {ttft}, tpot {tpot}, "
               f"p_miss {best['p_miss']:.3f} x ${req.miss_cost_usd:g}); most ${max(usd):.6f}")
        return scores, why, ests

    def score(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[float], str]:
        scores, why, _ = self.score_estimates(req, cands)
        return scores, why
