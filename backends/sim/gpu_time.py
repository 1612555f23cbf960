"""Exact GPU time per request in the simulator (the chargeback model of router/chargeback.py).

A step of `dt` seconds is split over its batch in proportion to each request's tokens in it (a prefill
chunk's n tokens, one per decoding request); `charge` adds each request's share to `SimRequest.gpu_s` and
`dt` to the engine's `EngineStats.gpu_busy_s` (the sum of the durations of steps that served anything), so
the shares add up to the busy time. `decoders`: requests in the step that are not in `batch` (the virtual
engine's decoding group, backends/sim/virtual.py), one token each; their per-request share is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.sim.engine import EngineStats, SimRequest


def charge(stats: EngineStats, batch: Sequence[tuple[SimRequest, int]], dt: float, decoders: int = 0) -> float:
    """Charge one step; -> the share of each of the `decoders` (0.0 when the step served nothing)."""
    tokens = decoders + sum(n for _, n in batch)
    if tokens <= 0 or dt <= 0:
        return 0.0
    stats.gpu_busy_s += dt
    per = dt / tokens
    for req, n in batch:
        req.gpu_s += per * n
    return per
