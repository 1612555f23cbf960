"""Block hashes of a trace request, without token ids: what the router's affinity index and the engines'
prefix caches see of it.

A request's token stream is pieces: its prefix groups in order (group g's tokens [0, n)), then tokens of
its own, then its output (tokens of its own, or, with `continues`, group g's tokens [n, n + output)).
Token ids are never drawn: a full block is identified by its content, written as the pieces it covers
(group key, start, end), chained as vLLM chains blocks: h_j = blake2b-64(h_{j-1} + block j's content),
from a seed per block size (router/prefix_hash.py `chain_hash` does the same over token ids). Two
requests thus share a block hash exactly where their token streams would share the whole prefix up to
that block. Once the stream reaches a piece of its own, every later block is unique to the request; those
get unique values without hashing (an int range per request, and its 8 bytes for the router).

Per request: `ints` (every full block of prompt + output, for the engine: SimRequest.hashes) and, per tier
affinity spec, the sampled positions the router looks up (router/prefix_hash.py `sample_positions`,
the same positions `prefix_hashes` samples) with their hashes as `PrefixHashes`. The router's hashes
are seeded per tier (`tier_seed`); here one chain per block size serves every tier, since each tier
and instance has its own index key, so only equality within a tier matters, and it is the same.

Shared chains are computed once: a group's chain after a given stream state is cached (and extended as
a conversation grows), bounded by `max_cached_blocks` (least recently used groups go first).
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from bisect import bisect_left
from collections import OrderedDict

from router.prefix_hash import PrefixHashes, sample_positions
from router.replay.trace import TraceRequest

_pack = struct.Struct("<II").pack
_q = struct.Struct("<Q").pack
_link = struct.Struct("<8s9sII").pack    # parent hash (8 bytes), group key (9), block start, end
UNIQUE_BASE = 1 << 62      # unique block ids: UNIQUE_BASE + request serial x 2^20 + block index
State = tuple[bytes, bytes, int]   # (last full block's hash, the open block's content so far, its tokens)


class _Run:
    """A group's chain, from a stream state: complete blocks as its tokens are appended."""

    __slots__ = ("hashes", "ints", "p0", "parent", "pdesc")

    def __init__(self, state: State) -> None:
        self.parent, self.pdesc, self.p0 = state
        self.hashes: list[bytes] = []
        self.ints: list[int] = []

    def extend(self, gkey: bytes, upto: int, bs: int) -> None:
        target = (self.p0 + upto) // bs
        n = len(self.hashes)
        if n >= target:
            return
        blake = hashlib.blake2b
        h = self.hashes[-1] if n else self.parent
        new: list[bytes] = []
        j = n
        if j == 0:
            h = blake(h + self.pdesc + gkey + _pack(0, bs - self.p0), digest_size=8).digest()
            new.append(h)
            j = 1
        if len(gkey) == 9 and len(h) == 8:   # every group key and hash here: one pack, the same bytes
            link = _link
            for s in range(j * bs - self.p0, target * bs - self.p0, bs):
                h = blake(link(h, gkey, s, s + bs), digest_size=8).digest()
                new.append(h)
        else:
            for s in range(j * bs - self.p0, target * bs - self.p0, bs):
                h = blake(h + gkey + _pack(s, s + bs), digest_size=8).digest()
                new.append(h)
        self.hashes.extend(new)
        self.ints.extend(array("Q", b"".join(new)))

    def state_at(self, gkey: bytes, end: int, bs: int) -> State:
        n, rem = divmod(self.p0 + end, bs)
        parent = self.hashes[n - 1] if n else self.parent
        if not rem:
            return parent, b"", 0
        start = n * bs - self.p0
        open_desc = (self.pdesc if n == 0 else b"") + gkey + _pack(max(start, 0), end)
        return parent, open_desc, rem


class Blocks:
    """One request's block hashes, for the engine and, per tier, for the router."""

    __slots__ = ("bs", "ints", "prompt_blocks", "serial", "shared")

    def __init__(self, bs: int, ints: list[int], shared: list[bytes], prompt_blocks: int, serial: int) -> None:
        self.bs = bs
        self.ints = ints                  # every full block of prompt + output
        self.shared = shared              # the group blocks' hashes (then the request's own blocks)
        self.prompt_blocks = prompt_blocks
        self.serial = serial

    def prefix_hashes(self, dense_blocks: int, max_blocks: int) -> PrefixHashes:
        """The sampled positions of the prompt's full blocks and their hashes, as `prefix_hashes` samples."""
        shared, n = self.shared, len(self.shared)
        base = UNIQUE_BASE + (self.serial << 20)
        every = sample_positions(dense_blocks, max_blocks)
        pos = list(every[: bisect_left(every, self.prompt_blocks)])
        return PrefixHashes([shared[p] if p < n else _q(base + p) for p in pos], pos, self.bs)


class BlockChains:
    def __init__(self, max_cached_blocks: int = 4_000_000) -> None:
        self.runs: OrderedDict[tuple[int, State, str], _Run] = OrderedDict()
        self.cached = 0
        self.max_cached = max_cached_blocks
        self._gkeys: dict[str, bytes] = {}
        self._seeds: dict[int, bytes] = {}

    def _gkey(self, gid: str) -> bytes:
        k = self._gkeys.get(gid)
        if k is None:
            k = self._gkeys[gid] = b"g" + hashlib.blake2b(gid.encode(), digest_size=8).digest()
        return k

    def _run(self, bs: int, state: State, gid: str) -> _Run:
        key = (bs, state, gid)
        run = self.runs.get(key)
        if run is None:
            run = self.runs[key] = _Run(state)
        else:
            self.runs.move_to_end(key)
        return run

    def _trim(self) -> None:
        while self.cached > self.max_cached and len(self.runs) > 1:
            _, run = self.runs.popitem(last=False)
            self.cached -= len(run.hashes)

    def blocks(self, r: TraceRequest, target_output: int, bs: int, serial: int) -> Blocks:
        """`target_output`: the output tokens the engine will generate (the trace's, capped)."""
        seed = self._seeds.get(bs)
        if seed is None:
            seed = self._seeds[bs] = hashlib.blake2b(b"tiergate-replay/%d" % bs, digest_size=8).digest()
        state: State = (seed, b"", 0)
        shared: list[bytes] = []
        ints: list[int] = []
        groups = list(r.prefix)
        own = r.prompt - sum(g.tokens for g in groups)
        for i, g in enumerate(groups):
            end = g.tokens
            if i == len(groups) - 1 and r.continues and own == 0:
                end += target_output          # the answer continues the group: its blocks are the group's
            gkey = self._gkey(g.id)
            run = self._run(bs, state, g.id)
            before = len(run.hashes)
            run.extend(gkey, end, bs)
            self.cached += len(run.hashes) - before
            n = (run.p0 + end) // bs
            shared.extend(run.hashes[:n])
            ints.extend(run.ints[:n])
            state = run.state_at(gkey, end, bs)
        self._trim()
        total = (r.prompt + target_output) // bs
        base = UNIQUE_BASE + (serial << 20)
        if len(ints) < total:
            ints.extend(range(base + len(ints), base + total))
        return Blocks(bs, ints[:total], shared, r.prompt // bs, serial)
