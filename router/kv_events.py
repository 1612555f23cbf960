"""Correct the affinity index from an engine's KV-cache events (vLLM's ZMQ publisher).

One lifespan-owned task per instance that names a `kv_events` endpoint subscribes
to it. BlockStored events carry each block's token ids and the engine's parent hash;
we keep a bounded map engine hash -> (our chained hash, block position) so that our
own hash of every stored block can be computed exactly as the router computes it
from a prompt (`prefix_hash`). Sampled positions are then added to the instance's
index; BlockRemoved removes them, AllBlocksCleared drops the instance's index.
A block whose parent we never saw (we joined mid-stream or lost messages) is
skipped: the index stays approximate there and ages out on its TTL. Gaps in the
publisher's sequence numbers are counted (vLLM's replay socket is not used).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from backends.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EngineHash, KVEvent, decode_batch
from router.affinity_store import AffinityStore
from router.logs import get_logger
from router.prefix_hash import chain_hash, is_sampled


class InstanceIndexer:
    """Pure bookkeeping for one instance: events in, (added, removed) sampled hashes out."""

    def __init__(self, seed: bytes, block_size: int, dense_blocks: int, max_blocks: int, capacity: int) -> None:
        self.seed = seed
        self.block_size = block_size
        self.dense_blocks = dense_blocks
        self.max_blocks = max_blocks
        self.capacity = max(capacity * 2, 1024)
        self.blocks: OrderedDict[EngineHash, tuple[bytes, int]] = OrderedDict()
        self.orphans = 0

    def apply(self, event: KVEvent) -> tuple[list[bytes], list[bytes], bool]:
        added: list[bytes] = []
        removed: list[bytes] = []
        if isinstance(event, BlockStored):
            bs = event.block_size or self.block_size
            if bs != self.block_size:
                return added, removed, False
            if event.parent_block_hash is None:
                h, depth = self.seed, -1
            else:
                parent = self.blocks.get(event.parent_block_hash)
                if parent is None:
                    self.orphans += len(event.block_hashes)
                    return added, removed, False
                h, depth = parent
            for i, eh in enumerate(event.block_hashes):
                toks = event.token_ids[i * bs:(i + 1) * bs]
                if len(toks) < bs:
                    break
                h, depth = chain_hash(h, toks), depth + 1
                self.blocks[eh] = (h, depth)
                self.blocks.move_to_end(eh)
                if is_sampled(depth, self.dense_blocks, self.max_blocks):
                    added.append(h)
            while len(self.blocks) > self.capacity:
                self.blocks.popitem(last=False)
        elif isinstance(event, BlockRemoved):
            for eh in event.block_hashes:
                got = self.blocks.pop(eh, None)
                if got is not None and is_sampled(got[1], self.dense_blocks, self.max_blocks):
                    removed.append(got[0])
        elif isinstance(event, AllBlocksCleared):
            self.blocks.clear()
            return added, removed, True
        return added, removed, False


class KVEventSubscriber:
    def __init__(self, endpoint: str, tier: str, instance: str, indexer: InstanceIndexer, store: AffinityStore,
                 ttl_s: float, capacity: Callable[[], int], on_event: Callable[[str], None] | None = None) -> None:
        self.endpoint = endpoint
        self.tier = tier
        self.instance = instance
        self.indexer = indexer
        self.store = store
        self.ttl_s = ttl_s
        self.capacity = capacity
        self.on_event = on_event or (lambda _kind: None)
        self.last_seq: int | None = None
        self.applied = 0
        self.log = get_logger("tiergate.kv_events")

    async def handle(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            return
        seq = int.from_bytes(frames[1], "big")
        if self.last_seq is not None and seq != self.last_seq + 1:
            self.on_event("gap")
        self.last_seq = seq
        try:
            batch = decode_batch(frames[2])
        except msgspec.DecodeError:
            self.on_event("malformed")
            return
        added: list[bytes] = []
        removed: list[bytes] = []
        for ev in batch.events:
            a, r, cleared = self.indexer.apply(ev)
            if cleared:
                added, removed = [], []
                with contextlib.suppress(Exception):
                    await self.store.clear(self.tier, self.instance)
            added.extend(a)
            removed.extend(r)
            self.applied += 1
        try:
            if removed:
                gone = set(removed)
                added = [h for h in added if h not in gone]
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
        sock.connect(self.endpoint)
        self.log.info("kv_events_subscribed", tier=self.tier, instance=self.instance)
        try:
            while True:
                frames = await sock.recv_multipart()
                await self.handle(frames)
        except asyncio.CancelledError:
            raise
        finally:
            sock.close(linger=0)
