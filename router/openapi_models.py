"""Docs-only msgspec Structs: the shapes the OpenAPI document describes (router/openapi.py).

The handlers never decode into these: they take the raw body, read the few fields the router
needs (router/schemas.py) and forward the rest untouched. These Structs exist so the document
is generated (`msgspec.json.schema_components`), not hand-written. Field names and ranges follow
OpenAI's API and vLLM's checks (router/request_checks.py enforces the ranges).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from router.openapi_decisions import DecisionRecord, RouteDecision

Temperature = Annotated[float, Meta(ge=0, le=2, description="Sampling temperature, 0 to 2; 0 is greedy.")]
TopP = Annotated[float, Meta(gt=0, le=1, description="Nucleus sampling mass, above 0 and at most 1.")]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, Meta(ge=1)]


# --- requests -----------------------------------------------------------------------------------
class TextPart(Struct, kw_only=True):
    """A text content part (the demo tiers serve text models)."""
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


class SystemMessage(Struct, tag_field="role", tag="system", kw_only=True):
    content: Content
    name: str | None = None


class DeveloperMessage(Struct, tag_field="role", tag="developer", kw_only=True):
    content: Content
    name: str | None = None


class UserMessage(Struct, tag_field="role", tag="user", kw_only=True):
    content: Content
    name: str | None = None


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: Annotated[str, Meta(description="The arguments as a JSON string.")]


class ToolCall(Struct, kw_only=True):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(Struct, tag_field="role", tag="assistant", kw_only=True):
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(Struct, tag_field="role", tag="tool", kw_only=True):
    content: Content
    tool_call_id: str


ChatMessage = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage


class StreamOptions(Struct, kw_only=True):
    include_usage: Annotated[bool | None, Meta(description="Send a last chunk with the usage.")] = None
    continuous_usage_stats: Annotated[bool | None, Meta(description="vLLM: usage so far on every chunk.")] = None


class FunctionDef(Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: Annotated[dict[str, Any] | None, Meta(description="A JSON Schema object.")] = None


class Tool(Struct, kw_only=True):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(Struct, kw_only=True):
    type: Literal["function"]
    function: Annotated[dict[str, str], Meta(description='{"name": "<function name>"}')]


class ResponseFormat(Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


Stop = Annotated[str, Meta(min_length=1)] | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=16)]


class _Sampling(Struct, kw_only=True):
    model: Annotated[str, Meta(description="A virtual model from GET /v1/models ('auto' lets the router pick).")]
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Meta(ge=1, le=1, description="Only 1 is supported.")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    user: str | None = None
    top_k: Annotated[int, Meta(ge=-1, description="vLLM: 0 or -1 disables.")] | None = None
    min_p: Annotated[float, Meta(ge=0, le=1, description="vLLM extension.")] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0, le=10, description="vLLM extension.")] | None = None
    ignore_eos: Annotated[bool, Meta(description="vLLM extension.")] = False


class ChatCompletionRequest(_Sampling, kw_only=True):
    """OpenAI's chat completion request. Fields not listed are forwarded to the tier as they are."""
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: Annotated[dict[str, Any] | None, Meta(
        description="vLLM: extra arguments for the chat template, e.g. {\"enable_thinking\": false}.")] = None
    add_generation_prompt: bool = True


class CompletionRequest(_Sampling, kw_only=True):
    """OpenAI's (legacy) completion request: one prompt per request."""
    prompt: Annotated[str | list[str | int], Meta(  # msgspec unions hold one array type: the exact anyOf here
        description="A string, a list holding one string, or a list of token ids.",
        extra_json_schema={"anyOf": [{"type": "string"},
                                     {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                                     {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}]})]
    echo: bool | None = None
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    suffix: str | None = None


# --- responses ----------------------------------------------------------------------------------
class PromptTokensDetails(Struct, kw_only=True):
    cached_tokens: int = 0


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class AssistantReply(Struct, kw_only=True):
    role: Literal["assistant"]
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"] | None


class ChatChoice(Struct, kw_only=True):
    index: int
    message: AssistantReply
    finish_reason: FinishReason = None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(Struct, kw_only=True):
    """A chat completion (`stream` false)."""
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Struct, kw_only=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: FinishReason = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    """One `data:` event of a streamed chat completion; the stream ends with `data: [DONE]`.
    With `stream_options.include_usage`, a last chunk has empty `choices` and the `usage`."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    finish_reason: FinishReason = None
    logprobs: dict[str, Any] | None = None


class Completion(Struct, kw_only=True):
    """A text completion; streamed, each `data:` event has this shape too (`text` is the delta)."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TierInfo(Struct, kw_only=True):
    name: str
    model: str
    max_model_len: int


class ModelCard(Struct, kw_only=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    tiers: list[TierInfo]
    max_model_len: int


class ModelList(Struct, kw_only=True):
    object: Literal["list"]
    data: list[ModelCard]


class Health(Struct, kw_only=True):
    status: Literal["ok"]


class Readiness(Struct, kw_only=True):
    ready: bool
    policy_version: str
    reachable_instances: Annotated[dict[str, int], Meta(description="Serving instances per tier.")]
    redis: Annotated[bool | None, Meta(description="null when the router runs without Redis.")] = None


class ReloadResult(Struct, kw_only=True):
    result: Literal["reloaded", "unchanged", "invalid"]
    version: str
    error: str | None = None


class UsageRow(Struct, kw_only=True):
    date: str
    tier: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: float
    baseline_cost_usd: Annotated[float, Meta(description="On the baseline tier, for the requests it could serve.")]
    baseline_requests: Annotated[int, Meta(description="Requests the baseline tier could have served.")] = 0
    baseline_actual_cost_usd: Annotated[float, Meta(description="What those requests really cost.")] = 0.0
    no_alternative_requests: Annotated[int, Meta(description="Requests the baseline could not serve.")] = 0
    no_cache_cost_usd: float
    slo_met: int
    slo_measured: int
    gpu_hours: float = 0.0
    gpu_cost_usd: Annotated[float | None, Meta(description="Where the tier has gpu_cost_per_hour.")] = None
    gpu_source_requests: Annotated[dict[str, int], Meta(description="Requests charged from each input: engine, "
                                                        "sim, throughput (an estimate).")] = {}
    slo_by_class: dict[str, dict[str, int]] = {}


class UsageTotals(Struct, kw_only=True):
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: float
    baseline_cost_usd: float
    no_cache_cost_usd: float
    savings_vs_baseline_usd: Annotated[float, Meta(
        description="baseline_cost_usd - baseline_actual_cost_usd: over the requests the baseline could serve.")]
    savings_from_cache_usd: float
    baseline_requests: int = 0
    baseline_actual_cost_usd: float = 0.0
    no_alternative_requests: int = 0
    not_compared_requests: Annotated[int, Meta(
        description="Recorded before the ledger counted eligibility: not compared.")] = 0
    slo_met: int = 0
    slo_measured: int = 0
    slo_by_class: dict[str, dict[str, int]] = {}
    gpu_hours: float = 0.0
    gpu_cost_usd: float | None = None
    gpu_source_requests: dict[str, int] = {}


class UsageReport(Struct, kw_only=True):
    """One tenant's usage by day and tier, with its budget state."""
    object: Literal["usage"]
    tenant: str
    days: int
    baseline_tier: str = ""
    data: list[UsageRow]
    totals: UsageTotals
    budget: Annotated[dict[str, Any], Meta(description="Budgets (USD) and what is spent and reserved.")]


class UsageReportList(Struct, kw_only=True):
    object: Literal["list"]
    data: list[UsageReport]


class ErrorDetail(Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(Struct, kw_only=True):
    """OpenAI's error shape."""
    error: ErrorDetail


DOC_TYPES: tuple[Any, ...] = (
    ChatCompletionRequest, CompletionRequest, ChatCompletion, ChatCompletionChunk, Completion, ModelList,
    Health, Readiness, ReloadResult, UsageReport, UsageReportList, ErrorResponse, RouteDecision, DecisionRecord)


def schema_components() -> dict[str, Any]:
    """JSON Schema 2020-12 components for DOC_TYPES, referenced as #/components/schemas/<Name>."""
    _, components = msgspec.json.schema_components(DOC_TYPES, ref_template="#/components/schemas/{name}")
    return components
