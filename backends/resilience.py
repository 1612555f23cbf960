"""Passive outlier ejection, Retry-After cool-downs and a retry budget (Envoy's vocabulary).

Outlier ejection (per instance, clock injected):
  * `consecutive_failures` failures in a row eject the instance for `base_ejection_s x
    times_ejected` (capped at `max_ejection_s`). Failures: connect errors, first-byte and
    stall deadlines (router/deadlines.py), 5xx answers, malformed bodies and SSE events. A
    5xx or malformed answer counts only once the request is served elsewhere (or has no
    other instance to try), never when the request failed on two instances (a query of
    death: router/proxy.py). Success is counted after a well-formed answer only;
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
Retry budget (it stops retry storms, not single failovers):
  * a retry to an idle instance is never refused: the instance is serving (healthy, not
    ejected, not cooling down) and nothing waits there for its first token (no request of any
    replica still prefilling there, and the engine reports none waiting). Such a retry
    queues behind no one and adds load only where there is room for it;
  * any other retry takes a slot, allowed while retries in progress < max(`min_retries`,
    `budget_percent` x requests in progress), so failing backends cannot multiply the
    load on busy ones;
  * retries after a connect error (the request never reached a backend, or the backend
    vanished) are outside the budget: they add no load to anything that is still up;
  * a request is tried on at most `max_attempts` instances, and one that failed on two
    instances is not retried further (the query-of-death guard, router/proxy.py).
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
        self.free = 0          # retries to idle instances, which take no slot

    def limit(self) -> int:
        return max(self.min_retries, int(self.active() * self.budget_percent / 100.0))

    def try_acquire(self) -> bool:
        if self.active_retries >= self.limit():
            self.denied += 1
            return False
        self.active_retries += 1
        return True

    def admit(self, target_idle: bool) -> str:
        """A retry's verdict: "free" (an idle target: no slot taken), "slot" (call `release` when the
        attempt ends) or "denied"."""
        if target_idle:
            self.free += 1
            return "free"
        return "slot" if self.try_acquire() else "denied"

    def release(self) -> None:
        self.active_retries -= 1

