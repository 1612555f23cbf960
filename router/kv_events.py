"""Correct the affinity index from an engine's KV-cache events (vLLM's ZMQ publisher).

One lifespan-owned task per instance that names a `kv_events` endpoint subscribes to
it: one SUB socket connected to the endpoint of every data-parallel rank (vLLM's rank r
publishes on the port + r, `backends.kv_events.dp_endpoint`). Payloads in any of vLLM's
wire forms decode to the same events (`backends.kv_events.BatchDecoder`).

BlockStored events carry each block's token ids and the engine's parent hash; a bounded
map engine hash -> (our chained hash, block position) lets us compute our own hash of
every stored block exactly as the router computes it from a prompt (`prefix_hash`).
Sampled positions are added to the instance's index, BlockRemoved removes them,
AllBlocksCleared drops them. The maps are kept per *holder*, one (data-parallel rank,
medium, KV-cache group) of the instance, since each rank has its own cache and an
offloaded copy or another group outlives a GPU eviction; a hash leaves the instance's
index only when no holder has it. Changes are coalesced and written every `flush_s`
(one ZREM and one record script per flush, not one per engine step).

Skipped, so the index stays approximate there and ages out on its TTL: a block whose
parent we never saw (we joined mid-stream or lost messages); a LoRA block, and a block
with extra hash keys (multimodal input, cache_salt), since our hashes cover plain tokens
only. Gaps in each rank's sequence numbers are counted (vLLM's replay socket is not
used). Undecodable payloads are counted as `malformed`; the first of a run is logged
with its msgpack shape (types and lengths, never values), once per subscriber until a
good batch ends the run.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence

import msgspec
import zmq
import zmq.asyncio

from backends.kv_events import (
    AllBlocksCleared,
    BatchDecoder,
    BlockRemoved,
    BlockStored,
    EngineHash,
    KVEvent,
    dp_endpoint,
    frame_shape,
)
from backends.registry import Registry
from policies.schema import Policy
from router.affinity_store import AffinityStore
from router.logs import get_logger
from router.metrics import RouterMetrics
from router.prefix_hash import chain_hash, is_sampled, tier_seed

Holder = tuple[int, str, int]   # (data-parallel rank, medium, KV-cache group)
Blocks = OrderedDict[EngineHash, tuple[bytes, int]]


def _indexable(ev: BlockStored) -> int:
    """How many leading blocks of `ev` hash from their tokens alone (no LoRA, no extra keys)."""
    if ev.lora_id is not None or ev.lora_name is not None:
        return 0
    keys = ev.extra_keys
    if not keys:
        return len(ev.block_hashes)
    for i, k in enumerate(keys):
        if k is not None:
            return i
    return len(ev.block_hashes)


class InstanceIndexer:
    """Pure bookkeeping for one instance: events in, (added, removed, cleared) sampled hashes out."""

    def __init__(self, seed: bytes, block_size: int, dense_blocks: int, max_blocks: int, capacity: int) -> None:
        self.seed = seed
        self.block_size = block_size
        self.dense_blocks = dense_blocks
        self.max_blocks = max_blocks
        self.capacity = max(capacity * 2, 1024)   # per holder
        self.holders: dict[Holder, Blocks] = {}
        self.held: dict[bytes, int] = {}          # our sampled hash -> how many holders have it
        self.orphans = 0
        self.skipped = 0

    @property
    def blocks(self) -> int:
        """Engine blocks tracked, over all holders."""
        return sum(len(b) for b in self.holders.values())

    def apply(self, event: KVEvent, rank: int = 0) -> tuple[list[bytes], list[bytes], bool]:
        if isinstance(event, BlockStored):
            return self._stored(event, rank), [], False
        if isinstance(event, BlockRemoved):
            key = (rank, event.medium or "GPU", event.group_idx or 0)
            blocks = self.holders.get(key)
            removed: list[bytes] = []
            if blocks is not None:
                for eh in event.block_hashes:
                    got = blocks.pop(eh, None)
                    if got is not None and self._release(got):
                        removed.append(got[0])
            return [], removed, False
        if isinstance(event, AllBlocksCleared):
            return self._cleared(rank)
        return [], [], False

    def _stored(self, ev: BlockStored, rank: int) -> list[bytes]:
        bs = ev.block_size or self.block_size
        if bs != self.block_size:
            return []
        n = _indexable(ev)
        if n < len(ev.block_hashes):
            self.skipped += len(ev.block_hashes) - n
        if n == 0:
            return []
        key = (rank, ev.medium or "GPU", ev.group_idx or 0)
        blocks = self.holders.get(key)
        if blocks is None:
            blocks = self.holders[key] = OrderedDict()
        if ev.parent_block_hash is None:
            h, depth = self.seed, -1
        else:
            parent = blocks.get(ev.parent_block_hash)
            if parent is None:
                self.orphans += len(ev.block_hashes)
                return []
            h, depth = parent
        added: list[bytes] = []
        toks, dense, most, held = ev.token_ids, self.dense_blocks, self.max_blocks, self.held
        for i, eh in enumerate(ev.block_hashes[:n]):
            chunk = toks[i * bs:(i + 1) * bs]
            if len(chunk) < bs:
                break
            h, depth = chain_hash(h, chunk), depth + 1
            new = eh not in blocks
            blocks[eh] = (h, depth)
            blocks.move_to_end(eh)
            if is_sampled(depth, dense, most):
                added.append(h)
                if new:
                    held[h] = held.get(h, 0) + 1
        while len(blocks) > self.capacity:   # forget the oldest; its index entry ages out on its TTL
            self._release(blocks.popitem(last=False)[1])
        return added

    def _release(self, got: tuple[bytes, int]) -> bool:
        """One holder lost this block; True when that was the last holder of a sampled hash."""
        if not is_sampled(got[1], self.dense_blocks, self.max_blocks):
            return False
        left = self.held.get(got[0], 0) - 1
        if left > 0:
            self.held[got[0]] = left
            return False
        self.held.pop(got[0], None)
        return True

    def _cleared(self, rank: int) -> tuple[list[bytes], list[bytes], bool]:
        mine = [k for k in self.holders if k[0] == rank]
        if len(mine) == len(self.holders):   # nothing else holds anything: drop the whole index
            self.holders.clear()
            self.held.clear()
            return [], [], True
        removed = [got[0] for k in mine for got in self.holders.pop(k).values() if self._release(got)]
        return [], removed, False


class KVEventSubscriber:
    def __init__(self, endpoint: str | Sequence[str], tier: str, instance: str, indexer: InstanceIndexer,
                 store: AffinityStore, ttl_s: float, capacity: Callable[[], int],
                 on_event: Callable[[str], None] | None = None, flush_s: float = 0.02) -> None:
        self.endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        self.tier = tier
        self.instance = instance
        self.indexer = indexer
        self.store = store
        self.ttl_s = ttl_s
        self.capacity = capacity
        self.on_event = on_event or (lambda _kind: None)
        self.decoder = BatchDecoder()
        self.last_seq: dict[int, int] = {}   # per data-parallel rank: each rank's publisher counts its own
        self.applied = 0
        self.malformed = 0
        self.malformed_run = False           # a malformed payload was logged and no good batch has come since
        self.unattributed = 0                # malformed frames whose rank, hence place in a sequence, is unknown
        self.forms: set[str] = set()
        self.flush_s = flush_s
        self.pending: dict[bytes, bool] = {}   # our hash -> added (True) or removed (False), last wins
        self.clear_pending = False
        self.log = get_logger("tiergate.kv_events")

    def ingest(self, frames: list[bytes]) -> None:
        """Apply one published message to the indexer; index changes wait in `pending`."""
        if len(frames) < 3:
            self._bad(frames[-1] if frames else b"", "frames")
            return
        try:
            batch = self.decoder.decode(frames[2])
        except msgspec.DecodeError:
            self._bad(frames[2], "payload")
            return
        rank = batch.data_parallel_rank or 0
        seq = int.from_bytes(frames[1], "big")
        last = self.last_seq.get(rank)
        if last is not None and seq != last + 1:
            skipped = seq - last - 1
            if 0 < skipped <= self.unattributed:   # the malformed frames we had: no message was lost
                self.unattributed -= skipped
            else:
                self.on_event("gap")
        self.last_seq[rank] = seq
        form = self.decoder.form or ""
        if form not in self.forms:
            self.forms.add(form)
            self.log.info("kv_events_format", tier=self.tier, instance=self.instance, form=form,
                          data_parallel_rank=rank)
        self.malformed_run = False
        for ev in batch.events:
            added, removed, cleared = self.indexer.apply(ev, rank)
            if cleared:
                self.pending.clear()
                self.clear_pending = True
            for h in removed:
                self.pending[h] = False
            for h in added:
                self.pending[h] = True
            self.applied += 1

    def _bad(self, payload: bytes, part: str) -> None:
        self.malformed += 1
        self.unattributed += 1
        self.on_event("malformed")
        if not self.malformed_run:
            self.malformed_run = True
            self.log.warning("kv_events_malformed", tier=self.tier, instance=self.instance, part=part,
                             shape=frame_shape(payload), malformed_total=self.malformed)

    async def flush(self) -> None:
        """Write what changed since the last flush: one remove and one record call at most."""
        pending, self.pending = self.pending, {}
        clear, self.clear_pending = self.clear_pending, False
        try:
            if clear:
                await self.store.clear(self.tier, self.instance)
            removed = [h for h, add in pending.items() if not add]
            added = [h for h, add in pending.items() if add]
            if removed:
                await self.store.remove(self.tier, self.instance, removed)
            if added:
                await self.store.record(self.tier, self.instance, added, self.ttl_s, self.capacity())
        except Exception:  # fail open; the store counts and logs it
            self.on_event("store_error")

    async def run(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        for endpoint in self.endpoints:
            sock.connect(endpoint)
        self.log.info("kv_events_subscribed", tier=self.tier, instance=self.instance,
                      data_parallel_ranks=len(self.endpoints))
        loop = asyncio.get_running_loop()
        last_flush = loop.time()
        try:
            while True:
                # with nothing to flush, wait for the next event without a timeout: an idle instance
                # costs no wakeups (polling every flush_s cost ~3 ms of CPU a second per instance)
                busy = self.pending or self.clear_pending
                if await sock.poll(timeout=int(self.flush_s * 1000) if busy else None):
                    while True:  # drain what has arrived, then write it to Redis in one go
                        try:
                            self.ingest(await sock.recv_multipart(flags=zmq.NOBLOCK))
                        except zmq.Again:
                            break
                if (self.pending or self.clear_pending) and (
                        loop.time() - last_flush >= self.flush_s or len(self.pending) > 4096):
                    await self.flush()
                    last_flush = loop.time()
        finally:
            sock.close(linger=0)


def kv_subscribers(policy: Policy, registry: Registry, store: AffinityStore,
                   metrics: RouterMetrics) -> dict[tuple[str, str, str], KVEventSubscriber]:
    """One subscriber per instance that publishes KV events, keyed by (tier, instance, endpoints); it listens
    on every data-parallel rank's endpoint (`kv_events_dp_ranks`, backends.kv_events.dp_endpoint)."""
    subs = {}
    for inst in registry.all_instances():
        tier = policy.tiers[inst.tier]
        if inst.kv_events is None or not tier.affinity.enabled:
            continue
        aff = tier.affinity
        endpoints = [dp_endpoint(inst.kv_events, r) for r in range(inst.kv_events_dp_ranks)]
        indexer = InstanceIndexer(tier_seed(inst.tier, tier.model, tier.block_size), tier.block_size,
                                  aff.dense_blocks, aff.max_blocks, registry.capacity_blocks(inst))
        subs[(inst.tier, inst.instance_id, " ".join(endpoints))] = KVEventSubscriber(
            endpoints, inst.tier, inst.instance_id, indexer, store, aff.ttl_s,
            capacity=lambda i=inst: registry.capacity_blocks(i),  # type: ignore[misc]
            on_event=lambda kind, i=inst: metrics.child(metrics.kv_events, i.tier, i.instance_id, kind).inc())  # type: ignore[misc]
    return subs
