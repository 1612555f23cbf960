"""Decision records: what the core decided for one request, next to what happened, written through a sink.

The core (router/lifecycle/core.py `Lifecycle.close_out`) builds one `DecisionRecord` per request and hands
it to its `RecordSink`, if it has one. A sink's `write` must not block or raise: the live driver's sink
(router/decision_records.py) queues the record and writes it to a bounded Redis stream from a background
task; `MemoryRecordSink` keeps the last N in memory (the replay driver, tests). A record holds the
`RoutingDecision` itself, not a serialized copy, so building one costs a few attribute stores; a sink
that stores records elsewhere serializes them off the request path (router/explain.py `record_doc`).

Estimates come from the decision (policies/plugins/expected_money.py): the served candidate's (where a
retry served it on another candidate, that one's), else the chosen one's; predictions absent from the
decision (a profile without an estimating scorer) are None.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from policies.types import RoutingDecision

__all__ = ["DecisionRecord", "MemoryRecordSink", "RecordSink", "served_estimate"]


@dataclass(slots=True)
class DecisionRecord:
    request_id: str
    at_ms: int                      # the usage record's time (the driver's wall clock: virtual in replay)
    tenant: str
    route: str
    slo_class: str
    decision: RoutingDecision | None
    tier: str | None                # what served it (None: nothing did)
    instance: str | None
    status: int
    est: dict[str, float]           # the served (else chosen) candidate's estimate: usd, usd_tokens, ttft_s...
    cost_usd: float                 # actual, at the tier's prices
    ttft_ms: float | None           # actual
    tpot_ms: float | None           # actual (a stream with at least two tokens)
    latency_ms: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    notes: dict[str, object] = field(default_factory=dict)   # driver extras (shadow_chosen, ...)

    @property
    def est_cost_usd(self) -> float | None:
        return self.est.get("usd")

    @property
    def pred_ttft_ms(self) -> float | None:
        v = self.est.get("ttft_s")
        return None if v is None else v * 1000

    @property
    def pred_tpot_ms(self) -> float | None:
        v = self.est.get("tpot_s")
        return None if v is None else v * 1000


def served_estimate(decision: RoutingDecision | None, tier: str | None, instance: str | None) -> dict[str, float]:
    """The estimate of the candidate that served (else of the chosen one); {} when none was estimated."""
    if decision is None:
        return {}
    if tier is not None and instance is not None:
        est = decision.estimates.get(f"{tier}/{instance}")
        if est is not None:
            return est
    if decision.chosen is not None:
        return decision.estimates.get(decision.chosen.key, {})
    return {}


class RecordSink(Protocol):
    """Where the core writes decision records; `write` never blocks and never raises."""

    def write(self, record: DecisionRecord) -> None: ...


class MemoryRecordSink:
    """The last `maxlen` records, in memory; `lookup` finds the newest with a request id."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self.records: deque[DecisionRecord] = deque(maxlen=maxlen)

    def write(self, record: DecisionRecord) -> None:
        self.records.append(record)

    def lookup(self, request_id: str) -> DecisionRecord | None:
        for r in reversed(self.records):
            if r.request_id == request_id:
                return r
        return None

    def __len__(self) -> int:
        return len(self.records)
