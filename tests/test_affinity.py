"""Prefix affinity: hashing alignment with the engine, the Lua index on a real Redis, guards,
fail-open with a paused Redis, KV-event reconciliation over ZMQ, and two replicas agreeing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from backends.sim.kvcache import block_hashes
from backends.sim.run import RunningSim, start_sim
from backends.tokenization import TierTokenizer
from backends.valkey import EmbeddedValkey, free_port
from policies.plugins.bounded_load import BoundedLoad
from policies.plugins.prefix_affinity import PrefixAffinity
from policies.schema import InstanceSpec, Policy, parse_policy
from policies.types import Candidate, RoutingRequest
from router.affinity_store import AffinityStore, Breaker, index_key
from router.kv_events import InstanceIndexer, KVEventSubscriber
from router.prefix_hash import is_sampled, prefix_hashes, sample_positions, tier_seed
from tests.conftest import DEMO_KEY, serve_router

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}
MODEL = "Qwen/Qwen3-1.7B-FP8"
SEED = tier_seed("fast", MODEL, 16)

POLICY = f"""
version: 1
tiers:
  fast:
    model: {MODEL}
    max_model_len: 40960
    prices: {{input: 0.05, cached_input: 0.01, output: 0.20}}
    simulate: {{profile: qwen3-1.7b-fp8}}
    affinity: {{ttl_s: 600}}
tenants:
  demo: {{key_sha256: [a76e8169f2e4051531cdd24753d163ed3cc01d9208b14606f88055b404f4c13f]}}
routes:
  chat: {{tiers: [fast], profile: affinity}}
profiles:
  affinity:
    filters:
      - {{type: tier_allowed}}
      - {{type: context_fits}}
      - {{type: healthy}}
      - {{type: bounded_load, params: {{c: 2.0}}}}
    scorers:
      - {{type: prefix_affinity, weight: 10, params: {{min_match_tokens: 128}}}}
      - {{type: load, weight: 1}}
    picker: {{type: max_score}}
"""


def policy() -> Policy:
    return parse_policy(POLICY, "affinity-test.yaml")


def ids(n: int, salt: int = 0) -> list[int]:
    return [(i * 7919 + salt) % 150_000 for i in range(n)]


# --- hashing ------------------------------------------------------------------------
def test_sample_positions_are_the_sampled_set_and_bounded() -> None:
    pos = sample_positions(64, 512)
    assert len(pos) == 512 and list(pos) == sorted(pos)
    assert [j for j in range(pos[-1] + 2) if is_sampled(j, 64, 512)] == list(pos)
    assert pos[:64] == tuple(range(64)) and pos[64:66] == (65, 67) and pos[-1] == 64 * 255 - 1


def test_a_256k_prompt_makes_at_most_max_blocks_hashes() -> None:
    ph = prefix_hashes(ids(262_144), SEED, 16, 64, 512)  # 16,384 blocks
    assert len(ph.hashes) == 512 and len(set(ph.hashes)) == 512
    assert ph.tokens_for(512) == 64 * 255 * 16  # covers 261K tokens


@settings(max_examples=40, deadline=None)
@given(common=st.integers(0, 3000), a_tail=st.integers(0, 2000), b_tail=st.integers(1, 2000))
def test_shared_prefix_shares_exactly_its_full_blocks(common: int, a_tail: int, b_tail: int) -> None:
    base = ids(common)
    a = prefix_hashes(base + ids(a_tail, 1), SEED, 16, 64, 512)
    b = prefix_hashes(base + ids(b_tail, 2), SEED, 16, 64, 512)
    shared = sum(1 for p in a.positions if (p + 1) * 16 <= common)
    assert a.hashes[:shared] == b.hashes[:shared]
    n = min(len(a.hashes), len(b.hashes))
    assert all(a.hashes[i] != b.hashes[i] for i in range(shared, n))
    other = prefix_hashes(base, tier_seed("fast", "other-model", 16), 16, 64, 512)
    assert not set(other.hashes) & set(a.hashes)  # seeded per tier and model


def test_engine_block_events_index_to_the_routers_own_hashes() -> None:
    """The simulated engine's BlockStored events (vLLM's shape) rebuild exactly our prompt hashes."""
    prompt = ids(1000)
    idx = InstanceIndexer(SEED, 16, 64, 512, capacity=4096)
    eng = block_hashes(prompt, 16)
    added: list[bytes] = []
    for i in range(0, len(eng), 5):  # blocks arrive a few at a time, as chunked prefill stores them
        chunk = eng[i:i + 5]
        ev = BlockStored(block_hashes=list[int | bytes](chunk), parent_block_hash=eng[i - 1] if i else None,
                         token_ids=prompt[i * 16:(i + len(chunk)) * 16], block_size=16)
        added += idx.apply(ev)[0]
    assert added == prefix_hashes(prompt, SEED, 16, 64, 512).hashes
    removed = idx.apply(BlockRemoved(block_hashes=list[int | bytes](eng[-3:])))[1]
    assert removed == prefix_hashes(prompt, SEED, 16, 64, 512).hashes[-3:]
    orphan = BlockStored(block_hashes=[123], parent_block_hash=999, token_ids=ids(16), block_size=16)
    assert idx.apply(orphan)[0] == [] and idx.orphans == 1
    assert idx.apply(AllBlocksCleared())[2] and not idx.blocks


# --- the Lua index on a real Redis -------------------------------------------------------
async def test_lookup_finds_each_instances_longest_prefix(store: AffinityStore) -> None:
    t = f"t{uuid.uuid4().hex[:8]}"
    long = prefix_hashes(ids(4000), SEED, 16, 64, 512)
    assert await store.record(t, "a", long.hashes[:10], 600, 10_000) == 10
    assert await store.record(t, "b", long.hashes, 600, 10_000) == len(long.hashes)
    other = prefix_hashes(ids(800, 5), SEED, 16, 64, 512)
    assert await store.record(t, "c", other.hashes, 600, 10_000) == len(other.hashes)
    got = await store.lookup([(t, ["a", "b", "c", "d"], long.hashes), (t, ["c"], other.hashes)], 600)
    assert got == {(t, "a"): 10, (t, "b"): len(long.hashes), (t, "c"): len(other.hashes), (t, "d"): 0}
    assert long.tokens_for(10) == 160


async def test_record_trims_to_capacity_evicting_oldest_chains_tail_first(store: AffinityStore) -> None:
    t = f"t{uuid.uuid4().hex[:8]}"
    old = prefix_hashes(ids(1600, 1), SEED, 16, 64, 512)   # 100 blocks -> 64 + 18 samples
    new = prefix_hashes(ids(800, 2), SEED, 16, 64, 512)
    await store.record(t, "a", old.hashes, 600, 100)
    await asyncio.sleep(0.005)  # a later millisecond: Redis TIME orders the two records
    assert await store.record(t, "a", new.hashes, 600, 100) == 100
    assert await store.size(t, "a") == 100
    assert (await store.lookup([(t, ["a"], new.hashes)], 600))[(t, "a")] == len(new.hashes)
    kept_old = (await store.lookup([(t, ["a"], old.hashes)], 600))[(t, "a")]
    assert kept_old == 100 - len(new.hashes)  # the old chain lost its tail, kept its prefix
    ttl_ms = await store.redis.pttl(index_key(t, "a"))
    assert 0 < ttl_ms <= 600_000


async def test_entries_older_than_the_ttl_do_not_match(store: AffinityStore) -> None:
    t = f"t{uuid.uuid4().hex[:8]}"
    ph = prefix_hashes(ids(320), SEED, 16, 64, 512)
    await store.record(t, "a", ph.hashes, 600, 1000)
    await store.record(t, "b", ph.hashes, 0.002, 1000)   # the whole key expires with its TTL
    await asyncio.sleep(0.02)
    assert (await store.lookup([(t, ["a"], ph.hashes)], 0.002))[(t, "a")] == 0   # stale entries don't match
    assert (await store.lookup([(t, ["a", "b"], ph.hashes)], 600)) == {(t, "a"): len(ph.hashes), (t, "b"): 0}
    assert await store.size(t, "b") == 0


# --- guards, table-driven ----------------------------------------------------------------
def cand(iid: str, in_flight: int = 0, cached: int = 0, tier: str = "fast") -> Candidate:
    return Candidate(tier=tier, instance_id=iid, max_model_len=40960, price_input=0.05, price_cached_input=0.01,
                     price_output=0.2, in_flight=in_flight, cached_tokens=cached)


def rreq(prompt: int) -> RoutingRequest:
    return RoutingRequest(request_id="r", tenant="t", virtual_model="chat", route_tiers=("fast",), tenant_tiers=None,
                          prompt_tokens={"fast": prompt}, max_tokens=16, default_completion_tokens=256)


@pytest.mark.parametrize(("params", "prompt", "cands", "want"), [
    ({}, 2000, [cand("a", cached=1000), cand("b")], [0.5, 0.0]),
    # with two instances the shorter match is common: only what goes beyond it counts
    ({"min_match_tokens": 500}, 2000, [cand("a", cached=1000), cand("b", cached=1600)], [0.0, 0.6]),
    ({"min_match_tokens": 700}, 2000, [cand("a", cached=1000), cand("b", cached=1600)], [0.0, 0.0]),
    ({"min_match_ratio": 0.6}, 2000, [cand("a", cached=1600), cand("b")], [0.8, 0.0]),
    ({"min_match_ratio": 0.6}, 2000, [cand("a", cached=1000), cand("b")], [0.0, 0.0]),
    # a hot system prompt held by 3 of 4 instances is common: no affinity at all
    ({}, 3700, [cand("a", cached=3600), cand("b", cached=3600), cand("c", cached=3600), cand("d")], [0.0] * 4),
    # a conversation's history on one instance is affinity; what two instances hold is common
    ({}, 5000, [cand("a", cached=4000), cand("b", cached=1000), cand("c"), cand("d")], [0.75, 0.0, 0.0, 0.0]),
    ({}, 5000, [cand("a", cached=4000), cand("b"), cand("c"), cand("d")], [0.8, 0.0, 0.0, 0.0]),
    ({"common_share": 0.6}, 5000, [cand("a", cached=4000), cand("b", cached=1000), cand("c"), cand("d")],
     [0.8, 0.2, 0.0, 0.0]),
    # shared_weight: a small pull towards any cached prefix, the hot prompt included
    ({"shared_weight": 0.1}, 4000, [cand("a", cached=3600), cand("b", cached=3600), cand("c", cached=3600), cand("d")],
     [0.09, 0.09, 0.09, 0.0]),
    ({"shared_weight": 0.5}, 5000, [cand("a", cached=4000), cand("b", cached=1000), cand("c"), cand("d")],
     [0.775, 0.1, 0.0, 0.0]),
    ({"common_share": 0.3}, 5000, [cand("a", cached=4000), cand("b", cached=1000), cand("c"), cand("d")],
     [0.75, 0.0, 0.0, 0.0]),
    ({}, 1000, [cand("a", cached=5000)], [1.0]),                       # never above the prompt
    ({}, 2000, [cand("a", cached=100)], [0.0]),                        # below the default 256 minimum
    # imbalance needs both thresholds: gap > 32 and max > 1.5 x min
    ({}, 2000, [cand("a", 60, 1000), cand("b", 20)], [0.0, 0.0]),
    ({}, 2000, [cand("a", 50, 1000), cand("b", 20)], [0.5, 0.0]),     # gap 30: balanced enough
    ({"balance_rel_threshold": 3.0}, 2000, [cand("a", 60, 1000), cand("b", 20)], [0.5, 0.0]),
    ({"balance_abs_threshold": 4}, 2000, [cand("a", 9, 1000), cand("b", 4)], [0.0, 0.0]),
    # the guard is per tier: an imbalanced tier does not silence another
    ({}, 2000, [cand("a", 40, 1000), cand("b", 0), cand("c", 0, 1000, "long")], [0.0, 0.0, 0.5]),  # 40 vs 0
])
def test_prefix_affinity_guards(params: dict[str, float], prompt: int, cands: list[Candidate],
                                want: list[float]) -> None:
    req = rreq(prompt)
    req = RoutingRequest(**{**{f: getattr(req, f) for f in req.__struct_fields__},
                            "prompt_tokens": {"fast": prompt, "long": prompt}})
    got = PrefixAffinity(**{"shared_weight": 0.0, **params}).score(req, cands)[0]  # type: ignore[arg-type]
    assert got == pytest.approx(want)


@pytest.mark.parametrize(("c", "loads", "kept"), [
    (1.25, [3, 0, 0, 0, 1], ["a", "b", "c", "d"]),   # default min_bound 4: nobody overloaded yet
    (1.25, [0, 0, 0, 0], ["a", "b", "c", "d"]),
    (1.25, [3, 0, 0, 0], ["b", "c", "d"]),        # bound ceil(1.25 * 4 / 4) = 2: a (3 + 1) is out
    (1.5, [6, 4, 4, 2], ["a", "b", "c", "d"]),     # bound ceil(1.5 * 17 / 4) = 7: a (6 + 1) just fits
    (1.25, [7, 4, 4, 2], ["b", "c", "d"]),         # bound ceil(1.25 * 18 / 4) = 6: a (7 + 1) is out
    (1.0, [5, 5, 5, 5], ["a", "b", "c", "d"]),     # bound 6: everyone fits exactly
    (1.0, [9, 1, 1, 1], ["b", "c", "d"]),          # bound ceil(13 / 4) = 4
])
def test_bounded_load(c: float, loads: list[int], kept: list[str]) -> None:
    if len(loads) == 5:  # the last entry: use the default min_bound
        cands = [cand(n, load) for n, load in zip("abcd", loads[:4], strict=True)]
        assert [x.instance_id for x in BoundedLoad(c).filter(rreq(100), cands)[0]] == kept
        return
    cands = [cand(n, load) for n, load in zip("abcd", loads, strict=True)]
    assert [x.instance_id for x in BoundedLoad(c, min_bound=1).filter(rreq(100), cands)[0]] == kept


def test_invalid_guard_params_are_rejected() -> None:
    for bad in ({"min_match_tokens": -1}, {"min_match_ratio": 2.0}, {"balance_rel_threshold": 0.5},
                {"common_share": 1.0}, {"shared_weight": 1.5}):
        with pytest.raises(ValueError):
            PrefixAffinity(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BoundedLoad(0.9)
    with pytest.raises(ValueError):
        BoundedLoad(1.5, min_bound=0)


# --- through the router, over real sockets -------------------------------------------------
@contextlib.asynccontextmanager
async def sims(n: int, **kw: object) -> AsyncIterator[list[RunningSim]]:
    started = [await start_sim("qwen3-1.7b-fp8", time_scale=0.05, **kw) for _ in range(n)]  # type: ignore[arg-type]
    try:
        yield started
    finally:
        for s in started:
            await s.close()


def conversation(k: int, turns: int) -> list[list[dict[str, str]]]:
    system = {"role": "system", "content": f"You are assistant number {k}. " + "Be precise and brief. " * 60}
    msgs: list[dict[str, str]] = [system]
    out = []
    for t in range(turns):
        msgs = [*msgs, {"role": "user", "content": f"Conversation {k}, question {t}: " + "tell me more. " * 30}]
        out.append(list(msgs))
        msgs = [*msgs, {"role": "assistant", "content": f"Answer {t} for {k}. " * 20}]
    return out


async def test_two_replicas_agree_and_follow_the_cache(redis_url: str) -> None:
    async with sims(3) as started:
        tag = uuid.uuid4().hex[:6]
        urls = {"fast": [InstanceSpec(id=f"i{i}-{tag}", url=s.url) for i, s in enumerate(started)]}
        async with serve_router(policy(), urls, redis_url=redis_url) as a, \
                serve_router(policy(), urls, redis_url=redis_url) as b, \
                httpx.AsyncClient(headers=AUTH, timeout=30) as c:
            for k in range(6):
                turns = conversation(k, 3)
                chosen = []
                cached = []
                for t, msgs in enumerate(turns):
                    base = (a, b)[t % 2]   # alternate replicas turn by turn
                    r = await c.post(base + "/v1/chat/completions",
                                     json={"model": "chat", "max_tokens": 4, "messages": msgs})
                    assert r.status_code == 200, r.text
                    chosen.append(r.headers["x-tiergate-instance"])
                    cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
                    await asyncio.sleep(0.05)  # let the non-blocking record land before the next turn
                assert len(set(chosen)) == 1, chosen       # both replicas sent the conversation to one instance
                assert all(x > 0 for x in cached[1:]), cached  # and the engine really had the prefix


async def ops(c: httpx.AsyncClient) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families((await c.get("/metrics")).text):
        if fam.name == "tiergate_affinity_ops":
            for smp in fam.samples:
                if smp.name.endswith("_total"):
                    out[(smp.labels["op"], smp.labels["result"])] = smp.value
    return out


@pytest.mark.skipif(os.name != "posix", reason="SIGSTOP")
async def test_affinity_fails_open_when_redis_is_paused_or_killed(tmp_path: Path) -> None:
    server = EmbeddedValkey(tmp_path / "v")
    server.start()
    assert server.proc is not None
    try:
        async with sims(2) as started:
            urls = {"fast": [InstanceSpec(id=f"i{i}", url=s.url) for i, s in enumerate(started)]}
            async with serve_router(policy(), urls, redis_url=server.url, affinity_timeout_s=0.05,
                                    redis_timeout_s=0.05, affinity_breaker_failures=2,
                                    affinity_breaker_cooldown_s=0.3) as url, \
                    httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as c:
                msgs = conversation(0, 1)[0]

                async def ask() -> httpx.Response:
                    r = await c.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 2,
                                                                   "messages": msgs})
                    assert r.status_code == 200, r.text
                    return r

                await ask()
                os.kill(server.proc.pid, signal.SIGSTOP)
                try:
                    for _ in range(5):
                        await ask()
                    m = await ops(c)
                    # every lookup during the pause failed fast or was skipped by the open breaker
                    assert m.get(("lookup", "error"), 0) >= 1 and m.get(("lookup", "skipped"), 0) >= 1
                    assert m[("lookup", "error")] + m[("lookup", "skipped")] == 5
                finally:
                    os.kill(server.proc.pid, signal.SIGCONT)
                await asyncio.sleep(0.4)  # past the breaker's cooldown: the half-open trial succeeds
                await ask()
                assert (await ops(c))[("lookup", "ok")] == 2  # before the pause, and after it
                server.stop()
                for _ in range(3):
                    await ask()
    finally:
        server.stop()


async def test_kv_events_over_zmq_build_and_correct_the_index(redis_url: str) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.05, kv_events=(endpoint, "kv-events"))
    r = aioredis.Redis.from_url(redis_url)
    tier = f"t{uuid.uuid4().hex[:8]}"
    st_ = AffinityStore(r, timeout_s=1.0)
    seed = tier_seed(tier, MODEL, 16)
    sub = KVEventSubscriber(endpoint, tier, "sim0", InstanceIndexer(seed, 16, 64, 512, 4096), st_, 600,
                            capacity=lambda: 4096)
    task = asyncio.create_task(sub.run())
    try:
        msgs = conversation(1, 1)[0]
        tok = TierTokenizer(None)
        prompt = tok.encode_sync(tok.render_chat(msgs))
        ph = prefix_hashes(prompt, seed, 16, 64, 512)
        async with httpx.AsyncClient(base_url=sim.url, timeout=30) as c:
            await asyncio.sleep(0.3)  # ZMQ slow joiner: let the subscription reach the publisher
            resp = await c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": msgs})
            assert resp.status_code == 200
            got = 0
            for _ in range(100):  # the events arrive asynchronously
                got = (await st_.lookup([(tier, ["sim0"], ph.hashes)], 600) or {}).get((tier, "sim0"), 0)
                if got == len(ph.hashes):
                    break
                await asyncio.sleep(0.02)
            assert got == len(ph.hashes) and ph.tokens_for(got) == len(prompt) // 16 * 16
            assert (await c.post("/reset_prefix_cache")).status_code == 200
            for _ in range(100):
                got = (await st_.lookup([(tier, ["sim0"], ph.hashes)], 600) or {}).get((tier, "sim0"), 0)
                if got == 0:
                    break
                await asyncio.sleep(0.02)
            assert got == 0  # the engine's BlockRemoved events took the blocks out of the index
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await r.aclose()
        await sim.close()


def test_breaker_opens_half_opens_and_closes_on_an_injected_clock() -> None:
    now = [0.0]
    b = Breaker(failures=2, cooldown_s=5.0, clock=lambda: now[0])
    assert b.allow() and not b.failure() and b.state == "closed"
    assert b.failure() and b.state == "open" and not b.allow()
    now[0] = 5.0
    assert b.state == "half_open" and b.allow() and not b.allow()  # one trial only
    assert b.failure() and b.state == "open" and not b.allow()        # trial failed: re-opened
    now[0] = 10.0
    assert b.allow() and b.success() and b.state == "closed" and b.allow()
