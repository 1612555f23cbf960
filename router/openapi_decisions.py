"""Docs-only Structs for the decision documents (router/explain.py): the dry-run's answer, the explain
header and stream chunk, and a decision record. Like router/openapi_models.py, nothing decodes into these."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct


class Estimate(Struct, kw_only=True):
    """What the estimating scorer (expected_money) predicted for a candidate."""
    usd: Annotated[float, Meta(description="The objective: billed USD (tokens and/or GPU) plus usd_miss.")]
    usd_tokens: float
    usd_gpu: float
    usd_miss: Annotated[float, Meta(description="p_miss x the SLO class's miss_cost_usd.")]
    p_miss: Annotated[float, Meta(ge=0, le=1, description="P(miss the TTFT or TPOT target).")]
    ttft_ms: Annotated[float | None, Meta(description="Predicted time to first token.")] = None
    tpot_ms: Annotated[float | None, Meta(description="Predicted time per output token.")] = None


class CandidateInputs(Struct, kw_only=True):
    cached_tokens: int
    running: int
    waiting: int
    pending_requests: int
    in_flight: int


class ExplainedCandidate(Struct, kw_only=True):
    key: Annotated[str, Meta(description="tier/instance")]
    tier: str
    instance: str
    status: Literal["chosen", "ranked", "rejected"]
    rank: Annotated[int, Meta(ge=1, description="1 = chosen; ranked candidates only.")] | None = None
    rejected_by: Annotated[str | None, Meta(description="The filter that removed it.")] = None
    scores: Annotated[dict[str, float] | None, Meta(description="Per scorer, in [0, 1].")] = None
    total: Annotated[float | None, Meta(description="The weighted sum of the scores.")] = None
    inputs: CandidateInputs | None = None
    est: Estimate | None = None


class SloTargets(Struct, kw_only=True, rename={"class_": "class"}):
    class_: Annotated[str | None, Meta(description="The SLO class.")] = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    miss_cost_usd: float = 0.0


class Truncated(Struct, kw_only=True):
    candidates_omitted: int
    note: str


class RefusalDetail(Struct, kw_only=True):
    status: int
    message: str
    type: str
    param: str | None
    code: str | None


class RouteDecision(Struct, kw_only=True):
    """A routing decision: POST /v1/route's answer, the `x-tiergate-explain` header, and the
    `tiergate_explain` member of a stream's last chunk before [DONE]."""
    object: Literal["tiergate.decision"]
    request_id: str
    tenant: str
    route: str
    profile: str
    policy_version: str
    slo: SloTargets
    prompt_tokens: Annotated[dict[str, int], Meta(description="Prompt tokens per tier (each tier's tokenizer).")]
    max_tokens: int | None
    expected_output_tokens: float | None
    chosen: Annotated[str | None, Meta(description="The chosen candidate's key; null: the request is refused.")]
    ranking: Annotated[list[str], Meta(description="Feasible candidates, best first (the retry order).")]
    candidates: list[ExplainedCandidate]
    reasons: Annotated[list[str], Meta(description="'plugin: why', per filter, scorer and picker.")]
    truncated: Truncated | None = None
    served: Annotated[str | None, Meta(description="Explain only: the candidate that answered.")] = None
    error: Annotated[RefusalDetail | None, Meta(description="Dry-run only: the refusal the live path "
                                                            "would answer when no candidate survives.")] = None


class RecordedDecision(Struct, kw_only=True):
    chosen: str | None
    ranking: list[str]
    candidates: list[ExplainedCandidate]
    reasons: list[str]


class DecisionRecord(Struct, kw_only=True):
    """One request's decision record: the estimate next to what happened (never the prompt)."""
    object: Literal["tiergate.decision_record"]
    request_id: str
    at_ms: int
    tenant: str
    route: str
    slo_class: str | None
    tier: str | None
    instance: str | None
    status: int
    est_cost_usd: float | None
    cost_usd: float
    pred_ttft_ms: float | None
    ttft_ms: float | None
    pred_tpot_ms: float | None
    tpot_ms: float | None
    p_miss: float | None
    latency_ms: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    shadow_chosen: Annotated[str | None, Meta(description="With a shadow policy: its choice.")] = None
    shadow_cost_delta_usd: Annotated[float | None, Meta(description="Shadow minus live, estimated.")] = None
    decision: RecordedDecision | None = None
