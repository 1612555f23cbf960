"""`/v1/models` in OpenAI's list shape (and vLLM's extra fields), with every alias a client may use."""

from __future__ import annotations

from typing import Any

from policies.models import aliases_of
from policies.schema import Policy
from router.live_policy import PolicyView


def model_list(view: PolicyView, allowed: list[str]) -> list[dict[str, Any]]:
    """One entry per route the tenant may use, then one per alias of it (`root` names the route)."""
    pol = view.policy
    aliases = aliases_of(pol, view.models)
    data: list[dict[str, Any]] = []
    for name in allowed:
        route = pol.routes[name]
        tiers = [{"name": t, "model": pol.tiers[t].model, "max_model_len": pol.tiers[t].max_model_len}
                 for t in route.tiers]
        entry = {"object": "model", "created": 0, "owned_by": "tiergate", "root": name, "parent": None,
                 "max_model_len": max(t["max_model_len"] for t in tiers), "tiers": tiers}  # type: ignore[type-var]
        data.append({"id": name, **entry})
        data.extend({"id": alias, **entry, "parent": name} for alias in aliases[name])
    return data


def warn_anonymous(log: Any, policy: Policy) -> None:
    """Anonymous access is for trusted networks only: say so whenever a policy with it is loaded."""
    if policy.anonymous is not None:
        log.warning("anonymous_access_enabled", tenant=policy.anonymous.tenant,
                    note="requests without a valid key are served as this tenant; keep this router on a "
                         "trusted network or remove `anonymous:` from the policy")
