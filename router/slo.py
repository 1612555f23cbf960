"""Which latency targets a request carries: headers, else the tenant's class, else the default.

Headers (llm-d's names): `x-slo-ttft-ms`, `x-slo-tpot-ms` (positive numbers, ms), or
`x-tiergate-slo-class` (a class from the policy). Explicit targets override the
class's. A bad value is a 400 naming the header.
"""

from __future__ import annotations

from collections.abc import Mapping

from policies.schema import Policy
from router.errors import ApiError


def _ms(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not 0 < v < 86_400_000:
        raise ApiError(400, f"header '{name}' must be a positive number of milliseconds", param=name,
                       code="invalid_header")
    return v / 1000.0


def resolve_slo(policy: Policy, tenant: str, headers: Mapping[str, str]) -> tuple[str, float | None, float | None]:
    """(class name, TTFT target s, TPOT target s)."""
    name = headers.get("x-tiergate-slo-class")
    if name is not None and name not in policy.slo_classes:
        raise ApiError(400, f"header 'x-tiergate-slo-class' names unknown SLO class {name[:64]!r}; known: "
                       f"{', '.join(sorted(policy.slo_classes))}", param="x-tiergate-slo-class",
                       code="invalid_header")
    if name is None:
        spec = policy.tenants.get(tenant)
        name = (spec.default_slo if spec is not None else "") or policy.defaults.slo_class
    cls = policy.slo_classes.get(name)
    ttft = cls.ttft_ms / 1000.0 if cls else None
    tpot = cls.tpot_ms / 1000.0 if cls else None
    h_ttft, h_tpot = _ms(headers, "x-slo-ttft-ms"), _ms(headers, "x-slo-tpot-ms")
    if h_ttft is not None or h_tpot is not None:
        name = name or "custom"
    return name or "", h_ttft if h_ttft is not None else ttft, h_tpot if h_tpot is not None else tpot
