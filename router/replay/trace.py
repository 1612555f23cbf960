"""The replay trace: JSONL, one request a line, no prompt text.

    {"t": 12.5, "tenant": "demo", "model": "auto", "slo": "interactive", "prompt": 2400, "output": 180,
     "prefix": [{"id": "sys-1", "tokens": 512}, {"id": "doc-77", "tokens": 1600}]}

Fields (TraceRequest):
  t          arrival, seconds from the trace's start (non-decreasing);
  tenant     a tenant of the policy replayed (its allowed models and tiers, budgets, default SLO class);
  model      what the client writes in `model` (a route, an alias or a tier's model id);
  slo        an SLO class of the policy (header `x-tiergate-slo-class`); empty: the tenant's default;
  ttft_ms, tpot_ms   explicit targets (headers `x-slo-ttft-ms`, `x-slo-tpot-ms`), overriding the class's;
  prompt     prompt tokens (the same count for every tier: one tokenizer assumed);
  output     output tokens the model would generate before its end-of-sequence (capped by max_tokens,
             the budget the router forwards, and the context left);
  max_tokens the client's max_tokens, if it sent one;
  stream     streamed (TTFT = first token) or not (TTFT = the whole answer);
  prefix     shared prefixes, in order: group ids and their token lengths. The prompt is the groups'
             token streams one after the other, then `prompt - sum(tokens)` tokens of its own. A group's
             tokens are a function of its id and position (router/replay/blocks.py), so two requests
             share exactly the prefix they share groups for, at block granularity, in the router's
             affinity hashes and the engines' prefix caches alike. A group may grow between requests
             (a conversation: its first N tokens are the same);
  continues  the output continues the last group's stream (multi-turn: the next turn's prefix group,
             grown by this turn's answer and the next message, then hits the blocks this answer
             filled in the engine's cache);
  id         an optional request id.
`tiergate replay synth` writes standard workloads (router/replay/synth.py); a router started with
TIERGATE_RECORD_TRACE writes its own traffic in this form (router/replay/record.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import IO

import msgspec


class Prefix(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    tokens: int


class TraceRequest(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    t: float
    tenant: str
    model: str
    prompt: int
    output: int
    slo: str = ""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    max_tokens: int | None = None
    stream: bool = True
    prefix: tuple[Prefix, ...] = ()
    continues: bool = False
    id: str = ""

    def headers(self) -> dict[str, str]:
        """The request's SLO as the live router reads it from headers (router/slo.py)."""
        h: dict[str, str] = {}
        if self.slo:
            h["x-tiergate-slo-class"] = self.slo
        if self.ttft_ms is not None:
            h["x-slo-ttft-ms"] = repr(self.ttft_ms)
        if self.tpot_ms is not None:
            h["x-slo-tpot-ms"] = repr(self.tpot_ms)
        return h


class TraceError(ValueError):
    pass


_dec = msgspec.json.Decoder(TraceRequest)
_enc = msgspec.json.Encoder()


def check(r: TraceRequest, where: str) -> None:
    if r.prompt < 1 or r.output < 0:
        raise TraceError(f"{where}: 'prompt' must be >= 1 and 'output' >= 0")
    shared = sum(p.tokens for p in r.prefix)
    if any(p.tokens < 1 for p in r.prefix) or shared > r.prompt:
        raise TraceError(f"{where}: 'prefix' token counts must be >= 1 and sum to at most 'prompt' ({r.prompt})")
    if r.t < 0:
        raise TraceError(f"{where}: 't' must be >= 0")


def read_trace(path: Path) -> Iterator[TraceRequest]:
    """Requests in file order; a bad line is a TraceError naming the line and the field."""
    last = 0.0
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = _dec.decode(line)
            except msgspec.ValidationError as exc:
                raise TraceError(f"{path}:{n}: {exc}") from None
            except msgspec.DecodeError as exc:
                raise TraceError(f"{path}:{n}: not JSON: {exc}") from None
            check(r, f"{path}:{n}")
            if r.t < last:
                raise TraceError(f"{path}:{n}: 't' goes back in time ({r.t} after {last})")
            last = r.t
            yield r


def write_trace(reqs: Iterator[TraceRequest] | list[TraceRequest], out: IO[bytes]) -> int:
    n = 0
    for r in reqs:
        out.write(_enc.encode(r) + b"\n")
        n += 1
    return n


def encode_line(r: TraceRequest) -> bytes:
    return _enc.encode(r) + b"\n"
