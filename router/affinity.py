"""Prefix affinity on the request path: hash the prompt, one batched lookup, record after dispatch.

Per tier: the prompt's sampled block hashes (`prefix_hash`), seeded by tier, model and
block size. `lookup` asks the shared index (`AffinityStore`) once for every candidate
instance of every tier and returns the expected cached prompt tokens per instance;
`record` schedules the chosen instance's hashes after the backend accepted the
request. With no Redis, a disabled tier or an open breaker, every instance simply
expects 0 cached tokens (fail open).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor

from backends.registry import Registry
from policies.schema import Policy
from router.lifecycle.ports import AffinityIndex
from router.prefix_hash import PrefixHashes, prefix_hashes, tier_seed

OFFLOAD_TOKENS = 32_768  # hash longer prompts in the executor, not on the event loop


class Affinity:
    def __init__(self, policy: Policy, registry: Registry, store: AffinityIndex | None, executor: Executor) -> None:
        self.registry = registry
        self.store = store
        self.executor = executor
        self.specs = {name: t.affinity for name, t in policy.tiers.items()}
        self.block_size = {name: t.block_size for name, t in policy.tiers.items()}
        self.seeds = {name: tier_seed(name, t.model, t.block_size) for name, t in policy.tiers.items()}

    def enabled(self, tier: str) -> bool:
        return self.store is not None and self.specs[tier].enabled

    def hashes_sync(self, tier: str, ids: Sequence[int]) -> PrefixHashes:
        spec = self.specs[tier]
        return prefix_hashes(ids, self.seeds[tier], self.block_size[tier], spec.dense_blocks, spec.max_blocks)

    async def hashes(self, tiers: Sequence[str], ids: dict[str, list[int]]) -> dict[str, PrefixHashes]:
        out: dict[str, PrefixHashes] = {}
        for t in tiers:
            if not self.enabled(t):
                continue
            if len(ids[t]) > OFFLOAD_TOKENS:
                out[t] = await asyncio.get_running_loop().run_in_executor(self.executor, self.hashes_sync, t, ids[t])
            else:
                out[t] = self.hashes_sync(t, ids[t])
        return out

    async def lookup(self, hashes: dict[str, PrefixHashes]) -> tuple[dict[str, int], str]:
        """Expected cached tokens per candidate key ("tier/instance"), and a short status."""
        if self.store is None or not hashes:
            return {}, "off"
        groups = []
        for tier, ph in hashes.items():
            rt = self.registry.tiers.get(tier)  # None: a reload removed the tier since this request began
            insts = [i.instance_id for i in rt.instances] if rt is not None else []
            groups.append((tier, insts, ph.hashes))
        ttl = max(self.specs[t].ttl_s for t in hashes)
        found = await self.store.lookup(groups, ttl)
        if found is None:
            return {}, "unavailable"
        return {f"{tier}/{inst}": hashes[tier].tokens_for(n) for (tier, inst), n in found.items() if n}, "ok"

    def record(self, tier: str, instance: str, hashes: dict[str, PrefixHashes]) -> None:
        ph = hashes.get(tier)
        if self.store is None or ph is None or not ph.hashes:
            return
        inst = self.registry.find(tier, instance)
        if inst is None:  # removed by a policy reload while the request ran
            return
        self.store.record_later(tier, instance, ph.hashes, self.specs[tier].ttl_s, self.registry.capacity_blocks(inst))

    async def claim(self, tier: str, chosen: str, cached: dict[str, int],
                    hashes: dict[str, PrefixHashes]) -> tuple[str, int] | None:
        """Prefix coalescing at decision time (router/affinity_store.py `claim`): record the prompt for
        `chosen`, unless another instance of the tier took more of it since the lookup (`cached`: expected
        cached tokens by candidate key, as the lookup answered): then (that instance, its cached tokens).
        None: no claim (affinity off for the tier, or the index unavailable: fail open)."""
        ph = hashes.get(tier)
        rt = self.registry.tiers.get(tier)
        inst = self.registry.find(tier, chosen)
        if self.store is None or ph is None or not ph.hashes or rt is None or inst is None:
            return None
        seen = [(i.instance_id, ph.matched_for(cached.get(f"{tier}/{i.instance_id}", 0))) for i in rt.instances]
        got = await self.store.claim(tier, chosen, seen, ph.hashes, self.specs[tier].ttl_s,
                                     self.registry.capacity_blocks(inst))
        return None if got is None else (got[0], ph.tokens_for(got[1]))
