"""Prefix coalescing (#14 item 1): a claim at decision time, atomic across replicas, on a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from router.affinity_store import AffinityStore
from router.prefix_hash import prefix_hashes
from tests.test_affinity import SEED, ids


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[AffinityStore]:
    r = aioredis.Redis.from_url(redis_url)
    try:
        yield AffinityStore(r, timeout_s=1.0)
    finally:
        await r.aclose()


async def test_a_concurrent_claim_of_the_same_new_prefix_names_the_first_claimer(store: AffinityStore) -> None:
    t = f"t{uuid.uuid4().hex[:8]}"
    doc = ids(8000)
    a = prefix_hashes(doc + ids(200, 1), SEED, 16, 64, 512)
    b = prefix_hashes(doc + ids(200, 2), SEED, 16, 64, 512)
    shared = sum(1 for x, y in zip(a.hashes, b.hashes, strict=False) if x == y)
    seen = [("i0", 0), ("i1", 0), ("i2", 0)]        # both looked up before either claimed
    assert await store.claim(t, "i1", seen, a.hashes, 600, 10_000) == ("i1", 0)    # first: recorded on i1
    assert await store.claim(t, "i2", seen, b.hashes, 600, 10_000) == ("i1", shared)   # second: go to i1
    assert await store.lookup([(t, ["i0", "i1", "i2"], b.hashes)], 600) == \
        {(t, "i0"): 0, (t, "i1"): shared, (t, "i2"): 0}   # the second recorded nothing
    # a decision that saw i1's prefix and chose elsewhere anyway (load, SLO) is not overruled
    seen_now = [("i0", 0), ("i1", shared), ("i2", 0)]
    assert await store.claim(t, "i2", seen_now, b.hashes, 600, 10_000) == ("i2", 0)
    assert (await store.lookup([(t, ["i2"], b.hashes)], 600))[(t, "i2")] == len(b.hashes)


async def test_claims_racing_from_many_tasks_all_follow_one_instance(store: AffinityStore, redis_url: str) -> None:
    """32 requests with one new document, each with its own question, claim at once from 32 tasks on
    two connections (two replicas): exactly one records, and the other 31 are told its instance."""
    t = f"t{uuid.uuid4().hex[:8]}"
    doc = ids(8000, 7)
    insts = [f"i{k}" for k in range(4)]
    seen = [(i, 0) for i in insts]
    other = AffinityStore(aioredis.Redis.from_url(redis_url), timeout_s=1.0)
    try:
        reqs = [prefix_hashes(doc + ids(200, 100 + k), SEED, 16, 64, 512) for k in range(32)]
        got = await asyncio.gather(*((store if k % 2 else other).claim(t, insts[k % 4], seen, reqs[k].hashes,
                                                                       600, 10_000) for k in range(32)))
    finally:
        await other.redis.aclose()
    winners = [k for k, (_inst, n) in enumerate(got) if n == 0]
    assert len(winners) == 1
    assert {inst for inst, _ in got} == {got[winners[0]][0]}
