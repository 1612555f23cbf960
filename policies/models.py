"""The names a client may write in `model`, and the route each one means.

Clients written against a bare vLLM send vLLM's model names: the Hugging Face id it serves
(`Qwen/Qwen3-4B-Instruct-2507`), or a short served name (`qwen3-4b-instruct-2507`). So a route
answers, case-insensitively, to:

1. its own name (`qwen3-4b`);
2. each name in its `aliases:` list;
3. the model id of its tiers, and that id's last path part (`Qwen/Qwen3-4B-Instruct-2507`,
   `Qwen3-4B-Instruct-2507`). A model id served by several tiers goes to the route with the
   fewest tiers that holds all of them (the demo's `qwen3-4b` holds balanced and long, both
   Qwen3-4B-Instruct-2507); ties go to the route listed first.

Route names and explicit aliases must be unique (case-insensitively); the policy loader refuses a
clash and names both places. An implicit name (3.) never overrides a route name or an explicit
alias, so writing one in `aliases:` pins it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policies.schema import Policy


def _model_id_names(model_id: str) -> list[str]:
    short = model_id.rsplit("/", 1)[-1]
    return [model_id] if short == model_id else [model_id, short]


def model_names(policy: Policy) -> dict[str, str]:
    """Lower-cased name -> route name, for every name a client may use."""
    names: dict[str, str] = {}
    for route, spec in policy.routes.items():
        names.setdefault(route.lower(), route)
        for alias in spec.aliases:
            names.setdefault(alias.lower(), route)
    serving: dict[str, set[str]] = {}
    for tier_name, tier in policy.tiers.items():
        serving.setdefault(tier.model, set()).add(tier_name)
    for model_id, tiers in serving.items():
        holders = [r for r, spec in policy.routes.items() if tiers <= set(spec.tiers)]
        if not holders:
            holders = [r for r, spec in policy.routes.items() if tiers & set(spec.tiers)]
        if not holders:
            continue
        best = min(holders, key=lambda r: len(policy.routes[r].tiers))  # min() keeps the first of equals
        for name in _model_id_names(model_id):
            names.setdefault(name.lower(), best)
    return names


def aliases_of(policy: Policy, names: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Route -> the other names it answers to, as written (for `/v1/models`)."""
    names = names if names is not None else model_names(policy)
    out: dict[str, list[str]] = {r: [] for r in policy.routes}
    spelled = {a.lower(): a for spec in policy.routes.values() for a in spec.aliases}
    for tier in policy.tiers.values():
        for n in _model_id_names(tier.model):
            spelled.setdefault(n.lower(), n)
    for lower, route in names.items():
        if lower != route.lower():
            out[route].append(spelled.get(lower, lower))
    return out


def alias_errors(policy: Policy) -> list[tuple[str, str]]:
    """Clashes between route names and explicit aliases (case-insensitive), with both places named."""
    errs: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for route in policy.routes:
        key = route.lower()
        if key in seen:
            errs.append((f"$.routes.{route}", f"route name clashes with {seen[key]} (names are case-insensitive)"))
        seen.setdefault(key, f"route {route!r}")
    for route, spec in policy.routes.items():
        for i, alias in enumerate(spec.aliases):
            key = alias.lower()
            if not alias.strip():
                errs.append((f"$.routes.{route}.aliases[{i}]", "must not be empty"))
            elif key in seen and seen[key] != f"route {route!r}":
                errs.append((f"$.routes.{route}.aliases[{i}]",
                             f"alias {alias!r} is already {seen[key]} (names are case-insensitive)"))
            seen.setdefault(key, f"an alias of route {route!r}")
    return errs
