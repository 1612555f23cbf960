"""The usage record of one closed request (router/lifecycle/core.py `close_out`): its cost, its honest
counterfactuals and its GPU time.

Counterfactuals (issue #17) count only what could really have happened:
  base      what the request would have cost on the baseline tier (router/accounting.py `baseline_tier`),
            counted only where that tier could have served it: its context fits (prompt tokens, as the
            baseline tier counts them, plus completion tokens <= its max_model_len) and the tenant may use
            it (`allowed_tiers`). Otherwise the request is "no alternative" (`base_ok` False, `base` 0), and
            reports compare `base` with the cost of the same requests only (the ledger's `base_cost`).
  nocache   what it would have cost on the same tier without cache hits (its cached tokens at the input
            price): the same tier served it, so it could always have served it uncached.
GPU time: router/chargeback.py (the simulator's exact figure when the outcome carries one).
"""

from __future__ import annotations

from backends.registry import Registry
from policies.schema import Policy, TenantSpec
from router.accounting import cost_units
from router.chargeback import GpuCharge, live_charge, micros
from router.relay import Outcome


def baseline_fits(pol: Policy, spec: TenantSpec, baseline: str, prompt: int, completion: int) -> bool:
    """The baseline tier could have served a request of `prompt` (as it counts them) + `completion` tokens."""
    tier = pol.tiers.get(baseline)
    if tier is None or not ("*" in spec.allowed_tiers or baseline in spec.allowed_tiers):
        return False
    return prompt + completion <= tier.max_model_len


def counterfactuals(pol: Policy, tenant: str, baseline: str, counts: dict[str, int], tier: str | None,
                    units: int, prompt: int, cached: int, completion: int,
                    factor: float) -> tuple[int, bool | None, int]:
    """-> (base units, whether the baseline could have served it (None: not billed), no-cache units)."""
    if tier is None:
        return 0, None, 0
    nocache = cost_units(pol.tiers[tier], prompt, 0, completion, factor)
    if not units:
        return 0, None, nocache
    base_prompt = prompt if tier == baseline else counts.get(baseline, prompt)
    if not baseline_fits(pol, pol.tenants[tenant], baseline, base_prompt, completion):
        return 0, False, nocache
    return cost_units(pol.tiers[baseline], prompt, cached, completion, factor), True, nocache


def gpu_charge(registry: Registry, out: Outcome, uncached: int, completion: int, now: float) -> GpuCharge | None:
    """The GPU time of a served request (None: it reached no tier)."""
    if out.tier is None:
        return None
    if out.gpu_s is not None:
        return GpuCharge(micros(out.gpu_s), "sim")
    rt = registry.tiers.get(out.tier)
    inst = registry.find(out.tier, out.instance or "")
    decode_s = now - out.first_token_at if out.first_token_at is not None and completion > 1 else None
    return live_charge(
        uncached=uncached, completion=completion, prefill_tps=rt.prefill_tps.value if rt is not None else None,
        decode_s=decode_s,
        scraped_running=inst.running if inst is not None and inst.scraped_at is not None else None,
        in_flight=(inst.in_flight + inst.peer_in_flight) if inst is not None else 0,
        tpot_s=rt.tpot_s.value if rt is not None else None)
