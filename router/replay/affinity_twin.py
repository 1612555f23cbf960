"""The in-memory twin of router/affinity_store.py `AffinityStore` (same async interface, same answers).

Per (tier, instance) one index of block hash -> score, as the Redis ZSET: a record scores its hashes
`now_ms x 1024 - i` (i = the hash's index in the record), drops entries scored below
`(now_ms - ttl) x 1024 - 1024`, then trims the lowest (score, member) pairs to the capacity, and the key
expires `ttl` after its last record. A lookup binary-searches each instance for the longest present
prefix of the request's hashes (an entry older than the TTL counts as absent), as the Lua script does.
Order by (score, member) is kept in a heap with lazy deletion (rebuilt when stale entries outnumber live
ones), so a record costs O(hashes x log n).

Time is the injected `clock_ms` (the replay's virtual clock). Nothing here waits or fails: the breaker,
timeouts and the pending-task bound of the Redis store have nothing to guard, and `record_later`
records at once. tests/test_store_contract.py runs this twin and the Redis store through the same
operations and asserts the same answers.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence


class _Index:
    __slots__ = ("expires_at", "heap", "scores")

    def __init__(self) -> None:
        self.scores: dict[bytes, int] = {}
        self.heap: list[tuple[int, bytes]] = []
        self.expires_at = 0

    def pop_lowest(self) -> None:
        scores, heap = self.scores, self.heap
        while heap:
            s, h = heapq.heappop(heap)
            if scores.get(h) == s:
                del scores[h]
                return

    def drop_below(self, min_score: int) -> None:
        scores, heap = self.scores, self.heap
        while heap and heap[0][0] < min_score:
            s, h = heapq.heappop(heap)
            if scores.get(h) == s:
                del scores[h]

    def compact(self) -> None:
        if len(self.heap) > 2 * len(self.scores) + 64:
            self.heap = [(s, h) for h, s in self.scores.items()]
            heapq.heapify(self.heap)


class MemoryAffinityStore:
    def __init__(self, clock_ms: Callable[[], int] = lambda: int(time.time() * 1000)) -> None:
        self.clock_ms = clock_ms
        self._keys: dict[tuple[str, str], _Index] = {}

    def _get(self, tier: str, instance: str, now: int) -> _Index | None:
        idx = self._keys.get((tier, instance))
        if idx is not None and now > idx.expires_at:   # Redis: expired once now > the deadline
            del self._keys[(tier, instance)]   # PEXPIRE ran out
            return None
        return idx

    async def lookup(self, groups: Sequence[tuple[str, Sequence[str], Sequence[bytes]]],
                     ttl_s: float) -> dict[tuple[str, str], int] | None:
        return self.lookup_now(groups, ttl_s)

    def lookup_now(self, groups: Sequence[tuple[str, Sequence[str], Sequence[bytes]]],
                   ttl_s: float) -> dict[tuple[str, str], int]:
        now = self.clock_ms()
        min_score = (now - int(ttl_s * 1000)) * 1024 - 1024
        out: dict[tuple[str, str], int] = {}
        for tier, instances, hashes in groups:
            if not instances or not hashes:
                continue
            for inst in instances:
                idx = self._get(tier, inst, now)
                scores = idx.scores if idx is not None else {}
                lo, hi = 0, len(hashes)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    s = scores.get(hashes[mid - 1])
                    if s is not None and s >= min_score:
                        lo = mid
                    else:
                        hi = mid - 1
                out[(tier, inst)] = lo
        return out

    async def record(self, tier: str, instance: str, hashes: Sequence[bytes], ttl_s: float,
                     capacity_blocks: int) -> int | None:
        return self.record_now(tier, instance, hashes, ttl_s, capacity_blocks)

    def record_now(self, tier: str, instance: str, hashes: Sequence[bytes], ttl_s: float,
                   capacity_blocks: int) -> int:
        if not hashes:
            return 0
        now = self.clock_ms()
        ttl = int(ttl_s * 1000)
        idx = self._get(tier, instance, now)
        if idx is None:
            idx = self._keys[(tier, instance)] = _Index()
        scores, heap = idx.scores, idx.heap
        base = now * 1024
        push = heapq.heappush
        for i, h in enumerate(hashes):
            s = base - i
            if scores.get(h) != s:
                scores[h] = s
                push(heap, (s, h))
        idx.drop_below((now - ttl) * 1024 - 1024)
        n = len(scores)
        for _ in range(n - capacity_blocks):
            idx.pop_lowest()
        idx.compact()
        idx.expires_at = now + ttl
        return min(n, capacity_blocks)

    def record_later(self, tier: str, instance: str, hashes: Sequence[bytes], ttl_s: float,
                     capacity_blocks: int) -> None:
        self.record_now(tier, instance, hashes, ttl_s, capacity_blocks)

    async def remove(self, tier: str, instance: str, hashes: Sequence[bytes]) -> None:
        idx = self._get(tier, instance, self.clock_ms())
        if idx is None:
            return
        for h in hashes:
            idx.scores.pop(h, None)   # its heap entries go stale
        idx.compact()
        if not idx.scores:
            del self._keys[(tier, instance)]

    async def clear(self, tier: str, instance: str) -> None:
        self._keys.pop((tier, instance), None)

    async def size(self, tier: str, instance: str) -> int:
        idx = self._get(tier, instance, self.clock_ms())
        return 0 if idx is None else len(idx.scores)

    async def drain(self) -> None:
        return None
