"""What a replay measured, and its summary (the table and the JSON of `tiergate replay`).

Per served request: the usage the core billed (router/lifecycle/core.py `close_out`: tokens at the
serving tier's prices), its TTFT (arrival to first token; a request that is not streamed: to its whole
answer) and TPOT (first to last token over the tokens after the first), against its class's targets.
Summary per policy:
  usd_per_1m_tokens   billed token cost / (prompt + completion tokens) x 1e6;
  baseline_usd        the cost on the baseline tier of the requests it could have served (their context fits,
                      the tenant may use it: router/lifecycle/billing.py), vs their own cost
                      (baseline_comparable_usd); baseline_no_alternative: the requests it could not serve;
  gpu_seconds         per tier with `gpu_cost_per_hour`: instances x the replay's makespan (provisioned),
                      their busy part, the GPU time charged to its requests (router/chargeback.py) and the
                      provisioned cost; tenants_gpu_s: the GPU time charged per tenant (the ledger's sums);
  slo                 per class: TTFT attainment (the share of served requests whose TTFT met the
                      target, as the live router counts it), TPOT attainment, TTFT p50 / p99;
  tiers               requests per tier, with each tier's bill (tier_usd) and prompt cache hit
                      (tier_cache_hit); tenants: the bill per tenant (the budget ledger's sums);
  refused             requests the router refused, by status and code;
  queue               with `admission.windows`: requests that waited for a window, by how they left the
                      queue (released, bypassed at max_queue_ms, shed), and their wait p50 / p99;
  tenant_ttft_p99_s   with more than one tenant: TTFT p99 per tenant and class.
Percentiles are nearest-rank over every served request of the class. Nothing here reads a clock.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

from router.budget_store import COST_SCALE, Usage


def pct(sorted_xs: list[float], q: float) -> float | None:
    if not sorted_xs:
        return None
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))]


@dataclass
class _Class:
    n: int = 0
    ttft_n: int = 0
    ttft_met: int = 0
    tpot_n: int = 0
    tpot_met: int = 0
    ttft: array[float] = field(default_factory=lambda: array("d"))


@dataclass
class Results:
    requests: int = 0
    served: int = 0
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    cost_units: int = 0
    base_units: int = 0          # on the baseline tier, of the requests it could have served
    base_cost_units: int = 0     # what those same requests cost
    no_alternative: int = 0      # requests the baseline tier could not have served
    tiers: dict[str, int] = field(default_factory=dict)
    tier_units: dict[str, int] = field(default_factory=dict)                 # tier -> billed cost units
    tier_tokens: dict[str, tuple[int, int]] = field(default_factory=dict)    # tier -> (prompt, cached)
    classes: dict[str, _Class] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    tenants_units: dict[str, int] = field(default_factory=dict)
    makespan_s: float = 0.0
    busy_s: dict[str, float] = field(default_factory=dict)
    gpu_busy_s: dict[str, float] = field(default_factory=dict)       # tier -> summed step durations with work
    gpu_us: dict[str, int] = field(default_factory=dict)             # tier -> GPU time charged to its requests
    tenants_gpu_us: dict[str, int] = field(default_factory=dict)     # tenant -> GPU time charged (the ledger's)
    gpu: dict[str, tuple[int, float]] = field(default_factory=dict)   # tier -> (instances, usd per hour)
    queue: dict[str, int] | None = None      # admission windows on: requests by how they left the queue
    queue_wait: dict[str, list[float]] = field(default_factory=dict)   # class -> waits of its queued requests
    tenant_ttft: dict[tuple[str, str], array[float]] = field(default_factory=dict)   # (tenant, class) -> TTFTs

    def refuse(self, status: int, code: str | None) -> None:
        key = f"{status} {code or ''}".strip()
        self.refused[key] = self.refused.get(key, 0) + 1

    def serve(self, u: Usage, slo_class: str, ttft_target: float | None, tpot_target: float | None,
              ttft_s: float | None, tpot_s: float | None, tenant: str = "") -> None:
        self.served += 1
        self.prompt += u.prompt
        self.cached += u.cached
        self.completion += u.completion
        self.cost_units += u.cost
        self.base_units += u.base
        if u.base_ok:
            self.base_cost_units += u.cost
        elif u.base_ok is False:
            self.no_alternative += 1
        self.tiers[u.tier] = self.tiers.get(u.tier, 0) + 1
        self.tier_units[u.tier] = self.tier_units.get(u.tier, 0) + u.cost
        self.gpu_us[u.tier] = self.gpu_us.get(u.tier, 0) + u.gpu_us
        p, k = self.tier_tokens.get(u.tier, (0, 0))
        self.tier_tokens[u.tier] = (p + u.prompt, k + u.cached)
        c = self.classes.get(slo_class)
        if c is None:
            c = self.classes[slo_class] = _Class()
        c.n += 1
        if ttft_s is not None:
            c.ttft.append(ttft_s)
            xs = self.tenant_ttft.get((tenant, slo_class))
            if xs is None:
                xs = self.tenant_ttft[(tenant, slo_class)] = array("d")
            xs.append(ttft_s)
            if ttft_target is not None:
                c.ttft_n += 1
                c.ttft_met += ttft_s <= ttft_target
        if tpot_target is not None and tpot_s is not None:
            c.tpot_n += 1
            c.tpot_met += tpot_s <= tpot_target

    def summary(self) -> dict[str, Any]:
        tokens = self.prompt + self.completion
        slo: dict[str, Any] = {}
        for name in sorted(self.classes):
            c = self.classes[name]
            xs = sorted(c.ttft)
            p50, p99 = pct(xs, 0.50), pct(xs, 0.99)
            slo[name] = {"requests": c.n,
                         "ttft_attainment": round(c.ttft_met / c.ttft_n, 6) if c.ttft_n else None,
                         "tpot_attainment": round(c.tpot_met / c.tpot_n, 6) if c.tpot_n else None,
                         "ttft_p50_s": None if p50 is None else round(p50, 6),
                         "ttft_p99_s": None if p99 is None else round(p99, 6)}
        gpu = {}
        for tier in sorted(self.gpu):
            n, rate = self.gpu[tier]
            provisioned = n * self.makespan_s
            gpu[tier] = {"instances": n, "provisioned_s": round(provisioned, 3),
                         "busy_s": round(self.busy_s.get(tier, 0.0), 3),
                         "charged_s": round(self.gpu_us.get(tier, 0) / 1e6, 3),
                         "usd": round(provisioned / 3600.0 * rate, 6)}
        return {
            "requests": self.requests, "served": self.served,
            "usd": round(self.cost_units / COST_SCALE, 8),
            "usd_per_1m_tokens": round(self.cost_units / COST_SCALE / tokens * 1e6, 6) if tokens else None,
            "baseline_usd": round(self.base_units / COST_SCALE, 8),
            "baseline_comparable_usd": round(self.base_cost_units / COST_SCALE, 8),
            "baseline_no_alternative": self.no_alternative,
            "tokens": {"prompt": self.prompt, "cached": self.cached, "completion": self.completion},
            "cache_hit": round(self.cached / self.prompt, 6) if self.prompt else None,
            "makespan_s": round(self.makespan_s, 3),
            "gpu": gpu, "slo": slo,
            "tiers": {t: self.tiers[t] for t in sorted(self.tiers)},
            "tier_usd": {t: round(self.tier_units[t] / COST_SCALE, 8) for t in sorted(self.tier_units)},
            "tier_cache_hit": {t: round(k / p, 6) if p else None for t, (p, k) in sorted(self.tier_tokens.items())},
            "tenants_usd": {t: round(self.tenants_units[t] / COST_SCALE, 8) for t in sorted(self.tenants_units)},
            "tenants_gpu_s": {t: round(self.tenants_gpu_us[t] / 1e6, 6) for t in sorted(self.tenants_gpu_us)},
            "refused": {k: self.refused[k] for k in sorted(self.refused)},
            **({} if self.queue is None else {"queue": self._queue()}),
            **({"tenant_ttft_p99_s": self._tenant_p99()} if len({t for t, _ in self.tenant_ttft}) > 1 else {}),
        }

    def _tenant_p99(self) -> dict[str, dict[str, float | None]]:
        """TTFT p99 per tenant and class (more than one tenant: how one tenant's load reaches another)."""
        out: dict[str, dict[str, float | None]] = {}
        for (tenant, cls), xs in sorted(self.tenant_ttft.items()):
            p99 = pct(sorted(xs), 0.99)
            out.setdefault(tenant, {})[cls] = None if p99 is None else round(p99, 6)
        return out

    def _queue(self) -> dict[str, Any]:
        def waits(xs: list[float]) -> dict[str, float | None]:
            ys = sorted(xs)
            p50, p99 = pct(ys, 0.50), pct(ys, 0.99)
            return {"wait_p50_s": None if p50 is None else round(p50, 6),
                    "wait_p99_s": None if p99 is None else round(p99, 6)}
        every = [x for xs in self.queue_wait.values() for x in xs]
        by_class = {cls: {"waited": len(xs), **waits(xs)} for cls, xs in sorted(self.queue_wait.items())}
        return {**{k: (self.queue or {})[k] for k in sorted(self.queue or {})}, **waits(every),
                "by_class": by_class}
