"""Policy v1 `alerts:`: budget alert thresholds (issue #17; router/alerts.py fires them).

    alerts:                         # policy-wide default: every tenant with a budget and no `alerts` of its own
      thresholds: [0.5, 0.8, 1.0]
    tenants:
      acme:
        budgets: {daily_usd: 20, monthly_usd: 400}
        alerts: {thresholds: [0.9]}   # its own list replaces the default; `thresholds: []` turns alerts off

A threshold is a fraction of each budget the tenant has (daily and monthly alike), 0 < t <= 1.5, the list
sorted and without repeats. Each fires once per period (UTC day, UTC month) when the amount SPENT (settled,
not reserved) reaches it. A zero budget has no alerts. Where alerts go (the webhook URL and its signing
secret) is operator configuration only (TIERGATE_ALERT_WEBHOOK_URL, TIERGATE_ALERT_WEBHOOK_SECRET): the
policy has no such field, and one written here is refused as an unknown field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from policies.schema import Policy, TenantSpec


class AlertsSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    thresholds: list[float] = []


def thresholds_for(policy: Policy, spec: TenantSpec) -> list[float]:
    """The tenant's thresholds: its own list, else the policy's default; none without a budget."""
    if spec.budgets.daily_usd is None and spec.budgets.monthly_usd is None:
        return []
    own = spec.alerts if spec.alerts is not None else policy.alerts
    return [] if own is None else list(own.thresholds)


def _list_errors(path: str, spec: AlertsSpec) -> list[tuple[str, str]]:
    for i, t in enumerate(spec.thresholds):
        if not 0 < t <= 1.5:
            return [(f"{path}.thresholds[{i}]", "must be a fraction of the budget, 0 < t <= 1.5")]
        if i and t <= spec.thresholds[i - 1]:
            return [(f"{path}.thresholds[{i}]", "thresholds must be sorted ascending, without repeats")]
    if len(spec.thresholds) > 16:
        return [(f"{path}.thresholds", "at most 16 thresholds")]
    return []


def alert_errors(policy: Policy) -> list[tuple[str, str]]:
    errs = [] if policy.alerts is None else _list_errors("$.alerts", policy.alerts)
    for name, tenant in policy.tenants.items():
        if tenant.alerts is None:
            continue
        base = f"$.tenants.{name}.alerts"
        errs.extend(_list_errors(base, tenant.alerts))
        if tenant.alerts.thresholds and tenant.budgets.daily_usd is None and tenant.budgets.monthly_usd is None:
            errs.append((base, "alerts are fractions of a budget: set budgets.daily_usd or budgets.monthly_usd"))
    return errs
