"""Paged KV cache with prefix caching, modelled on vLLM V1's block pool.

* Capacity is `num_blocks` blocks of `block_size` tokens.
* A full block is identified by a chained hash: hash(parent_hash, block token ids).
  Prefix lookup walks a prompt's block hashes until the first miss.
* Blocks are reference counted. A block whose count drops to zero stays cached and
  goes to the tail of an LRU free queue; allocation takes never-cached blocks first,
  then evicts from the LRU head. A request's blocks are freed tail-first, so a
  prompt's last blocks are evicted before its shared prefix (as vLLM does).
* `usage` counts blocks held by running requests (cached free blocks are free).
* An optional listener receives vLLM's KV-cache events (`backends.kv_events`):
  BlockStored with the parent hash and the block's token ids, and BlockRemoved.

Bulk form (the replay runs millions of these, a long prompt is thousands of blocks): reference counts,
"has a hash" flags and LRU positions are arrays, so touching or freeing a prompt's blocks is a few
vector operations; the LRU queue is an array of block ids in order, where a block's entry is live while
its recorded position points at it (touching a block just unsets that, and the allocator skips dead
entries). The order of eviction, the hashes kept and the events are the same as one block at a time
(tests/test_sim_engine.py checks it against a per-block model).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from itertools import takewhile
from operator import is_not
from typing import cast

import numpy as np

from backends.kv_events import BlockRemoved, BlockStored, KVEvent

NONE_HASH = 0x5EED
EventListener = Callable[[KVEvent], None]
_found = partial(is_not, None)


def block_hashes(token_ids: Sequence[int], block_size: int, parent: int = NONE_HASH) -> list[int]:
    """Chained hashes of every full block of `token_ids`."""
    out: list[int] = []
    h = parent
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hash((h, tuple(token_ids[start:start + block_size])))
        out.append(h)
    return out


class KVCache:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._never_cached: list[int] = list(range(num_blocks - 1, -1, -1))
        self._by_hash: dict[Hashable, int] = {}
        self._hash_of: dict[int, Hashable] = {}
        self._ref_a = array("i", bytes(4 * num_blocks))      # scalar access
        self._ref = np.frombuffer(self._ref_a, dtype=np.int32)   # the same memory, vector access
        self._hashed_b = bytearray(num_blocks)
        self._hashed = np.frombuffer(self._hashed_b, dtype=np.bool_)
        self._lru = np.empty(max(64, num_blocks), dtype=np.int64)  # evictable blocks, LRU first (with dead)
        self._head = 0
        self._tail = 0
        self._pos = np.full(num_blocks, -1, dtype=np.int64)   # a block's live entry in _lru; -1: not evictable
        self._n_evictable = 0
        self.gen_free = 0     # counts frees that gave blocks back, and resets
        self.gen_touch = 0    # counts touches
        self.listener: EventListener | None = None

    # --- queries -------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._never_cached) + self._n_evictable

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def match(self, hashes: Sequence[Hashable]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes`."""
        if not self.enable_prefix_caching:
            return []
        get: Callable[[Hashable], int | None] = self._by_hash.get
        return cast(list[int], list(takewhile(_found, map(get, hashes))))

    def has(self, h: Hashable) -> bool:
        return h in self._by_hash

    def evictable(self) -> list[int]:
        """Evictable blocks, least recently used first."""
        seg = self._lru[self._head:self._tail]
        return seg[self._pos[seg] == np.arange(self._head, self._tail)].tolist()  # type: ignore[no-any-return]

    # --- mutation ------------------------------------------------------------
    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); `blocks` are distinct."""
        if not blocks:
            return
        self.gen_touch += 1
        if len(blocks) <= 16:
            ref, pos = self._ref_a, self._pos
            for b in blocks:
                if ref[b] == 0:
                    pos[b] = -1
                    self._n_evictable -= 1
                ref[b] += 1
            return
        idx = np.array(blocks, dtype=np.int64)
        r = self._ref[idx]
        z = idx[r == 0]
        if len(z):
            self._pos[z] = -1
            self._n_evictable -= len(z)
        self._ref[idx] = r + 1

    def _take_evictable(self, m: int) -> list[int]:
        """The m least recently used evictable blocks, taken off the queue."""
        head, tail, lru, pos = self._head, self._tail, self._lru, self._pos
        if m <= 8:                # a few (a decoder's next block): scan the queue's head in Python, as below
            got: list[int] = []
            i = head
            for b in lru[head:min(tail, head + 64)].tolist():
                if pos[b] == i:
                    got.append(b)
                    if len(got) == m:
                        pos[got] = -1
                        self._head = i + 1
                        self._n_evictable -= m
                        return got
                i += 1
        w = max(2 * m, 256)
        while True:
            end = min(tail, head + w)
            seg = lru[head:end]
            live = np.flatnonzero(pos[seg] == np.arange(head, end))
            if len(live) >= m or end == tail:
                break
            w *= 4
        taken = seg[live[:m]]
        self._head = head + int(live[m - 1]) + 1
        pos[taken] = -1
        self._n_evictable -= m
        return taken.tolist()  # type: ignore[no-any-return]

    def allocate(self, n: int) -> list[int] | None:
        if n > self.num_free:
            return None
        nc = self._never_cached
        k = min(n, len(nc))
        out = nc[len(nc) - k:][::-1]
        del nc[len(nc) - k:]
        evicted: list[Hashable] = []
        if n > k:
            got = self._take_evictable(n - k)
            by_hash = self._by_hash
            hs = list(map(self._hash_of.pop, got))
            if len(got) <= 16:
                hashed = self._hashed_b
                for b in got:
                    hashed[b] = 0
            else:
                self._hashed[np.array(got, dtype=np.int64)] = False
            # a hash maps to at most one block, so checking all before deleting any gives the same as one by one
            bh_get = by_hash.get
            evicted = [h for h, b in zip(hs, got, strict=True) if bh_get(h) == b]
            for h in evicted:
                del by_hash[h]
            out.extend(got)
        if len(out) <= 16:
            ref = self._ref_a
            for b in out:
                ref[b] = 1
        else:
            self._ref[np.array(out, dtype=np.int64)] = 1
        if evicted and self.listener:
            self.listener(BlockRemoved(block_hashes=list(evicted)))  # type: ignore[arg-type]
        return out

    def cache_block(self, block: int, h: Hashable, parent: Hashable | None = None,
                    tokens: Callable[[], list[int]] | None = None) -> None:
        """Record that `block` now holds the full block with hash `h` (child of `parent`)."""
        if not self.enable_prefix_caching or block in self._hash_of:
            return
        if h in self._by_hash:  # another block already holds these tokens
            return
        self._hash_of[block] = h
        self._by_hash[h] = block
        self._hashed_b[block] = 1
        if self.listener:
            self.listener(BlockStored(block_hashes=[h], parent_block_hash=parent,  # type: ignore[list-item,arg-type]
                                      token_ids=tokens() if tokens else [], block_size=self.block_size))

    def cache_run(self, blocks: Sequence[int], hashes: Sequence[Hashable], a: int, b: int) -> None:
        """`cache_block(blocks[i], hashes[i])` for i in [a, b), with no listener (no events)."""
        if not self.enable_prefix_caching or a >= b:
            return
        hash_of, by_hash = self._hash_of, self._by_hash
        if b - a == 1:                   # a decoder's block: the common single case
            blk, h = blocks[a], hashes[a]
            if blk not in hash_of and h not in by_hash:
                hash_of[blk] = h
                by_hash[h] = blk
                self._hashed_b[blk] = 1
            return
        blks, hs = blocks[a:b], hashes[a:b]
        if by_hash.keys().isdisjoint(hs) and hash_of.keys().isdisjoint(blks):   # the usual case, at C speed
            hash_of.update(zip(blks, hs, strict=True))
            by_hash.update(zip(hs, blks, strict=True))
            if len(blks) <= 16:
                hashed_b = self._hashed_b
                for blk in blks:
                    hashed_b[blk] = 1
            else:
                self._hashed[np.array(blks, dtype=np.int64)] = True
            return
        hashed = self._hashed_b
        for blk, h in zip(blks, hs, strict=True):
            if blk in hash_of or h in by_hash:
                continue
            hash_of[blk] = h
            by_hash[h] = blk
            hashed[blk] = 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block (distinct), tail first."""
        if not blocks:
            return
        if len(blocks) <= 16:
            ref, hashed, back, nc = self._ref_a, self._hashed_b, [], self._never_cached
            for b in reversed(blocks):
                ref[b] -= 1
                if ref[b] == 0:
                    if hashed[b]:
                        back.append(b)
                    else:
                        nc.append(b)
                        self.gen_free += 1
            if back:
                self.gen_free += 1
                self._push(np.array(back, dtype=np.int64))
            return
        idx = np.array(blocks[::-1], dtype=np.int64)
        r = self._ref[idx] - 1
        self._ref[idx] = r
        z = idx[r == 0]
        if not len(z):
            return
        self.gen_free += 1
        cached = self._hashed[z]
        self._never_cached.extend(z[~cached].tolist())
        self._push(z[cached])

    def _push(self, blocks: np.ndarray) -> None:
        k = len(blocks)
        if not k:
            return
        if self._tail + k > len(self._lru):
            self._compact(k)
        t = self._tail
        self._lru[t:t + k] = blocks
        self._pos[blocks] = np.arange(t, t + k)
        self._tail = t + k
        self._n_evictable += k

    def _compact(self, room: int) -> None:
        seg = self._lru[self._head:self._tail]
        live = seg[self._pos[seg] == np.arange(self._head, self._tail)]
        if 2 * (len(live) + room) > len(self._lru):   # at most half full after compacting: amortized O(1)
            self._lru = np.empty(4 * (len(live) + room), dtype=np.int64)
        self._lru[:len(live)] = live
        self._pos[live] = np.arange(len(live))
        self._head, self._tail = 0, len(live)

    def reset(self) -> bool:
        """Drop every cached free block (vLLM's /reset_prefix_cache)."""
        self.gen_free += 1
        removed = []
        for b in self.evictable():
            h = self._hash_of.pop(b)
            self._hashed_b[b] = 0
            if self._by_hash.get(h) == b:
                del self._by_hash[h]
                removed.append(h)
            self._never_cached.append(b)
            self._pos[b] = -1
        self._n_evictable = 0
        self._head = self._tail = 0
        if removed and self.listener:
            self.listener(BlockRemoved(block_hashes=list(removed)))  # type: ignore[arg-type]
        return True
