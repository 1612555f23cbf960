"""KV events into the affinity index: the indexer's skipped blocks and data-parallel holders, ZMQ round
trips into Redis (vLLM's bytes, one rank and two; the simulator's publisher in every form), and the policy's
`kv_events_dp_ranks` giving one subscriber per instance on every rank's port."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from backends.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, dp_endpoint
from backends.sim.kv_publisher import KVEventPublisher
from router.affinity_store import AffinityStore
from router.kv_events import InstanceIndexer, KVEventSubscriber
from router.prefix_hash import prefix_hashes, tier_seed
from tests.test_kv_events import BS, FORMS, MODEL, publish, sha, toks

# --- the indexer: skipped blocks and data-parallel holders --------------------------
SEED = tier_seed("fast", MODEL, BS)


def stored(hashes: list[int], parent: int | None, tokens: list[int], **kw: Any) -> BlockStored:
    return BlockStored(block_hashes=list[int | bytes](hashes), parent_block_hash=parent, token_ids=tokens,
                       block_size=BS, **kw)


def test_lora_and_extra_key_blocks_are_not_indexed_as_plain_tokens() -> None:
    prompt = toks(4 * BS)
    want = prefix_hashes(prompt, SEED, BS, 64, 512).hashes
    idx = InstanceIndexer(SEED, BS, 64, 512, capacity=4096)
    assert idx.apply(stored([1, 2], None, prompt[:2 * BS], lora_name="a", lora_id=1))[0] == []
    assert idx.apply(stored([1, 2, 3], None, prompt[:3 * BS], extra_keys=[None, ["salt"], None]))[0] == want[:1]
    assert idx.skipped == 4 and idx.blocks == 1


def test_a_block_leaves_the_index_only_when_no_rank_holds_it() -> None:
    prompt = toks(3 * BS)
    want = prefix_hashes(prompt, SEED, BS, 64, 512).hashes
    idx = InstanceIndexer(SEED, BS, 64, 512, capacity=4096)
    assert idx.apply(stored([1, 2, 3], None, prompt), rank=0)[0] == want
    assert idx.apply(stored([1, 2], None, prompt[:2 * BS]), rank=1)[0] == want[:2]
    assert idx.apply(BlockRemoved(block_hashes=[1, 2, 3]), rank=0)[1] == [want[2]]   # rank 1 keeps two
    assert idx.apply(stored([7], None, prompt[:BS], medium="CPU"), rank=1)[0] == want[:1]
    assert idx.apply(AllBlocksCleared(), rank=1) == ([], [want[1], want[0]], False)  # its CPU copy goes too
    assert want[0] not in idx.held and idx.apply(AllBlocksCleared(), rank=0) == ([], [], True)


# --- over ZMQ into Redis -------------------------------------------------------------
def two_free_ports() -> int:
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no two consecutive free ports")


class VllmPublisher:
    """A PUB socket sending `[topic, seq, payload]` as vLLM's ZmqEventPublisher does, for one DP rank."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], base: str, rank: int, form: str = "current") -> None:
        self.sock = ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(dp_endpoint(base, rank))
        self.s = FORMS[form]()
        self.rank = rank
        self.seq = 0

    def send(self, events: list[Any], payload: bytes | None = None) -> None:
        body = publish(self.s, events, rank=self.rank) if payload is None else payload
        self.sock.send_multipart([b"kv-events", self.seq.to_bytes(8, "big"), body])
        self.seq += 1


async def until(cond: Callable[[], Any], poke: Callable[[], None] | None = None) -> None:
    for _ in range(500):
        if cond():
            return
        if poke is not None:
            poke()
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def matched(store: AffinityStore, tier: str, hashes: list[bytes]) -> int:
    return (await store.lookup([(tier, ["i0"], hashes)], 600) or {}).get((tier, "i0"), 0)


async def until_matched(store: AffinityStore, tier: str, hashes: list[bytes], n: int) -> None:
    for _ in range(500):
        if await matched(store, tier, hashes) == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"index never matched {n} blocks")


async def test_current_form_over_zmq_builds_and_corrects_the_index(store: AffinityStore) -> None:
    base = f"tcp://127.0.0.1:{two_free_ports()}"
    tier = f"t{uuid.uuid4().hex[:8]}"
    seed = tier_seed(tier, MODEL, BS)
    kinds: list[str] = []
    sub = KVEventSubscriber(base, tier, "i0", InstanceIndexer(seed, BS, 64, 512, 4096), store, 600,
                            capacity=lambda: 4096, on_event=kinds.append)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = VllmPublisher(ctx, base, 0)
    task = asyncio.create_task(sub.run())
    try:
        await until(lambda: 0 in sub.last_seq, lambda: pub.send([]))   # ZMQ slow joiner: resend until heard
        prompt = toks(70 * BS)
        ph = prefix_hashes(prompt, seed, BS, 64, 512)
        stored_ev = pub.s["stored"]
        pub.send([stored_ev(block_hashes=[sha(i) for i in range(40)], parent_block_hash=None,
                            token_ids=prompt[:40 * BS], block_size=BS, lora_id=None, medium="GPU", lora_name=None,
                            extra_keys=[None] * 40, group_idx=0, kv_cache_spec_kind="full_attention")])
        pub.send([stored_ev(block_hashes=[sha(i) for i in range(40, 70)], parent_block_hash=sha(39),
                            token_ids=prompt[40 * BS:], block_size=BS, lora_id=None, medium="GPU", lora_name=None,
                            extra_keys=[None] * 30, group_idx=0, kv_cache_spec_kind="full_attention")])
        await until_matched(store, tier, ph.hashes, len(ph.hashes))
        pub.send([], payload=b"\x93\xcb")   # truncated: counted, the stream goes on
        pub.send([pub.s["removed"](block_hashes=[sha(i) for i in range(60, 70)], medium="GPU", group_idx=0)])
        await until_matched(store, tier, ph.hashes, 60)
        pub.send([pub.s["cleared"]()])
        await until_matched(store, tier, ph.hashes, 0)
        assert kinds == ["malformed"] and sub.forms == {"current"} and sub.indexer.orphans == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pub.sock.close()
        ctx.term()


async def test_two_data_parallel_ranks_each_on_its_port(store: AffinityStore) -> None:
    base = f"tcp://127.0.0.1:{two_free_ports()}"
    tier = f"t{uuid.uuid4().hex[:8]}"
    seed = tier_seed(tier, MODEL, BS)
    kinds: list[str] = []
    sub = KVEventSubscriber([dp_endpoint(base, 0), dp_endpoint(base, 1)], tier, "i0",
                            InstanceIndexer(seed, BS, 64, 512, 4096), store, 600, capacity=lambda: 4096,
                            on_event=kinds.append)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pubs = [VllmPublisher(ctx, base, 0), VllmPublisher(ctx, base, 1)]
    task = asyncio.create_task(sub.run())
    try:
        for p in pubs:
            await until(lambda p=p: p.rank in sub.last_seq, lambda p=p: p.send([]))
        prompt = toks(8 * BS)
        ph = prefix_hashes(prompt, seed, BS, 64, 512)
        for p, n in ((pubs[0], 8), (pubs[1], 4)):   # rank 1 caches the first half on its own
            p.send([p.s["stored"](block_hashes=[sha(i) for i in range(n)], parent_block_hash=None,
                                  token_ids=prompt[:n * BS], block_size=BS, lora_id=None, medium="GPU",
                                  lora_name=None, extra_keys=[None] * n, group_idx=0)])
        await until_matched(store, tier, ph.hashes, 8)
        pubs[0].send([pubs[0].s["removed"](block_hashes=[sha(i) for i in range(8)], medium="GPU", group_idx=0)])
        await until_matched(store, tier, ph.hashes, 4)   # what rank 1 still holds
        assert kinds == []   # each rank's own sequence numbers: no gap counted
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for p in pubs:
            p.sock.close()
        ctx.term()


async def test_simulator_publisher_round_trip_in_every_form(store: AffinityStore) -> None:
    for form in ("current", "v0.26", "legacy"):
        endpoint = f"tcp://127.0.0.1:{two_free_ports()}"
        tier = f"t{uuid.uuid4().hex[:8]}"
        seed = tier_seed(tier, MODEL, BS)
        sub = KVEventSubscriber(endpoint, tier, "i0", InstanceIndexer(seed, BS, 64, 512, 4096), store, 600,
                                capacity=lambda: 4096)
        pub = KVEventPublisher(endpoint, "kv-events", wire_format=form)
        task = asyncio.create_task(sub.run())
        try:
            await until(lambda: sub.forms, lambda: pub.add(BlockRemoved(block_hashes=[0])))  # noqa: B023
            prompt = toks(5 * BS)
            pub.add(stored([1, 2, 3, 4, 5], None, prompt))
            await until_matched(store, tier, prefix_hashes(prompt, seed, BS, 64, 512).hashes, 5)
            assert sub.forms == {form}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            pub.close()


# --- the policy: one subscriber per instance, on every data-parallel rank's port -----------
POLICY = f"""
version: 1
tiers:
  fast:
    model: {MODEL}
    max_model_len: 40960
    prices: {{input: 0.05, cached_input: 0.01, output: 0.20}}
    instances:
      - {{id: dp, url: "http://10.0.0.5:8000", kv_events: "tcp://10.0.0.5:5557", kv_events_dp_ranks: 3}}
      - {{id: one, url: "http://10.0.0.6:8000", kv_events: "tcp://10.0.0.6:5557"}}
tenants:
  demo: {{key_sha256: [a76e8169f2e4051531cdd24753d163ed3cc01d9208b14606f88055b404f4c13f]}}
routes:
  chat: {{tiers: [fast], profile: p}}
profiles:
  p:
    filters: [{{type: healthy}}]
    scorers: [{{type: load, weight: 1}}]
    picker: {{type: max_score}}
"""


def test_kv_subscribers_listen_on_every_dp_rank(store: AffinityStore) -> None:
    from backends.registry import Registry
    from policies.schema import parse_policy
    from router.kv_events import kv_subscribers
    from router.metrics import RouterMetrics

    policy = parse_policy(POLICY)
    subs = kv_subscribers(policy, Registry(policy), store, RouterMetrics())
    assert {k: s.endpoints for k, s in subs.items()} == {
        ("fast", "dp", "tcp://10.0.0.5:5557 tcp://10.0.0.5:5558 tcp://10.0.0.5:5559"):
            ["tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558", "tcp://10.0.0.5:5559"],
        ("fast", "one", "tcp://10.0.0.6:5557"): ["tcp://10.0.0.6:5557"]}


@pytest.mark.parametrize("edit", ['kv_events: "ipc:///tmp/kv", kv_events_dp_ranks: 3', "kv_events_dp_ranks: 0"])
def test_dp_ranks_need_a_tcp_port(edit: str) -> None:
    from policies.schema import PolicyError, parse_policy

    text = POLICY.replace('kv_events: "tcp://10.0.0.5:5557", kv_events_dp_ranks: 3', edit)
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    assert info.value.path == "$.tiers.fast.instances[0].kv_events_dp_ranks"
