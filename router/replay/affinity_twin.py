"""The in-memory twin of router/affinity_store.py `AffinityStore` (same async interface, same answers).

Per (tier, instance) one index of block hash -> score, as the Redis ZSET: a record scores its hashes
`now_ms x 1024 - i` (i = the hash's index in the record), drops entries scored below
`(now_ms - ttl) x 1024 - 1024`, then trims the lowest (score, member) pairs to the capacity, and the key
expires `ttl` after its last record. A lookup binary-searches each instance for the longest present
prefix of the request's hashes (an entry older than the TTL counts as absent), as the Lua script does.
Order by (score, member) is kept as one bucket of entries per millisecond (a record's hashes, in order),
ordered within a bucket only when trimming reaches it: a member's latest entry is live, older ones are
skipped (and the buckets rebuilt when stale entries outnumber live ones), so a record, and each member
it later trims, costs O(1) (the clock of a replay only goes forward; one that goes back inserts a bucket).

Time is the injected `clock_ms` (the replay's virtual clock). Nothing here waits or fails: the breaker,
timeouts and the pending-task bound of the Redis store have nothing to guard, and `record_later`
records at once. tests/test_store_contract.py runs this twin and the Redis store through the same
operations and asserts the same answers.
"""

from __future__ import annotations

import time
from bisect import insort
from collections.abc import Callable, Sequence


class _Bucket:
    """The entries recorded in one millisecond: (index in its record, member), score = ms x 1024 - index.
    Records are kept as they came (`recs`, no pair per entry: the replay adds millions of them) until the
    bucket is ordered, when they become (index, member) pairs."""

    __slots__ = ("at", "entries", "ordered", "recs")

    def __init__(self) -> None:
        self.entries: list[tuple[int, bytes]] = []   # pairs: lowest first once ordered (else as compacted)
        self.recs: list[Sequence[bytes]] = []        # records not yet in `entries`, each its members in order
        self.at = 0              # entries before this were taken (once ordered)
        self.ordered = False

    def order(self) -> None:
        """Lowest (score, member) first: the highest index first, members ascending."""
        rest = self.entries[self.at:]
        if len(self.recs) == 1 and not rest:     # one record: distinct ascending indices, so just reversed
            rec = self.recs[0]
            rest = [(i, rec[i]) for i in range(len(rec) - 1, -1, -1)]
        else:
            for rec in self.recs:
                rest.extend(enumerate(rec))
            rest.sort(key=lambda e: (-e[0], e[1]))
        self.entries, self.recs, self.at, self.ordered = rest, [], 0, True


class _Index:
    """One instance's ZSET: member -> score, and the members in (score, member) order as buckets per
    millisecond (each member's latest entry is live; older ones are skipped when met)."""

    __slots__ = ("buckets", "entries", "expires_at", "head", "order", "scores")

    def __init__(self) -> None:
        self.scores: dict[bytes, int] = {}
        self.buckets: dict[int, _Bucket] = {}
        self.order: list[int] = []          # bucket milliseconds, ascending, from `head`
        self.head = 0
        self.entries = 0                     # entries held in buckets (live or stale)
        self.expires_at = 0

    def add(self, ms: int, hashes: Sequence[bytes]) -> None:
        b = self.buckets.get(ms)
        if b is None:
            b = self.buckets[ms] = _Bucket()
            if self.head >= len(self.order) or ms > self.order[-1]:
                self.order.append(ms)
            else:                            # an earlier millisecond than the newest (a clock that went back)
                insort(self.order, ms, lo=self.head)
        b.recs.append(hashes if type(hashes) is tuple else tuple(hashes))
        b.ordered = False
        self.entries += len(hashes)
        base = ms * 1024
        self.scores.update(zip(hashes, range(base, base - len(hashes), -1), strict=True))

    def _take(self, k: int, below: int | None) -> None:
        """Remove the k lowest members (k < 0: all) scored below `below` (None: any score)."""
        scores = self.scores
        while k and self.head < len(self.order):
            ms = self.order[self.head]
            b = self.buckets[ms]
            if not b.ordered:
                b.order()
            base, entries, at = ms * 1024, b.entries, b.at
            while k and at < len(entries):
                i, m = entries[at]
                if below is not None and base - i >= below:
                    b.at = at
                    return
                at += 1
                if scores.get(m) == base - i:
                    del scores[m]
                    k -= 1
            b.at = at
            if at < len(entries):
                return
            self.entries -= len(entries)
            del self.buckets[ms]
            self.head += 1
        if self.head > 64 and self.head * 2 > len(self.order):
            del self.order[: self.head]
            self.head = 0

    def drop_below(self, min_score: int) -> None:
        self._take(-1, min_score)

    def pop_lowest(self, k: int) -> None:
        self._take(k, None)

    def compact(self) -> None:
        """Rebuild the buckets from the live members when stale entries outnumber them."""
        if self.entries <= 3 * len(self.scores) + 16384:
            return
        groups: dict[int, list[tuple[int, bytes]]] = {}
        for m, sc in self.scores.items():
            ms = -(-sc // 1024)
            groups.setdefault(ms, []).append((ms * 1024 - sc, m))
        self.buckets, self.order, self.head = {}, sorted(groups), 0
        for ms, entries in groups.items():
            b = self.buckets[ms] = _Bucket()
            b.entries = entries
        self.entries = len(self.scores)


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
        keys = self._keys
        for tier, instances, hashes in groups:
            if not instances or not hashes:
                continue
            n = len(hashes)
            for inst in instances:
                key = (tier, inst)
                idx = keys.get(key)
                if idx is None or now > idx.expires_at:
                    if idx is not None:
                        del keys[key]       # PEXPIRE ran out (as `_get`)
                    out[key] = 0
                    continue
                get = idx.scores.get
                lo, hi = 0, n
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    s = get(hashes[mid - 1])
                    if s is not None and s >= min_score:
                        lo = mid
                    else:
                        hi = mid - 1
                out[key] = lo
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
        idx.add(now, hashes)     # ZADD: the newest score wins; a member's older entry goes stale
        idx.drop_below((now - ttl) * 1024 - 1024)
        n = len(idx.scores)
        if n > capacity_blocks:
            idx.pop_lowest(n - capacity_blocks)
        idx.compact()
        idx.expires_at = now + ttl
        return min(n, capacity_blocks)

    def record_later(self, tier: str, instance: str, hashes: Sequence[bytes], ttl_s: float,
                     capacity_blocks: int) -> None:
        self.record_now(tier, instance, hashes, ttl_s, capacity_blocks)

    async def claim(self, tier: str, chosen: str, seen: Sequence[tuple[str, int]], hashes: Sequence[bytes],
                    ttl_s: float, capacity_blocks: int) -> tuple[str, int] | None:
        return self.claim_now(tier, chosen, seen, hashes, ttl_s, capacity_blocks)

    def claim_now(self, tier: str, chosen: str, seen: Sequence[tuple[str, int]], hashes: Sequence[bytes],
                  ttl_s: float, capacity_blocks: int) -> tuple[str, int]:
        """As the Redis store's `claim` (its _CLAIM script): a longer prefix that appeared elsewhere since
        the lookup names that instance; else record for `chosen`."""
        if not hashes:
            return chosen, 0
        others = [(i, n) for i, n in seen if i != chosen]
        found = self.lookup_now([(tier, [chosen, *(i for i, _ in others)], hashes)], ttl_s)
        mine = found.get((tier, chosen), 0)
        best, best_n = chosen, mine
        for inst, was in others:
            n = found.get((tier, inst), 0)
            if n > was and n > best_n:
                best, best_n = inst, n
        if best != chosen:
            return best, best_n
        self.record_now(tier, chosen, hashes, ttl_s, capacity_blocks)
        return chosen, mine

    async def remove(self, tier: str, instance: str, hashes: Sequence[bytes]) -> None:
        idx = self._get(tier, instance, self.clock_ms())
        if idx is None:
            return
        for h in hashes:
            idx.scores.pop(h, None)   # its bucket entries go stale
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
