"""Correct the affinity index from an engine's KV-cache events (vLLM's ZMQ publisher).

One lifespan-owned task per instance that names a `kv_events` endpoint subscribes to
it. BlockStored events carry each block's token ids and the engine's parent hash; a
bounded map engine hash -> (our chained hash, block position) lets us compute our own
hash of every stored block exactly as the router computes it from a prompt
(`prefix_hash`). Sampled positions are added to the instance's index, BlockRemoved
removes them, AllBlocksCleared drops the instance's index. Changes are coalesced and
written every `flush_s` (one ZREM and one record script per flush, not one per
engine step). A block whose parent we never saw (we joined mid-stream or lost
messages) is skipped: the index stays approximate there and ages out on its TTL.
Gaps in the publisher's sequence numbers are counted (vLLM's replay socket is not
used).
"""

from __future__ import annotations

import asyncio
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
                 ttl_s: float, capacity: Callable[[], int], on_event: Callable[[str], None] | None = None,
                 flush_s: float = 0.02) -> None:
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
        self.flush_s = flush_s
        self.pending: dict[bytes, bool] = {}   # our hash -> added (True) or removed (False), last wins
        self.clear_pending = False
        self.log = get_logger("tiergate.kv_events")

    def ingest(self, frames: list[bytes]) -> None:
        """Apply one published message to the indexer; index changes wait in `pending`."""
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
        for ev in batch.events:
            added, removed, cleared = self.indexer.apply(ev)
            if cleared:
                self.pending.clear()
                self.clear_pending = True
            for h in removed:
                self.pending[h] = False
            for h in added:
                self.pending[h] = True
            self.applied += 1

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
        sock.connect(self.endpoint)
        self.log.info("kv_events_subscribed", tier=self.tier, instance=self.instance)
        loop = asyncio.get_running_loop()
        last_flush = loop.time()
        try:
            while True:
                if await sock.poll(timeout=int(self.flush_s * 1000)):
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
