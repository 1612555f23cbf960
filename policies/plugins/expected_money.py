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

from policies.predict import (
    Prediction,
    Predictor,
    PredictParams,
    expected_cached_tokens,
    expected_output_tokens,
)
from policies.types import Candidate, RoutingRequest

BILLS = ("tokens", "gpu", "both")


def token_usd(req: RoutingRequest, c: Candidate, out: float) -> float:
    cached = expected_cached_tokens(req, c)
    uncached = req.prompt_tokens.get(c.tier, 0) - cached
    return (uncached * c.price_input + cached * c.price_cached_input + out * c.price_output) / 1e6


def gpu_seconds(req: RoutingRequest, c: Candidate, out: float, p: Prediction) -> float:
    """The request's share of the GPU: prefill alone, decode shared with the batch it joins."""
    uncached = req.prompt_tokens.get(c.tier, 0) - expected_cached_tokens(req, c)
    return _gpu_seconds(c, uncached, out, p.tpot_s, p.batch)


def _gpu_seconds(c: Candidate, uncached: int, out: float, tpot: float | None, batch: int) -> float:
    prefill = uncached / c.prefill_tps if c.prefill_tps > 0 else 0.0
    decode = out * tpot / batch if tpot is not None else 0.0
    return prefill + decode


def money(req: RoutingRequest, c: Candidate, p: Prediction, bill: str = "both",
          output_tokens_cap: int | None = None) -> dict[str, float]:
    """The candidate's estimate: usd (the objective) and its parts, with the predictions behind them."""
    cached = expected_cached_tokens(req, c)
    uncached = req.prompt_tokens.get(c.tier, 0) - cached
    return _estimate(c, cached, uncached, expected_output_tokens(req, output_tokens_cap), p.ttft_s, p.tpot_s,
                     p.batch, p.p_miss, bill, max(req.miss_cost_usd, 0.0))


def _estimate(c: Candidate, cached: int, uncached: int, out: float, ttft: float | None, tpot: float | None,
              batch: int, p_miss: float, bill: str, miss_cost: float) -> dict[str, float]:
    """`money`'s formula, from the candidate's predictions and the request's per-request parts."""
    tokens = (uncached * c.price_input + cached * c.price_cached_input + out * c.price_output) / 1e6
    gpu = c.gpu_cost_per_hour / 3600.0 * _gpu_seconds(c, uncached, out, tpot, batch) \
        if c.gpu_cost_per_hour > 0 else 0.0
    if bill == "tokens":
        billed = tokens
    elif bill == "gpu":
        billed = gpu if c.gpu_cost_per_hour > 0 else tokens
    else:
        billed = tokens + gpu
    miss = p_miss * miss_cost
    est = {"usd": billed + miss, "usd_tokens": tokens, "usd_gpu": gpu, "usd_miss": miss, "p_miss": p_miss}
    if ttft is not None:
        est["ttft_s"] = ttft
    if tpot is not None:
        est["tpot_s"] = tpot
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
        """`money` of each candidate with its `predict` Prediction (computed in one pass: `Predictor`)."""
        pr = Predictor(req, cands, self.params)
        out = expected_output_tokens(req, self.output_tokens_cap)
        miss_cost = max(req.miss_cost_usd, 0.0)
        p_ttft, p_tpot, times, bill = pr.p_ttft, pr.p_tpot, pr.times, self.bill
        ests = []
        for c in cands:
            ttft, tpot, batch, uncached = times(c)
            a, b = p_ttft(ttft), p_tpot(tpot)
            ests.append(_estimate(c, pr.prompts.get(c.tier, 0) - uncached, uncached, out, ttft, tpot, batch,
                                  1.0 - (1.0 - a) * (1.0 - b), bill, miss_cost))
        return ests

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
