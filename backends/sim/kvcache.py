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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from backends.kv_events import BlockRemoved, BlockStored, KVEvent

NONE_HASH = 0x5EED
EventListener = Callable[[KVEvent], None]


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
        self._evictable: OrderedDict[int, int] = OrderedDict()  # block id -> hash, LRU first
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._ref = [0] * num_blocks
        self.listener: EventListener | None = None

    # --- queries -------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._never_cached) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def match(self, hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes`."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        for h in hashes:
            b = self._by_hash.get(h)
            if b is None:
                break
            found.append(b)
        return found

    # --- mutation ------------------------------------------------------------
    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        for b in blocks:
            if self._ref[b] == 0:
                self._evictable.pop(b, None)
            self._ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        if n > self.num_free:
            return None
        out: list[int] = []
        evicted: list[int] = []
        for _ in range(n):
            if self._never_cached:
                b = self._never_cached.pop()
            else:
                b, h = self._evictable.popitem(last=False)
                del self._hash_of[b]
                if self._by_hash.get(h) == b:
                    del self._by_hash[h]
                    evicted.append(h)
            self._ref[b] = 1
            out.append(b)
        if evicted and self.listener:
            self.listener(BlockRemoved(block_hashes=list(evicted)))
        return out

    def cache_block(self, block: int, h: int, parent: int | None = None,
                    tokens: Callable[[], list[int]] | None = None) -> None:
        """Record that `block` now holds the full block with hash `h` (child of `parent`)."""
        if not self.enable_prefix_caching or block in self._hash_of:
            return
        if h in self._by_hash:  # another block already holds these tokens
            return
        self._hash_of[block] = h
        self._by_hash[h] = block
        if self.listener:
            self.listener(BlockStored(block_hashes=[h], parent_block_hash=parent,
                                      token_ids=tokens() if tokens else [], block_size=self.block_size))

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block, tail first."""
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                h = self._hash_of.get(b)
                if h is None:
                    self._never_cached.append(b)
                else:
                    self._evictable[b] = h

    def reset(self) -> bool:
        """Drop every cached free block (vLLM's /reset_prefix_cache)."""
        removed = []
        for b, h in list(self._evictable.items()):
            del self._hash_of[b]
            if self._by_hash.get(h) == b:
                del self._by_hash[h]
                removed.append(h)
            self._never_cached.append(b)
        self._evictable.clear()
        if removed and self.listener:
            self.listener(BlockRemoved(block_hashes=list[int | bytes](removed)))
        return True
