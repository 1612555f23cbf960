"""The predictor: TTFT, TPOT and the probability of missing each SLO target, per candidate. Pure: no I/O.

TTFT (seconds), from the queue ahead and the prompt's uncached part:
    ttft = (pending_tokens + others x mean_uncached_tokens + uncached) / prefill_tps
  uncached = prompt_tokens - cached_tokens (the affinity index's expectation: a cache hit means fewer
  tokens to prefill); pending_tokens = the uncached prompt tokens of the requests this router (and its
  peers) sent there that have no first token yet (exact, counted at dispatch); others = the engine's
  scraped waiting requests beyond those, each at the tier's running mean of uncached tokens; prefill_tps
  = the tier's prefill rate (the policy's `prefill_tokens_per_s` seed, then learned from TTFTs of
  requests sent to an idle instance). Decode work sharing the steps is not modelled. Rate unknown
  (prefill_tps = 0): no prediction.

TPOT (seconds per output token), at the batch the request would join:
    batch = running + pending_requests + 1
    tpot(batch) = tpot_obs x (decode_knee + batch) / (decode_knee + observed_batch)
  A decode step of vLLM's continuous batching serves every running request one token (vllm-project/vllm
  vllm/v1/core/sched/scheduler.py, `Scheduler.schedule`, "First, schedule the RUNNING requests" @
  00024d314514900f361ad072af6931e403b7f589), so a step costs about a + b x batch: a fixed part (weights
  read once, launch overhead) plus per-sequence work (the simulator's step model, backends/sim/engine.py,
  has that shape). decode_knee = a / b, the batch at which both parts are equal; the sim profiles
  give 20-40. tpot_obs is the tier's observed time per output token (an EWMA over streamed answers,
  router/gateway.py `_close_out`), which does not say at which batch it was seen: observed_batch is
  taken as the mean scraped `running` of the tier's candidates in this snapshot (at least 1), the batch
  the recent streams shared. So an instance as busy as its tier's mean predicts about tpot_obs, an idle
  one less, a busier one more. Floor: the prediction never goes below the fixed part alone, tpot_obs x
  decode_knee / (decode_knee + observed_batch). Rate unknown (tpot_s = 0): no prediction.

P(miss): the actual time T is lognormal with mean = the prediction and coefficient of variation `cv`:
    sigma^2 = ln(1 + cv^2), mu = ln(prediction) - sigma^2 / 2,
    P(miss) = P(T > target) = erfc((ln(target) - mu) / (sigma sqrt 2)) / 2
  (cv = 0: 1 if prediction > target else 0). No target: 0. A target <= 0: 1. No prediction (rate
  unknown): `prior_miss_p`, an assumption, the same for every unmeasured candidate. Its default 0 reads
  an unmeasured target as met, as `slo_feasible` lets an unmeasured candidate pass: a tier learns its
  rates only from traffic it gets, so a prior above the measured tiers' P(miss) would keep traffic off
  an unmeasured (cheaper) tier for good (a 5-token prompt went to the long tier over balanced because
  only long had been measured). The optimism is bounded: a measured tier loses a request to an
  unmeasured one only where its own P(miss) x miss cost exceeds the price difference.
    P(miss TTFT or TPOT) = 1 - (1 - p_ttft)(1 - p_tpot)
  assuming independence. Under load both grow together (positively correlated), so the union is at most
  this: independence errs towards over-pricing a miss, never under.
Parameters (PredictParams):
  ttft_cv (float >= 0, default 0.5): spread of TTFT around its prediction (the queue estimate is coarse:
      other replicas' waiting requests at the tier's mean size).
  tpot_cv (float >= 0, default 0.25): spread of a request's mean TPOT (an average over its tokens).
  decode_knee (float > 0, default 32): a / b of the decode step model above.
  prior_miss_p (float in [0, 1], default 0): P(miss) of one target whose rate is unknown.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from policies.types import Candidate, RoutingRequest, by_tier, completion_budget


@dataclass(frozen=True)
class PredictParams:
    ttft_cv: float = 0.5
    tpot_cv: float = 0.25
    decode_knee: float = 32.0
    prior_miss_p: float = 0.0

    def __post_init__(self) -> None:
        if not (self.ttft_cv >= 0 and self.tpot_cv >= 0):
            raise ValueError("ttft_cv and tpot_cv must be >= 0")
        if not self.decode_knee > 0:
            raise ValueError("decode_knee must be > 0")
        if not 0.0 <= self.prior_miss_p <= 1.0:
            raise ValueError("prior_miss_p must be in [0, 1]")


@dataclass(frozen=True)
class Prediction:
    ttft_s: float | None    # None: the tier's prefill rate is unknown
    tpot_s: float | None    # None: the tier's TPOT is unknown
    p_ttft: float           # P(TTFT > target)
    p_tpot: float           # P(TPOT > target)
    batch: int              # the decode batch the request would join

    @property
    def p_miss(self) -> float:
        """P(miss the TTFT or the TPOT target), the two assumed independent."""
        return 1.0 - (1.0 - self.p_ttft) * (1.0 - self.p_tpot)


def queued_requests(c: Candidate) -> int:
    """Requests ahead of a new one: ours still prefilling, plus the engine's other waiting ones."""
    return c.pending_requests + max(0, c.waiting - c.pending_requests)


def uncached_tokens(req: RoutingRequest, c: Candidate) -> int:
    """Prompt tokens the candidate must prefill: the prompt less its expected prefix-cache hit (>= 0)."""
    prompt = req.prompt_tokens.get(c.tier, 0)
    return prompt - min(max(c.cached_tokens, 0), prompt)


def expected_cached_tokens(req: RoutingRequest, c: Candidate) -> int:
    return req.prompt_tokens.get(c.tier, 0) - uncached_tokens(req, c)


def expected_output_tokens(req: RoutingRequest, cap: int | None = None) -> float:
    """max_tokens (or the default budget), capped by the route's mean real completion length and `cap`."""
    out = float(completion_budget(req))
    if req.expected_output_tokens is not None:
        out = min(out, max(req.expected_output_tokens, 1.0))
    if cap is not None:
        out = min(out, cap)
    return out


def predicted_ttft_s(req: RoutingRequest, c: Candidate) -> float | None:
    if c.prefill_tps <= 0:
        return None
    uncached = max(uncached_tokens(req, c), 1)
    others = queued_requests(c) - c.pending_requests
    return (c.pending_tokens + others * c.mean_uncached_tokens + uncached) / c.prefill_tps


def decode_batch(c: Candidate) -> int:
    """The batch a new request would decode in: the running ones, ours on their way in, and itself."""
    return max(c.running, 0) + max(c.pending_requests, 0) + 1


def observed_batches(cands: list[Candidate]) -> dict[str, float]:
    """Per tier: the batch its TPOT EWMA is taken to have been observed at (mean scraped running, >= 1)."""
    return {t: max(1.0, sum(max(c.running, 0) for c in g) / len(g)) for t, g in by_tier(cands).items()}


def predicted_tpot_s(c: Candidate, observed_batch: float, knee: float = 32.0) -> float | None:
    if c.tpot_s <= 0:
        return None
    return c.tpot_s * (knee + decode_batch(c)) / (knee + max(observed_batch, 1.0))


def p_exceed(prediction: float, target: float, cv: float) -> float:
    """P(T > target) for T lognormal with mean `prediction` and coefficient of variation `cv`."""
    if target <= 0:
        return 1.0
    if prediction <= 0:
        return 0.0
    if cv <= 0:
        return 1.0 if prediction > target else 0.0
    s2 = math.log1p(cv * cv)
    mu = math.log(prediction) - s2 / 2.0
    return 0.5 * math.erfc((math.log(target) - mu) / math.sqrt(2.0 * s2))


def _p_miss(pred: float | None, target: float | None, cv: float, prior: float) -> float:
    if target is None:
        return 0.0
    return prior if pred is None else p_exceed(pred, target, cv)


def miss_probability(target: float | None, cv: float, prior: float) -> Callable[[float | None], float]:
    """`_p_miss(pred, target, cv, prior)` as a function of the prediction alone: the parts that depend only on
    the target and cv (its logarithm, sigma) computed once, in the same operations, so the same floats."""
    if target is None:
        return lambda pred: 0.0
    if target <= 0:
        return lambda pred: prior if pred is None else 1.0
    if cv <= 0:
        return lambda pred: prior if pred is None else 0.0 if pred <= 0 else 1.0 if pred > target else 0.0
    s2 = math.log1p(cv * cv)
    half, log_target, den = s2 / 2.0, math.log(target), math.sqrt(2.0 * s2)
    log, erfc = math.log, math.erfc

    def p(pred: float | None) -> float:
        if pred is None:
            return prior
        if pred <= 0:
            return 0.0
        return 0.5 * erfc((log_target - (log(pred) - half)) / den)
    return p


class Predictor:
    """The predictions of one request over one candidate list, candidate by candidate: what `predict` and the
    plugins compute, with the per-request and per-tier parts (prompt tokens per tier, the TPOT reference
    batch, the P(miss) constants) computed once. The same formulas as the functions above, in the same
    order of operations, so the same floats."""

    __slots__ = ("knee", "p_tpot", "p_ttft", "prompts", "tpot_den")

    def __init__(self, req: RoutingRequest, cands: list[Candidate], params: PredictParams,
                 tpot: bool = True) -> None:
        """`tpot` False: `times` is not asked for TPOT (the reference batch is not computed)."""
        self.knee = knee = params.decode_knee
        self.prompts = req.prompt_tokens
        self.tpot_den = {t: knee + max(b, 1.0) for t, b in observed_batches(cands).items()} if tpot else {}
        self.p_ttft = miss_probability(req.ttft_target_s, params.ttft_cv, params.prior_miss_p)
        self.p_tpot = miss_probability(req.tpot_target_s, params.tpot_cv, params.prior_miss_p)

    def times(self, c: Candidate) -> tuple[float | None, float | None, int, int]:
        """(predicted TTFT, predicted TPOT, decode batch, uncached prompt tokens) of `c`."""
        prompt = self.prompts.get(c.tier, 0)
        cached = c.cached_tokens
        uncached = prompt - min(cached if cached > 0 else 0, prompt)
        pr = c.pending_requests
        batch = (c.running if c.running > 0 else 0) + (pr if pr > 0 else 0) + 1
        ttft = tpot = None
        tps = c.prefill_tps
        if tps > 0:
            others = pr + max(0, c.waiting - pr) - pr
            ttft = (c.pending_tokens + others * c.mean_uncached_tokens + max(uncached, 1)) / tps
        if c.tpot_s > 0 and self.tpot_den:
            tpot = c.tpot_s * (self.knee + batch) / self.tpot_den[c.tier]
        return ttft, tpot, batch, uncached

    def prediction(self, c: Candidate) -> Prediction:
        ttft, tpot, batch, _ = self.times(c)
        return Prediction(ttft_s=ttft, tpot_s=tpot, batch=batch, p_ttft=self.p_ttft(ttft), p_tpot=self.p_tpot(tpot))


def predict(req: RoutingRequest, cands: list[Candidate], params: PredictParams) -> list[Prediction]:
    """One Prediction per candidate, in order (the TPOT reference batch is per tier of `cands`)."""
    pr = Predictor(req, cands, params)
    return [pr.prediction(c) for c in cands]
