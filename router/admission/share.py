"""Tenants' shares of a class's arrivals at the gate, for the deadline rule (issue #14).

Algorithm: per level (tier, class priority), each tenant's requests entering the gate are counted with
exponential decay, v_t <- v_t * exp(-(now - last_t) / TAU_S) + 1. At its `max_queue_ms` a queued request
is sent anyway (bypass) unless its tenant is over its share of the level:
    v_t / sum(v) > MARGIN * w_t / sum(w)      over the tenants whose v >= MIN_ACTIVE,
then it is shed (429 with Retry-After): under overload, the tenant that sends more than its weighted share
absorbs the refusals, and the engines are not flooded past the router's fair queue. A tenant alone in its
level is never over its share (nothing changes for a single tenant).
Parameters (constants): TAU_S = 10 s (the memory of the shares), MARGIN = 1.5 (x its fair share before it
counts as over: equal tenants with noisy rates are never over), MIN_ACTIVE = 0.05 (below it a tenant has
gone quiet and is forgotten).
Costs: O(tenants active in the level) per check; an entry is kept per active tenant only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TAU_S = 10.0
MARGIN = 1.5
MIN_ACTIVE = 0.05


@dataclass
class _Level:
    v: dict[str, float] = field(default_factory=dict)
    at: dict[str, float] = field(default_factory=dict)
    w: dict[str, float] = field(default_factory=dict)


@dataclass
class Shares:
    levels: dict[tuple[str, int], _Level] = field(default_factory=dict)

    def arrive(self, level: tuple[str, int], tenant: str, weight: float, now: float) -> None:
        lv = self.levels.setdefault(level, _Level())
        lv.v[tenant] = self._value(lv, tenant, now) + 1.0
        lv.at[tenant], lv.w[tenant] = now, weight

    @staticmethod
    def _value(lv: _Level, tenant: str, now: float) -> float:
        v = lv.v.get(tenant, 0.0)
        return v * math.exp(-max(0.0, now - lv.at.get(tenant, now)) / TAU_S) if v else 0.0

    def over(self, level: tuple[str, int], tenant: str, now: float) -> bool:
        """Whether `tenant` sends more than MARGIN x its weighted share of the level (module doc)."""
        lv = self.levels.get(level)
        if lv is None or tenant not in lv.v:
            return False
        vals = {t: self._value(lv, t, now) for t in list(lv.v)}
        for t, v in vals.items():
            if v < MIN_ACTIVE and t != tenant:
                del lv.v[t], lv.at[t], lv.w[t]
        active = {t: v for t, v in vals.items() if v >= MIN_ACTIVE or t == tenant}
        if len(active) < 2:
            return False
        total_v = sum(active.values())
        total_w = sum(lv.w[t] for t in active)
        return active[tenant] / total_v > MARGIN * lv.w[tenant] / total_w
