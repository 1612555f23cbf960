"""Passive outlier ejection, Retry-After cool-downs and a retry budget (Envoy's vocabulary).

Outlier ejection (per instance, clock injected):
  * `consecutive_failures` 5xx answers or connect errors in a row eject the instance
    for `base_ejection_s x times_ejected` (capped at `max_ejection_s`);
  * never more than `max_ejection_percent` of a tier's instances are ejected at once
    (the failure is still counted, the instance stays in);
  * this is the per-instance circuit breaker: closed -> open (ejected) -> half-open.
    When the ejection time is over the instance is readmitted half-open and takes one
    trial request at a time; its failure ejects it again at once, for longer; its
    success closes it, and each `base_ejection_s x 10` of healthy service after that
    forgets one past ejection;
  * panic: the `healthy` filter keeps every instance when none is serving
    (`panic_when_empty`).
Cool-down: a 429 or 503 carrying Retry-After takes the instance out for that long
(capped at `max_cooldown_s`), without counting as an outlier failure for 429.
Retry budget: a retry is allowed while retries in progress < max(`min_retries`,
`budget_percent` x requests in progress), so a failing backend cannot multiply load.
Retries after a connect error (the request never reached a backend, or the backend
vanished) are outside the budget: they add no load to anything that is still up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True)
class OutlierConfig:
    consecutive_failures: int = 3
    base_ejection_s: float = 5.0
    max_ejection_s: float = 300.0
    max_ejection_percent: float = 50.0
    max_cooldown_s: float = 60.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds only; HTTP dates are ignored)."""
    if value is None:
        return None
    try:
        v = float(value.strip())
    except ValueError:
        return None
    return v if math.isfinite(v) and v >= 0 else None


class RetryBudget:
    """`active`: requests in progress (the registry's in-flight total)."""

    def __init__(self, active: Callable[[], int], budget_percent: float = 20.0, min_retries: int = 3) -> None:
        self.active = active
        self.budget_percent = budget_percent
        self.min_retries = min_retries
        self.active_retries = 0
        self.denied = 0

    def limit(self) -> int:
        return max(self.min_retries, int(self.active() * self.budget_percent / 100.0))

    def try_acquire(self) -> bool:
        if self.active_retries >= self.limit():
            self.denied += 1
            return False
        self.active_retries += 1
        return True

    def release(self) -> None:
        self.active_retries -= 1

