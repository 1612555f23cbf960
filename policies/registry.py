"""Plugin registry: type name -> factory taking the policy's raw params."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from policies.plugins.bounded_load import BoundedLoad
from policies.plugins.budget_degrade import BudgetDegrade
from policies.plugins.context_fits import ContextFits
from policies.plugins.expected_cost import ExpectedCost
from policies.plugins.expected_money import ExpectedMoney
from policies.plugins.healthy import Healthy
from policies.plugins.list_price import ListPrice
from policies.plugins.load import Load
from policies.plugins.max_score import MaxScore
from policies.plugins.prefix_affinity import PrefixAffinity
from policies.plugins.slo_feasible import SloFeasible
from policies.plugins.tier_allowed import TierAllowed
from policies.types import Filter, Picker, Scorer

KNOWN_FILTERS: dict[str, Callable[..., Filter]] = {
    "tier_allowed": TierAllowed,
    "context_fits": ContextFits,
    "healthy": Healthy,
    "bounded_load": BoundedLoad,
    "slo_feasible": SloFeasible,
    "budget_degrade": BudgetDegrade,
}
KNOWN_SCORERS: dict[str, Callable[..., Scorer]] = {
    "expected_cost": ExpectedCost,
    "expected_money": ExpectedMoney,
    "list_price": ListPrice,
    "load": Load,
    "prefix_affinity": PrefixAffinity,
}
KNOWN_PICKERS: dict[str, Callable[..., Picker]] = {
    "max_score": MaxScore,
}


def build(kind: dict[str, Callable[..., Any]], type_name: str, params: dict[str, Any]) -> Any:
    try:
        factory = kind[type_name]
    except KeyError:
        raise ValueError(f"unknown plugin type {type_name!r}") from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise ValueError(f"bad params for {type_name!r}: {exc}") from None
