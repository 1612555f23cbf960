"""GPU-hour chargeback: the GPU time each request is charged (issue #17).

The model. An engine runs steps; each step takes `dt` seconds of one GPU (instance) and serves a batch:
prefill chunks (n prompt tokens of a request) and decode tokens (1 per decoding request). A step's time
is split over its batch in proportion to the tokens each request has in it, so

    gpu_s(request) = sum over the steps it is in of  dt_step x tokens_in_step(request) / tokens_in_step(all)

which is, for the parts of a request's life,
    prefill share  ~= uncached prompt tokens / the tier's prefill rate (tokens per second), and
    decode share   =  sum over its decode steps of step_time / batch_size
                  ~= completion tokens x mean step time / mean batch size during its decode.
The shares of every request add up to the engine's busy time (the sum of its step durations) exactly.

The inputs, best first, recorded per request as `gpu_src` (router/budget_store.py `Usage`):
  sim         the simulator's exact per-step split (backends/sim/gpu_time.py; the replay's engines);
  engine      the engine's scraped batch size (vllm:num_requests_running, the last scrape) and the request's
              own decode time (first to last token, measured on a stream): decode = decode time / batch;
              prefill = uncached prompt tokens / the tier's prefill rate (learned from idle TTFTs, seeded by
              the policy's `prefill_tokens_per_s`);
  throughput  no scrape or no measured decode time: tokens divided by the tier's measured throughput,
              i.e. completion x the tier's TPOT EWMA / concurrency (scraped running, else this router's and
              its peers' in-flight count), plus the same prefill share. Reports say "estimated from
              throughput" for these.
An unmeasured tier (no prefill rate, no TPOT yet) charges 0 for the part it cannot estimate.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class GpuCharge:
    us: int        # GPU-microseconds
    src: str       # engine | sim | throughput


def split_steps(steps: Iterable[tuple[Fraction | int, Mapping[K, int]]]) -> dict[K, Fraction]:
    """The model above over explicit steps: (duration, {request: tokens in the step}) -> GPU time per request,
    in exact arithmetic (durations as Fractions or ints). The shares sum to the durations of non-empty steps."""
    out: dict[K, Fraction] = {}
    for dt, members in steps:
        total = sum(members.values())
        if total <= 0:
            continue
        for k, n in members.items():
            out[k] = out.get(k, Fraction(0)) + Fraction(dt) * n / total
    return out


def micros(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))


def live_charge(*, uncached: int, completion: int, prefill_tps: float | None, decode_s: float | None,
                scraped_running: float | None, in_flight: int, tpot_s: float | None) -> GpuCharge:
    """One request on a live engine (see the module doc). `decode_s`: its measured first-to-last-token time
    (None: not measured, e.g. not streamed); `scraped_running`: the instance's last scraped batch size (None:
    never scraped); `in_flight`: requests this router (and its peers) have there; `tpot_s`: the tier's EWMA."""
    prefill = uncached / prefill_tps if prefill_tps else 0.0
    if decode_s is not None and scraped_running is not None and completion > 0:
        return GpuCharge(micros(prefill + decode_s / max(1.0, scraped_running)), "engine")
    batch = max(1.0, scraped_running if scraped_running is not None else float(in_flight))
    decode = completion * tpot_s / batch if tpot_s else 0.0
    return GpuCharge(micros(prefill + decode), "throughput")
