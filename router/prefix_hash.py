"""Prefix block hashes from exact token ids, aligned with vLLM's KV blocks.

vLLM caches a prompt in full blocks of `block_size` tokens; a block is reusable only
when every block before it is too, so its identity is a chain: block j's hash covers
its own tokens and block j-1's hash. We compute the same chain (our own function,
blake2b-64 over the parent hash and the block's token ids as uint32, seeded per tier,
model and block size) over every full block of the prompt.

To keep Redis traffic bounded, only a fixed set of *sampled* block positions is
looked up and recorded. The set is the same for every prompt, so two prompts that
share a prefix share its sampled hashes:

* the first `dense_blocks` positions are all sampled;
* then segments of `dense_blocks` samples each, the k-th with stride 2^k, each sample
  the last block of its stride group; this continues until `max_blocks` samples.

With dense_blocks=64, max_blocks=512 and 16-token blocks, matches are exact to the
block up to 1,024 tokens and resolve to 2^k blocks beyond, covering 261K tokens with
at most 512 hashes per request. A matched sample at position j means (j + 1) *
block_size prompt tokens are expected to be cached.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from functools import lru_cache

HASH_BYTES = 8


def tier_seed(tier: str, model: str, block_size: int) -> bytes:
    return hashlib.blake2b(f"tiergate/{tier}/{model}/{block_size}".encode(), digest_size=HASH_BYTES).digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("I", tokens).tobytes(), digest_size=HASH_BYTES).digest()


def is_sampled(j: int, dense_blocks: int, max_blocks: int) -> bool:
    """Whether block position j (0-based) is in the fixed sample set."""
    if j < dense_blocks:
        return True
    k, start = 1, dense_blocks
    while (k + 1) * dense_blocks <= max_blocks:
        stride = 1 << k
        end = start + dense_blocks * stride
        if j < end:
            return (j - start) % stride == stride - 1
        start, k = end, k + 1
    return False


@lru_cache(maxsize=16)
def sample_positions(dense_blocks: int, max_blocks: int) -> tuple[int, ...]:
    """Every sampled position, ascending (at most `max_blocks`)."""
    out = list(range(dense_blocks))
    k, start = 1, dense_blocks
    while (k + 1) * dense_blocks <= max_blocks:
        stride = 1 << k
        out.extend(start + i * stride + stride - 1 for i in range(dense_blocks))
        start, k = start + dense_blocks * stride, k + 1
    return tuple(out)


class PrefixHashes:
    """The sampled hashes of one prompt on one tier, and what a match means in tokens."""

    __slots__ = ("block_size", "hashes", "positions")

    def __init__(self, hashes: list[bytes], positions: list[int], block_size: int) -> None:
        self.hashes = hashes
        self.positions = positions
        self.block_size = block_size

    def tokens_for(self, matched: int) -> int:
        """Cached prompt tokens implied by `matched` leading sampled hashes being present."""
        return 0 if matched <= 0 else (self.positions[matched - 1] + 1) * self.block_size

    def shared_tokens(self, other: PrefixHashes | None) -> int:
        """Prompt tokens this prompt and `other` share from the start, by their sampled hashes (chained, so
        equal hashes at one position mean equal prompts up to there)."""
        if other is None or other.block_size != self.block_size:
            return 0
        n = 0
        for x, y, px, py in zip(self.hashes, other.hashes, self.positions, other.positions, strict=False):
            if x != y or px != py:
                break
            n += 1
        return self.tokens_for(n)

    def matched_for(self, tokens: int) -> int:
        """The inverse of `tokens_for`: how many leading sampled hashes `tokens` cached tokens stand for."""
        return bisect_right(self.positions, tokens // self.block_size - 1) if tokens > 0 else 0


def prefix_hashes(ids: Sequence[int], seed: bytes, block_size: int, dense_blocks: int,
                  max_blocks: int) -> PrefixHashes:
    """Chain every full block of `ids`; keep the sampled positions."""
    n_blocks = len(ids) // block_size
    positions = [p for p in sample_positions(dense_blocks, max_blocks) if p < n_blocks]
    if not positions:
        return PrefixHashes([], [], block_size)
    last = positions[-1]
    raw = array("I", ids[: (last + 1) * block_size]).tobytes()
    step = block_size * 4
    blake = hashlib.blake2b
    want = set(positions)
    out: list[bytes] = []
    h = seed
    for j in range(last + 1):
        h = blake(h + raw[j * step:(j + 1) * step], digest_size=HASH_BYTES).digest()
        if j in want:
            out.append(h)
    return PrefixHashes(out, positions, block_size)
