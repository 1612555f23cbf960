"""Runtime tiers and instances: what the policy names, plus live state counted at dispatch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backends.resilience import OutlierConfig
from policies.schema import AffinitySpec, InstanceSpec, Policy, TierSpec
from policies.types import Candidate
from policies.upstream_auth import upstream_headers

Clock = Callable[[], float]


@dataclass
class InstanceState:
    tier: str
    instance_id: str
    url: str
    in_flight: int = 0
    healthy: bool = True          # last active probe
    ejected_until: float = 0.0    # passive ejection after connect errors / 5xx
    consecutive_failures: int = 0
    times_ejected: int = 0
    half_open: bool = False       # ejected before and not yet proven healthy again
    ejected_at: float | None = None
    last_failure_at: float | None = None
    cooldowns: int = 0
    ejections: int = 0            # total, for metrics
    served: int = 0
    pending_requests: int = 0               # dispatched by this router, first token not back yet
    pending_tokens: int = 0                 # their uncached prompt tokens: prefill work queued there
    running: float = 0.0                    # scraped from /metrics (vllm:num_requests_running)
    waiting: float = 0.0                    # vllm:num_requests_waiting
    kv_usage: float = 0.0                   # vllm:kv_cache_usage_perc, 0..1
    scraped_at: float | None = None
    kv_events: str | None = None            # vLLM KV-event endpoint (ZMQ), from the policy
    kv_events_dp_ranks: int = 1             # data-parallel ranks publishing there (port + rank)
    kv_capacity_blocks: int | None = None   # from the policy, else scraped (vllm:cache_config_info)
    peer_in_flight: int = 0                 # the same counts from the other router replicas (LoadSync)
    peer_pending_requests: int = 0
    peer_pending_tokens: int = 0
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})  # + API key

    def serving(self, now: float) -> bool:
        """Probed healthy, not ejected, and, while half-open, not already running its one trial request."""
        return self.healthy and now >= self.ejected_until and not (self.half_open and self.in_flight > 0)


class Ewma:
    """Exponentially weighted moving average; `value` is None until the first sample."""

    def __init__(self, alpha: float = 0.2, initial: float | None = None) -> None:
        self.alpha = alpha
        self.value = initial
        self.samples = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        self.samples += 1


@dataclass
class TierRuntime:
    name: str
    spec: TierSpec
    instances: list[InstanceState] = field(default_factory=list)
    # learned from this tier's own responses (seeded from the policy where it says)
    prefill_tps: Ewma = field(default_factory=Ewma)       # uncached prompt tokens per second of TTFT
    uncached_tokens: Ewma = field(default_factory=Ewma)   # uncached prompt tokens per request
    ttft_s: Ewma = field(default_factory=Ewma)
    tpot_s: Ewma = field(default_factory=Ewma)


class Registry:
    """Tiers and instances of the active policy; peers' load arrives through `router.load_sync`."""

    def __init__(self, policy: Policy, urls: dict[str, list[InstanceSpec]] | None = None,
                 clock: Clock = time.monotonic, outlier: OutlierConfig | None = None) -> None:
        self.clock = clock
        self.outlier = outlier or OutlierConfig()
        self.urls = dict(urls or {})                     # instances started for simulated tiers
        self.tiers: dict[str, TierRuntime] = {}
        self.route_output_tokens: dict[str, Ewma] = {}   # per virtual model: real completion lengths
        self.discovered: dict[str, list[InstanceSpec]] = {}   # per tier: instances found by DNS
        self.apply(policy)

    def apply(self, policy: Policy) -> None:
        """Adopt a (re)loaded policy. Tiers and instances are matched by name and by id and URL: a kept one
        keeps its health, ejections, load and learned EWMAs; a removed one is dropped here while requests
        already on it finish. Instances found by DNS (`set_discovered`) stay while their tier still
        discovers. Synchronous, so no request sees half of it."""
        self.discovered = {t: found for t, found in self.discovered.items()
                           if t in policy.tiers and policy.tiers[t].discover is not None}
        tiers: dict[str, TierRuntime] = {}
        for name, spec in policy.tiers.items():
            old = self.tiers.get(name)
            insts = self._states(name, spec, old.instances if old is not None else [])
            if old is None:
                rt = TierRuntime(name, spec, insts)
            else:
                rt, rt.spec, rt.instances = old, spec, insts
            if rt.prefill_tps.samples == 0:  # the policy's seed, until the tier's own responses teach it
                rt.prefill_tps.value = spec.prefill_tokens_per_s
            tiers[name] = rt
        self.tiers = tiers

    def set_discovered(self, tier: str, found: list[InstanceSpec]) -> bool:
        """Replace the instances DNS found for `tier` (router/discovery.py), in one synchronous step: new ones
        join, gone ones leave (requests already on them finish), kept ones keep their state. True if changed."""
        rt = self.tiers.get(tier)
        if rt is None or rt.spec.discover is None or self.discovered.get(tier, []) == found:
            return False
        self.discovered[tier] = list(found)
        rt.instances = self._states(tier, rt.spec, rt.instances)
        return True

    def _states(self, name: str, spec: TierSpec, current: list[InstanceState]) -> list[InstanceState]:
        """The tier's instances: listed (or simulated), then discovered ones whose id and URL no listed one has;
        those matching a current instance by id and URL are that same object."""
        kept = {(i.instance_id, i.url): i for i in current}
        specs = list(spec.instances) or self.urls.get(name, [])
        ids, urls = {i.id for i in specs}, {i.url.rstrip("/") for i in specs}
        specs += [i for i in self.discovered.get(name, ()) if i.id not in ids and i.url.rstrip("/") not in urls]
        insts = []
        for i in specs:
            cur = kept.get((i.id, i.url.rstrip("/")))
            if cur is None:
                cur = InstanceState(name, i.id, i.url.rstrip("/"))
            cur.kv_events = i.kv_events
            cur.kv_events_dp_ranks = i.kv_events_dp_ranks
            cur.headers = upstream_headers(spec, i)   # its API key (policies/upstream_auth.py), else the tier's
            if i.kv_capacity_blocks is not None or cur.kv_capacity_blocks is None:
                cur.kv_capacity_blocks = i.kv_capacity_blocks  # else keep what /metrics told us
            insts.append(cur)
        return insts

    def candidates(self, tiers: tuple[str, ...], cached: dict[str, int] | None = None) -> list[Candidate]:
        """A snapshot of every instance of `tiers`; `cached`: expected cached tokens by candidate key."""
        now = self.clock()
        out = []
        get = cached.get if cached else None
        for t in tiers:
            rt = self.tiers.get(t)
            if rt is None:
                continue
            spec = rt.spec
            p = spec.prices
            p_in, p_cached, p_out, mml = p.input, p.cached_input, p.output, spec.max_model_len
            gpu = spec.gpu_cost_per_hour or 0.0
            tps = rt.prefill_tps.value or 0.0
            mean_uncached = rt.uncached_tokens.value if rt.uncached_tokens.value is not None else 1024.0
            tpot = rt.tpot_s.value or 0.0
            for inst in rt.instances:
                iid = inst.instance_id
                key = f"{t}/{iid}"
                out.append(Candidate(tier=t, instance_id=iid, key=key, max_model_len=mml,
                                     price_input=p_in, price_cached_input=p_cached,
                                     price_output=p_out, healthy=inst.serving(now),
                                     in_flight=inst.in_flight + inst.peer_in_flight,
                                     cached_tokens=get(key, 0) if get is not None else 0,
                                     running=int(inst.running), waiting=int(inst.waiting), kv_usage=inst.kv_usage,
                                     pending_requests=inst.pending_requests + inst.peer_pending_requests,
                                     pending_tokens=inst.pending_tokens + inst.peer_pending_tokens,
                                     prefill_tps=tps, mean_uncached_tokens=mean_uncached,
                                     gpu_cost_per_hour=gpu, tpot_s=tpot))
        return out

    def capacity_blocks(self, inst: InstanceState) -> int:
        rt = self.tiers.get(inst.tier)  # None: a reload removed its tier while requests still ran on it
        return inst.kv_capacity_blocks or (rt.spec.affinity if rt is not None else AffinitySpec()).capacity_blocks

    def instance(self, tier: str, instance_id: str) -> InstanceState:
        inst = self.find(tier, instance_id)
        if inst is None:
            raise KeyError(f"{tier}/{instance_id}")
        return inst

    def find(self, tier: str, instance_id: str) -> InstanceState | None:
        """The instance, or None where a policy reload has removed it (or its tier) since a decision."""
        rt = self.tiers.get(tier)
        for inst in rt.instances if rt is not None else ():
            if inst.instance_id == instance_id:
                return inst
        return None

    def all_instances(self) -> list[InstanceState]:
        return [i for rt in self.tiers.values() for i in rt.instances]

    def record_success(self, inst: InstanceState) -> None:
        """A good answer: closes a half-open instance; long healthy service forgets past ejections."""
        inst.consecutive_failures = 0
        now = self.clock()
        if now >= inst.ejected_until:
            inst.half_open = False
        if inst.times_ejected and inst.ejected_at is not None and \
                now - max(inst.ejected_until, inst.last_failure_at or 0.0) >= self.outlier.base_ejection_s * 10:
            inst.times_ejected -= 1
            inst.ejected_at = now

    def _may_eject(self, inst: InstanceState, now: float) -> bool:
        rt = self.tiers.get(inst.tier)
        peers = rt.instances if rt is not None else [inst]
        out = sum(1 for i in peers if i is not inst and now < i.ejected_until)
        return (out + 1) * 100.0 <= self.outlier.max_ejection_percent * len(peers) or len(peers) == 1

    def record_failure(self, inst: InstanceState) -> bool:
        """A 5xx or connect error; returns True when it ejected the instance."""
        now = self.clock()
        inst.consecutive_failures += 1
        inst.last_failure_at = now
        half_open = inst.half_open and now >= inst.ejected_until
        if (inst.consecutive_failures >= self.outlier.consecutive_failures or half_open) and \
                now >= inst.ejected_until and self._may_eject(inst, now):
            inst.times_ejected += 1
            inst.half_open = True
            inst.ejections += 1
            inst.ejected_at = now
            inst.ejected_until = now + min(self.outlier.base_ejection_s * inst.times_ejected,
                                           self.outlier.max_ejection_s)
            inst.consecutive_failures = 0
            return True
        return False

    def cool_down(self, inst: InstanceState, seconds: float) -> None:
        """Retry-After from a 429/503: keep the instance out for that long (capped)."""
        inst.cooldowns += 1
        inst.ejected_until = max(inst.ejected_until, self.clock() + min(seconds, self.outlier.max_cooldown_s))

    def any_reachable(self) -> bool:
        now = self.clock()
        return any(i.serving(now) for i in self.all_instances())
