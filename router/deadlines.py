"""Upstream deadlines: how long a backend may take to its first byte, and between the chunks of a stream.

First byte, per attempt:
    first_byte_s = clamp(factor x max(predicted TTFT, the request's TTFT target), min_s, max_s)
  * predicted TTFT: the `slo_feasible` predictor (policies/plugins/slo_feasible.py) on the candidate,
    so a long prompt or a long queue there gets a longer deadline. A tier that has not learned its
    prefill rate yet is predicted at `assumed_prefill_tps`, a deliberately slow rate, so a long
    prompt is not cut short before the rate is known. (The tier's observed mean TTFT is left out on
    purpose: a failed-over request's TTFT includes the deadline it waited out, so a deadline fed by
    it would grow with every failover);
  * a stream's first byte is its first events, which the forwarder checks before the client gets
    its 200 (vLLM sends its first event with the first token, after prefill:
    vllm/entrypoints/openai/serving_chat.py `chat_completion_stream_generator`, `first_iteration`,
    vllm-project/vllm@003fe5932dc9e1b331347894d3cbc5ddfe89e9eb);
  * a response that is not streamed arrives whole at the end (same file,
    `chat_completion_full_generator`), so it gets, on top, `factor x TPOT` per completion token it may
    produce (its max_tokens, else what is left of the context; TPOT: the class's target or the tier's
    mean, at least `min_tpot_s`), all capped at `body_max_s` (the upstream read timeout).
Stall, between two chunks of a stream once it is relayed:
    stall_s = clamp(stall_factor x max(TPOT target, the tier's mean TPOT), stall_min_s, stall_max_s)
  and `stall_default_s` when neither is known.
A tier may fix either in the policy (`first_byte_timeout_s`, `stall_timeout_s`); the non-streamed
per-token allowance still applies on top of a fixed first-byte deadline.
What happens at a deadline is the forwarder's (router/proxy.py): before the first byte reaches the
client, another instance (and the timeout counts as an outlier failure); after it, an SSE error event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from policies.plugins.slo_feasible import predicted_ttft_s
from policies.schema import TierSpec
from policies.types import Candidate, RoutingRequest
from router.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Deadlines:
    first_byte_factor: float = 3.0
    first_byte_min_s: float = 5.0
    first_byte_max_s: float = 120.0
    assumed_prefill_tps: float = 2000.0
    min_tpot_s: float = 0.05
    body_max_s: float = 300.0
    stall_factor: float = 200.0
    stall_min_s: float = 15.0
    stall_max_s: float = 120.0
    stall_default_s: float = 30.0

    @classmethod
    def from_settings(cls, s: Settings) -> Deadlines:
        return cls(first_byte_factor=s.first_byte_factor, first_byte_min_s=s.first_byte_min_s,
                   first_byte_max_s=s.first_byte_max_s, assumed_prefill_tps=s.first_byte_assumed_prefill_tps,
                   body_max_s=s.upstream_read_timeout_s, stall_factor=s.stall_factor, stall_min_s=s.stall_min_s,
                   stall_max_s=s.stall_max_s, stall_default_s=s.stall_default_s)

    def first_byte_s(self, req: RoutingRequest | None, cand: Candidate, tier: TierSpec | None) -> float:
        if tier is not None and tier.first_byte_timeout_s is not None:
            return tier.first_byte_timeout_s
        base = 0.0
        if req is not None:
            c = cand if cand.prefill_tps > 0 else msgspec.structs.replace(cand, prefill_tps=self.assumed_prefill_tps)
            base = max(base, predicted_ttft_s(req, c) or 0.0, req.ttft_target_s or 0.0)
        return min(max(self.first_byte_factor * base, self.first_byte_min_s), self.first_byte_max_s)

    def body_s(self, req: RoutingRequest | None, cand: Candidate, first_byte_s: float) -> float:
        """The whole of a response that is not streamed."""
        prompt = req.prompt_tokens.get(cand.tier, 0) if req is not None else 0
        tokens = req.max_tokens if req is not None and req.max_tokens is not None else cand.max_model_len - prompt
        tpot = max(self.min_tpot_s, cand.tpot_s, (req.tpot_target_s or 0.0) if req is not None else 0.0)
        return min(first_byte_s + max(tokens, 1) * tpot * self.first_byte_factor, self.body_max_s)

    def stall_s(self, req: RoutingRequest | None, cand: Candidate, tier: TierSpec | None) -> float:
        if tier is not None and tier.stall_timeout_s is not None:
            return tier.stall_timeout_s
        tpot = max(cand.tpot_s, (req.tpot_target_s or 0.0) if req is not None else 0.0)
        if tpot <= 0:
            return self.stall_default_s
        return min(max(self.stall_factor * tpot, self.stall_min_s), self.stall_max_s)


class Stalled(Exception):
    """The backend sent nothing for the stall deadline (raised by `StallWatch.read`)."""


class StallWatch:
    """The inter-chunk deadline of one stream, on one timer that is re-armed lazily (when it fires early),
    not one timer per chunk. It only ever cancels a read in progress: time the relay spends writing to a
    slow client is not the backend's."""

    __slots__ = ("_handle", "_loop", "_reader", "_until", "fired", "stall_s")

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.fired = False
        self._loop = asyncio.get_running_loop()
        self._until = 0.0
        self._reader: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None

    async def read(self, chunk: Awaitable[T]) -> T:
        """Await `chunk` (the next read upstream); raises `Stalled` once it took longer than `stall_s`."""
        self._until = self._loop.time() + self.stall_s
        if self._handle is None:
            self._handle = self._loop.call_at(self._until, self._check)
        self._reader = asyncio.current_task()
        try:
            return await chunk
        except asyncio.CancelledError:
            # ours alone (no other cancel pending, e.g. the client leaving): the stream stalled
            if self.fired and self._reader is not None and self._reader.uncancel() == 0:
                raise Stalled from None
            raise
        finally:
            self._reader = None

    def _check(self) -> None:
        self._handle = None
        if self._reader is None:
            return  # not reading now: the next read re-arms
        if self._loop.time() < self._until:
            self._handle = self._loop.call_at(self._until, self._check)
            return
        self.fired = True
        self._reader.cancel("upstream stream stalled")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
