"""What a routing decision was, as JSON: for the dry-run (`POST /v1/route`), the explain header and stream
chunk (`x-tiergate-explain: 1`), and the decision records (router/decision_records.py).

The document (`decision_doc`):
  object "tiergate.decision"; request_id, tenant, route, profile, policy_version;
  slo {class, ttft_ms, tpot_ms, miss_cost_usd}; prompt_tokens per tier; expected_output_tokens;
  chosen (the candidate key "tier/instance", or null) and ranking (the feasible keys, best first);
  candidates: ranked ones first, in rank order, then those the filters removed, each with
    key, tier, instance, status (chosen | ranked | rejected), rank (1-based, ranked only),
    rejected_by (the filter that removed it), scores (per scorer, in [0, 1]), total (the weighted sum),
    inputs (cached_tokens, running, waiting, pending_requests, in_flight: what the prediction saw),
    est (the estimating scorer's figures: usd = the objective, usd_tokens, usd_gpu, usd_miss, p_miss,
    ttft_ms, tpot_ms; rejected candidates were never priced, so they have none);
  reasons: "plugin: why", per filter, scorer and picker, in order;
  truncated {candidates_omitted, note}: only when candidates were left out (see below);
  error: for a dry-run that no candidate survives, the OpenAI error the live path answers.

Bounds: at most `max_candidates` candidates are listed (the ranked ones first). As a response header
(`header_value`) the JSON is ASCII and at most `HEADER_LIMIT` bytes (proxies commonly refuse headers past
8 KiB): candidates are dropped from the end, then the reasons shortened, until it fits. For a stream the
document rides in one extra chunk just before `data: [DONE]` (`with_explain`): the stream's own id,
object, created and model, `"choices": []` (as the include_usage chunk has) and a `tiergate_explain`
member. openai-python parses every `data:` event into a chunk without validating it (openai/_streaming.py
`Stream.__stream__`, `process_data`) and keeps unknown members (`chunk.model_extra`), so the SDK takes it;
a client that indexes `choices[0]` on every chunk breaks on it, as it does on the usage chunk, which is
why the chunk is only sent to a request that asked for it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import msgspec

from policies.types import Candidate, RoutingDecision, RoutingRequest
from router.lifecycle.records import DecisionRecord

__all__ = ["HEADER_LIMIT", "decision_doc", "header_value", "record_doc", "wants_explain", "with_explain"]

HEADER_LIMIT = 8000
REASON_CHARS = 300
_enc = msgspec.json.Encoder()
_EST_MS = {"ttft_s": "ttft_ms", "tpot_s": "tpot_ms"}


def wants_explain(headers: Mapping[str, str]) -> bool:
    return (headers.get("x-tiergate-explain") or "").strip().lower() in ("1", "true", "yes")


def _est(est: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in est.items():
        if k in _EST_MS:
            out[_EST_MS[k]] = round(v * 1000, 3)
        elif k.startswith("usd"):
            out[k] = round(v, 10)
        else:
            out[k] = round(v, 6)
    return out


def _inputs(c: Candidate) -> dict[str, int]:
    return {"cached_tokens": c.cached_tokens, "running": c.running, "waiting": c.waiting,
            "pending_requests": c.pending_requests, "in_flight": c.in_flight}


def _candidates(decision: RoutingDecision, cands: list[Candidate]) -> list[dict[str, Any]]:
    chosen = decision.chosen.key if decision.chosen is not None else None
    out: list[dict[str, Any]] = []
    for rank, c in enumerate(decision.ranked, 1):
        entry: dict[str, Any] = {"key": c.key, "tier": c.tier, "instance": c.instance_id,
                                 "status": "chosen" if c.key == chosen else "ranked", "rank": rank,
                                 "scores": {k: round(v, 6) for k, v in decision.scores.get(c.key, {}).items()},
                                 "total": round(decision.totals.get(c.key, 0.0), 6), "inputs": _inputs(c)}
        if c.key in decision.estimates:
            entry["est"] = _est(decision.estimates[c.key])
        out.append(entry)
    by_key = {c.key: c for c in cands}
    for key, flt in decision.rejected.items():
        tier, _, inst = key.partition("/")
        entry = {"key": key, "tier": tier, "instance": inst, "status": "rejected", "rejected_by": flt}
        if (snap := by_key.get(key)) is not None:
            entry["inputs"] = _inputs(snap)
        out.append(entry)
    return out


def decision_doc(decision: RoutingDecision, cands: list[Candidate], rreq: RoutingRequest, *, profile: str = "",
                 policy_version: str = "", max_candidates: int = 16) -> dict[str, Any]:
    """The decision as a JSON-ready dict (the module header); `cands`: the snapshot it was made on."""
    listed = _candidates(decision, cands)
    doc: dict[str, Any] = {
        "object": "tiergate.decision", "request_id": rreq.request_id, "tenant": rreq.tenant,
        "route": rreq.virtual_model, "profile": profile, "policy_version": policy_version,
        "slo": {"class": rreq.slo_class or None,
                "ttft_ms": None if rreq.ttft_target_s is None else round(rreq.ttft_target_s * 1000, 3),
                "tpot_ms": None if rreq.tpot_target_s is None else round(rreq.tpot_target_s * 1000, 3),
                "miss_cost_usd": rreq.miss_cost_usd},
        "prompt_tokens": dict(rreq.prompt_tokens), "max_tokens": rreq.max_tokens,
        "expected_output_tokens": None if rreq.expected_output_tokens is None else
        round(rreq.expected_output_tokens, 1),
        "chosen": decision.chosen.key if decision.chosen is not None else None,
        "ranking": [c.key for c in decision.ranked],
        "candidates": listed[:max(0, max_candidates)],
        "reasons": [f"{r.plugin}: {r.reason}"[:REASON_CHARS] for r in decision.reasons],
    }
    if len(listed) > max_candidates:
        _omit(doc, len(listed) - max(0, max_candidates))
    return doc


def _omit(doc: dict[str, Any], n: int) -> None:
    n += doc.get("truncated", {}).get("candidates_omitted", 0)
    doc["truncated"] = {"candidates_omitted": n,
                        "note": f"{n} candidate(s) left out; POST /v1/route lists up to explain_max_candidates"}


def _ascii_json(doc: Mapping[str, Any]) -> bytes:
    raw = _enc.encode(doc)
    if raw.isascii():
        return raw
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode()


def header_value(doc: dict[str, Any], limit: int = HEADER_LIMIT) -> str:
    """Compact ASCII JSON of at most `limit` bytes: candidates dropped from the end, then reasons cut."""
    doc = dict(doc)
    raw = _ascii_json(doc)
    while len(raw) > limit and doc["candidates"]:
        keep = len(doc["candidates"]) // 2 if len(raw) > 2 * limit else len(doc["candidates"]) - 1
        _omit(doc, len(doc["candidates"]) - keep)
        doc["candidates"] = doc["candidates"][:keep]
        raw = _ascii_json(doc)
    if len(raw) > limit:
        doc["reasons"] = [r[:80] for r in doc["reasons"]][:8]
        raw = _ascii_json(doc)
    if len(raw) > limit:  # the request's own fields (many tiers): the essentials only
        raw = _ascii_json({k: doc[k] for k in ("object", "request_id", "chosen", "truncated") if k in doc})
    return raw.decode()


class _Head(msgspec.Struct):
    id: str = ""
    object: str = ""
    created: int = 0
    model: str = ""


_head_dec = msgspec.json.Decoder(_Head)


def _head_of(chunk: bytes, kind: str) -> _Head:
    """The stream's id, object, created and model, from its first data event."""
    i = chunk.find(b"data: {")
    j = chunk.find(b"\n\n", i)
    try:
        if i >= 0 and j > i:
            return _head_dec.decode(chunk[i + 6: j])
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        pass
    return _Head(object="chat.completion.chunk" if kind == "chat" else "text_completion")


def _done_at(chunk: bytes) -> int:
    """Where the `data: [DONE]` event starts in a chunk of whole events, or -1."""
    i = chunk.find(b"data: [DONE]")
    while i > 0 and chunk[i - 2: i] != b"\n\n":
        i = chunk.find(b"data: [DONE]", i + 1)
    return i


def explain_event(doc: dict[str, Any], head: _Head, kind: str) -> bytes:
    obj = head.object or ("chat.completion.chunk" if kind == "chat" else "text_completion")
    chunk = {"id": head.id, "object": obj, "created": head.created, "model": head.model, "choices": [],
             "tiergate_explain": doc}
    return b"data: " + _enc.encode(chunk) + b"\n\n"


async def with_explain(stream: AsyncIterator[bytes], doc: dict[str, Any], kind: str) -> AsyncIterator[bytes]:
    """The stream with one explain chunk before its `[DONE]` (a stream ended by an error event, which has
    no [DONE], gets none). Closing this closes the stream it wraps, so the relay sees a client that left."""
    head: _Head | None = None
    sent = False
    try:
        async for chunk in stream:
            if head is None:
                head = _head_of(chunk, kind)
            if not sent and (i := _done_at(chunk)) >= 0:
                sent = True
                chunk = chunk[:i] + explain_event(doc, head, kind) + chunk[i:]
            yield chunk
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def record_doc(rec: DecisionRecord, max_candidates: int = 8) -> dict[str, Any]:
    """A decision record as JSON: the outcome, estimated next to actual, and the decision (no prompt)."""
    est = rec.est
    out: dict[str, Any] = {
        "object": "tiergate.decision_record", "request_id": rec.request_id, "at_ms": rec.at_ms,
        "tenant": rec.tenant, "route": rec.route, "slo_class": rec.slo_class or None,
        "tier": rec.tier, "instance": rec.instance, "status": rec.status,
        "est_cost_usd": round(est["usd"], 10) if "usd" in est else None,
        "cost_usd": round(rec.cost_usd, 10),
        "pred_ttft_ms": None if rec.pred_ttft_ms is None else round(rec.pred_ttft_ms, 3),
        "ttft_ms": None if rec.ttft_ms is None else round(rec.ttft_ms, 3),
        "pred_tpot_ms": None if rec.pred_tpot_ms is None else round(rec.pred_tpot_ms, 3),
        "tpot_ms": None if rec.tpot_ms is None else round(rec.tpot_ms, 3),
        "p_miss": est.get("p_miss"), "latency_ms": round(rec.latency_ms, 3),
        "prompt_tokens": rec.prompt_tokens, "cached_tokens": rec.cached_tokens,
        "completion_tokens": rec.completion_tokens, **rec.notes,
    }
    d = rec.decision
    if d is not None:
        out["decision"] = {
            "chosen": d.chosen.key if d.chosen is not None else None, "ranking": [c.key for c in d.ranked],
            "candidates": _candidates(d, list(d.ranked))[:max_candidates],
            "reasons": [f"{r.plugin}: {r.reason}"[:REASON_CHARS] for r in d.reasons]}
    return out
