"""The pure routing interface: a frozen request and candidate snapshot in, a decision out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgspec


class RoutingRequest(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    tenant: str
    virtual_model: str
    route_tiers: tuple[str, ...]          # candidate tiers of the route, in preference order
    tenant_tiers: frozenset[str] | None   # None = every tier
    prompt_tokens: dict[str, int]         # per tier (tiers may use different tokenizers)
    max_tokens: int | None
    default_completion_tokens: int
    slo_class: str = ""
    ttft_target_s: float | None = None    # from the SLO class or x-slo-ttft-ms
    tpot_target_s: float | None = None    # from the SLO class or x-slo-tpot-ms
    expected_output_tokens: float | None = None  # the route's running mean of real completion lengths
    degrade_tiers: frozenset[str] | None = None  # tenant near its budget: prefer these tiers where feasible
    miss_cost_usd: float = 0.0            # the SLO class's price of a missed TTFT or TPOT target (expected_money)


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    tier: str
    instance_id: str
    max_model_len: int
    price_input: float        # USD per 1M tokens
    price_cached_input: float
    price_output: float
    healthy: bool = True
    in_flight: int = 0
    cached_tokens: int = 0    # expected prefix-cache hit on this instance (affinity)
    running: int = 0          # scraped: requests in the engine's batch
    waiting: int = 0          # scraped: requests queued in the engine
    pending_requests: int = 0  # this router's requests there still waiting for their first token
    pending_tokens: int = 0   # their uncached prompt tokens (prefill work ahead of a new request)
    kv_usage: float = 0.0     # scraped: KV-cache usage, 0..1
    prefill_tps: float = 0.0  # the tier's prefill rate (uncached tokens per second); 0 = unknown
    mean_uncached_tokens: float = 1024.0  # the tier's uncached prompt tokens per request
    gpu_cost_per_hour: float = 0.0  # the tier's GPU price (USD/hour); 0 = priced per token only
    tpot_s: float = 0.0       # the tier's observed time per output token; 0 = unknown
    key: str = ""             # "tier/instance_id", filled in on construction

    def __post_init__(self) -> None:
        if not self.key:
            msgspec.structs.force_setattr(self, "key", f"{self.tier}/{self.instance_id}")


class PluginResult(msgspec.Struct, frozen=True):
    plugin: str
    reason: str


class RoutingDecision(msgspec.Struct, kw_only=True):
    chosen: Candidate | None
    ranked: list[Candidate]                       # feasible candidates, best first
    scores: dict[str, dict[str, float]]           # candidate key -> scorer -> score
    totals: dict[str, float]                      # candidate key -> weighted total
    reasons: list[PluginResult]
    rejected: dict[str, str]                      # candidate key -> filter that dropped it
    estimates: dict[str, dict[str, float]] = {}   # candidate key -> figure -> value, from scorers that
    #                                               predict (expected_money: usd, ttft_s, tpot_s, p_miss, ...)

    def summary(self) -> dict[str, object]:
        return {"chosen": self.chosen.key if self.chosen else None,
                "totals": {k: round(v, 4) for k, v in self.totals.items()},
                "rejected": self.rejected,
                "reasons": [f"{r.plugin}: {r.reason}" for r in self.reasons]}


def by_tier(cands: list[Candidate]) -> dict[str, list[Candidate]]:
    """Candidates grouped by tier, in first-seen order."""
    out: dict[str, list[Candidate]] = {}
    for c in cands:
        out.setdefault(c.tier, []).append(c)
    return out


def completion_budget(req: RoutingRequest) -> int:
    return req.max_tokens if req.max_tokens is not None else req.default_completion_tokens


class Filter(Protocol):
    name: str

    def filter(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[Candidate], str]: ...


class Scorer(Protocol):
    name: str

    def score(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[float], str]: ...


@runtime_checkable
class EstimatingScorer(Scorer, Protocol):
    """A scorer that also tells what it predicted per candidate; the engine calls this instead of `score`."""

    def score_estimates(self, req: RoutingRequest,
                        cands: list[Candidate]) -> tuple[list[float], str, list[dict[str, float]]]: ...


class Picker(Protocol):
    name: str

    def pick(self, req: RoutingRequest, cands: list[Candidate], totals: list[float]) -> tuple[list[int], str]:
        """Indices of `cands`, best first."""
        ...
