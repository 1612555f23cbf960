"""The simulated fleet a replay runs on, and the policy view the core reads.

Cluster shape: per tier, the simulator profile and replica count of its `simulate:` block; a tier that
lists `instances:` instead runs that many replicas of the profile named by `--profile TIER=NAME` (or
its `simulate.profile`). `--replicas fast=6,balanced=4` overrides the counts ("what if the fast tier had
6 instances?"). Each replica is one `Engine` (backends/sim/engine.py) on virtual time
(backends/sim/virtual.py), named `<tier>-<k>`, and the registry's instance of the same id, whose KV
capacity is the engine's block count, as the live scraper learns it from `cache_config_info`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec

from backends.registry import Registry
from backends.sim.engine import Engine
from backends.sim.profile import SimProfile, load_profiles, time_scaled
from policies.engine import Profile, build_profiles
from policies.models import model_names
from policies.schema import InstanceSpec, Policy
from router.accounting import baseline_tier
from router.affinity import Affinity
from router.lifecycle.ports import AffinityIndex, Clock


class ClusterError(ValueError):
    pass


@dataclass(frozen=True)
class ReplayView:
    """What the core reads of the policy (router/lifecycle/ports.py `View`), without tokenizers or keys."""

    policy: Policy
    profiles: dict[str, Profile]
    baseline: str
    affinity: Affinity
    models: dict[str, str]


def parse_assignments(text: str | None, what: str) -> dict[str, str]:
    """'fast=6,balanced=4' -> {'fast': '6', 'balanced': '4'}."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ClusterError(f"{what}: expected TIER=VALUE[,TIER=VALUE...], got {part!r}")
        out[name.strip()] = value.strip()
    return out


def shape(policy: Policy, replicas: dict[str, str], profiles: dict[str, str],
          time_scale: float | None = None) -> dict[str, tuple[SimProfile, int]]:
    """Per tier: (simulator profile, replicas). The profile runs at the tier's `simulate.time_scale`
    (1.0 without one), or at `time_scale` for every tier where given (backends/sim/profile.py
    `time_scaled`: a GPU that many times slower, as the live simulator's --time-scale)."""
    if time_scale is not None and not time_scale > 0:
        raise ClusterError("--time-scale must be > 0")
    known = load_profiles()
    for name in (*replicas, *profiles):
        if name not in policy.tiers:
            raise ClusterError(f"no tier {name!r} in the policy; tiers: {', '.join(policy.tiers)}")
    out: dict[str, tuple[SimProfile, int]] = {}
    for name, spec in policy.tiers.items():
        prof = profiles.get(name) or (spec.simulate.profile if spec.simulate else None)
        if prof is None:
            raise ClusterError(f"tier {name!r} has no `simulate: {{profile: ...}}`: name its simulator profile "
                               f"with --profile {name}=PROFILE ({', '.join(sorted(known))})")
        if prof not in known:
            raise ClusterError(f"tier {name!r}: unknown simulator profile {prof!r}; known: {', '.join(sorted(known))}")
        n_raw = replicas.get(name)
        try:
            n = int(n_raw) if n_raw is not None else \
                (spec.simulate.replicas if spec.simulate and not spec.instances else len(spec.instances))
        except ValueError:
            raise ClusterError(f"--replicas {name}={n_raw}: not a whole number") from None
        if n < 0:
            raise ClusterError(f"--replicas {name}={n}: must be >= 0")
        scale = time_scale if time_scale is not None else (spec.simulate.time_scale if spec.simulate else 1.0)
        out[name] = (time_scaled(known[prof], scale), n)
    if not any(n for _, n in out.values()):
        raise ClusterError("the cluster has no instance at all")
    return out


def replay_policy(policy: Policy, sizes: dict[str, tuple[SimProfile, int]]) -> Policy:
    """The policy with each tier's instances replaced by the replay's `<tier>-<k>`."""
    tiers = {}
    for name, spec in policy.tiers.items():
        insts = [InstanceSpec(id=f"{name}-{k}", url=f"http://replay.invalid/{name}/{k}")
                 for k in range(sizes[name][1])]
        tiers[name] = msgspec.structs.replace(spec, instances=insts)
    return msgspec.structs.replace(policy, tiers=tiers)


def build(policy: Policy, sizes: dict[str, tuple[SimProfile, int]], clock: Clock,
          store: AffinityIndex) -> tuple[ReplayView, Registry, dict[str, Engine]]:
    """The view, the registry (on the virtual clock) and one engine per instance key 'tier/id'."""
    pol = replay_policy(policy, sizes)
    registry = Registry(pol, clock=clock)
    engines: dict[str, Engine] = {}
    for name, rt in registry.tiers.items():
        prof = sizes[name][0]
        for inst in rt.instances:
            eng = Engine(prof, keep_latencies=False)
            engines[f"{name}/{inst.instance_id}"] = eng
            if inst.kv_capacity_blocks is None:
                inst.kv_capacity_blocks = eng.kv.num_blocks
    view = ReplayView(policy=pol, profiles=build_profiles(pol), baseline=baseline_tier(pol),
                      affinity=Affinity(pol, registry, store, ThreadPoolExecutor(1)), models=model_names(pol))
    return view, registry, engines
