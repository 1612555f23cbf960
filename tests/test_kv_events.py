"""vLLM's KV-cache events in every wire form: golden bytes from vLLM's own Struct definitions, the
simulator's publisher byte-for-byte against them, a ZMQ round trip into Redis (one rank and two
data-parallel ranks), and the malformed path."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
import zmq
from structlog.testing import capture_logs

from backends.kv_events import (
    AllBlocksCleared,
    BatchDecoder,
    BlockRemoved,
    BlockStored,
    KVEvent,
    dp_endpoint,
    frame_shape,
)
from backends.sim.kv_publisher import KVEventPublisher, encode_wire_batch
from router.affinity_store import AffinityStore
from router.kv_events import InstanceIndexer, KVEventSubscriber
from router.prefix_hash import prefix_hashes, tier_seed

MODEL = "Qwen/Qwen3-1.7B-FP8"
BS = 16
TS = 1789095808.8378847


def vllm_structs(*, batch_array: bool, event_array: bool) -> dict[str, Any]:
    """vLLM's KV-event Structs, field for field, with the array_like flags of one wire form.

    Fields as in vllm-project/vllm vllm/distributed/kv_events.py @ 0181ea3173e53eea8cf04a86891488e3dc89bb34
    (current: neither flag). vLLM 0.26 kept `array_like=True` on EventBatch only (captured v0.26.0 stream,
    volcano-sh/kthena#1535); before PR #42892 both were array_like. The tag is `tag=True`: key "type", value
    the class name, so the classes carry vLLM's names."""

    class EventBatch(msgspec.Struct, array_like=batch_array, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    class KVCacheEvent(msgspec.Struct, array_like=event_array, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[bytes | int]
        parent_block_hash: bytes | int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[tuple[Any, ...] | None] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[bytes | int]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(EventBatch):
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]

    return {"batch": KVEventBatch, "stored": BlockStored, "removed": BlockRemoved, "cleared": AllBlocksCleared}


def vllm_0_9_structs() -> dict[str, Any]:
    """The first published form (vllm-project/vllm vllm/distributed/kv_events.py @
    b4e69e0af33f4698e157a262cc787fe61983cd3d): int hashes, lora_id only, no data_parallel_rank."""

    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]

    class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[int]

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(EventBatch):
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]

    return {"batch": KVEventBatch, "stored": BlockStored, "removed": BlockRemoved, "cleared": AllBlocksCleared}


FORMS: dict[str, Callable[[], dict[str, Any]]] = {
    "current": lambda: vllm_structs(batch_array=False, event_array=False),
    "v0.26": lambda: vllm_structs(batch_array=True, event_array=False),
    "legacy": lambda: vllm_structs(batch_array=True, event_array=True),
}


def toks(n: int, salt: int = 0) -> list[int]:
    return [(i * 7919 + salt) % 150_000 for i in range(n)]


def sha(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8   # 32 bytes, as vLLM's sha256 block hashes


def gpu_pool_events(s: dict[str, Any]) -> list[Any]:
    """What vLLM's GPU block pool publishes: a stored run with its parent, a root run, a LoRA run,
    a removal and a reset (fields filled as the v0.26.0 capture shows)."""
    stored, removed = s["stored"], s["removed"]
    return [
        stored(block_hashes=[sha(1), sha(2)], parent_block_hash=None, token_ids=toks(2 * BS), block_size=BS,
               lora_id=None, medium="GPU", lora_name=None, extra_keys=[None, None], group_idx=0,
               kv_cache_spec_kind="full_attention"),
        stored(block_hashes=[sha(3)], parent_block_hash=sha(2), token_ids=toks(BS, 5), block_size=BS,
               lora_id=None, medium="GPU", lora_name=None, extra_keys=[None], group_idx=0,
               kv_cache_spec_kind="full_attention"),
        stored(block_hashes=[2**64 - 1], parent_block_hash=None, token_ids=toks(BS, 9), block_size=BS,
               lora_id=3, medium="GPU", lora_name="adapter", extra_keys=[("adapter",)]),
        removed(block_hashes=[sha(3), 2**64 - 1], medium="GPU", group_idx=0),
        s["cleared"](),
    ]


def as_ours(vllm_event: Any) -> KVEvent:
    kind = {"BlockStored": BlockStored, "BlockRemoved": BlockRemoved, "AllBlocksCleared": AllBlocksCleared}
    fields = msgspec.structs.asdict(vllm_event)
    if fields.get("extra_keys") is not None:   # msgpack has no tuples: they come back as lists
        fields["extra_keys"] = [list(k) if k is not None else None for k in fields["extra_keys"]]
    return kind[type(vllm_event).__name__](**fields)


def publish(s: dict[str, Any], events: list[Any], rank: int | None = 0) -> bytes:
    """Encode as ZmqEventPublisher does: publish() sets the rank, the thread msgpack-encodes the batch."""
    batch = s["batch"](ts=TS, events=events)
    if rank is not None:
        batch.data_parallel_rank = rank
    return msgspec.msgpack.Encoder().encode(batch)


def same(got: list[KVEvent], want: list[KVEvent]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, type(w))
        assert msgspec.structs.asdict(g) == msgspec.structs.asdict(w)


# --- golden bytes ------------------------------------------------------------------
@pytest.mark.parametrize("form", list(FORMS))
def test_every_wire_form_decodes_to_the_same_events(form: str) -> None:
    s = FORMS[form]()
    events = gpu_pool_events(s)
    payload = publish(s, events, rank=2)
    dec = BatchDecoder()
    batch = dec.decode(payload)
    assert dec.form == form
    assert batch.ts == TS and batch.data_parallel_rank == 2
    same(batch.events, [as_ours(e) for e in events])


@pytest.mark.parametrize("form", list(FORMS))
def test_the_wire_forms_are_what_vllm_encodes(form: str) -> None:
    """The shape of each form, read off vLLM's bytes: map or array batch, map or array events."""
    s = FORMS[form]()
    payload = publish(s, [s["removed"](block_hashes=[7], medium="GPU")])
    top = msgspec.msgpack.decode(payload)
    if form == "current":
        assert list(top) == ["ts", "events", "data_parallel_rank"] and payload[:4] == b"\x83\xa2ts"
        event = top["events"][0]
    else:
        assert isinstance(top, list) and len(top) == 3 and payload[0] == 0x93
        event = top[1][0]
    if form == "legacy":
        assert event == ["BlockRemoved", [7], "GPU", None]   # array_like writes defaults too
    else:
        assert event == {"type": "BlockRemoved", "block_hashes": [7], "medium": "GPU"}


def test_vllm_0_9_first_form_decodes() -> None:
    s = vllm_0_9_structs()
    events = [s["stored"](block_hashes=[11, 12], parent_block_hash=None, token_ids=toks(2 * BS), block_size=BS,
                          lora_id=None),
              s["removed"](block_hashes=[12]), s["cleared"]()]
    dec = BatchDecoder()
    batch = dec.decode(publish(s, events, rank=None))
    assert dec.form == "legacy" and batch.data_parallel_rank is None
    same(batch.events, [as_ours(e) for e in events])


def test_the_captured_v0_26_stream_decodes() -> None:
    """vLLM v0.26.0's own batch as reported in volcano-sh/kthena#1535 (keys in vLLM's field order)."""
    captured = [1789095808.8378847, [{
        "type": "BlockStored", "block_hashes": [15760518052499183552], "parent_block_hash": None,
        "token_ids": [151644, 872, 198, 9064, 374, 279, 6722, 315, 5616, 30, 151645, 198, 151644, 77091, 198, 151667],
        "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None, "extra_keys": [None],
        "group_idx": 0, "kv_cache_spec_kind": "full_attention"}], 0]
    dec = BatchDecoder()
    batch = dec.decode(msgspec.msgpack.encode(captured))
    assert dec.form == "v0.26" and batch.data_parallel_rank == 0
    (ev,) = batch.events
    assert isinstance(ev, BlockStored) and ev.block_hashes == [15760518052499183552]
    assert ev.token_ids == captured[1][0]["token_ids"] and ev.group_idx == 0 and ev.extra_keys == [None]  # type: ignore[index]


def test_fields_a_newer_vllm_adds_are_skipped() -> None:
    dec = BatchDecoder()
    current = {"ts": 1.0, "events": [{"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU",
                                      "locality": "LOCAL", "ownership": None}], "data_parallel_rank": 0, "epoch": 3}
    assert isinstance(dec.decode(msgspec.msgpack.encode(current)).events[0], BlockRemoved)
    legacy = [1.0, [["BlockRemoved", [1], "GPU", 0, "LOCAL"]], 0, "later"]
    got = dec.decode(msgspec.msgpack.encode(legacy)).events[0]
    assert isinstance(got, BlockRemoved) and got.group_idx == 0 and dec.form == "legacy"


@pytest.mark.parametrize("form", list(FORMS))
def test_the_simulator_sends_vllms_bytes(form: str) -> None:
    """The simulator's publisher encodes exactly what vLLM's Structs encode for the same GPU-pool events."""
    s = FORMS[form]()
    ours: list[KVEvent] = [BlockStored(block_hashes=[5, 6], parent_block_hash=4, token_ids=toks(2 * BS),
                                       block_size=BS), BlockRemoved(block_hashes=[5]), AllBlocksCleared()]
    theirs = [s["stored"](block_hashes=[5, 6], parent_block_hash=4, token_ids=toks(2 * BS), block_size=BS,
                          lora_id=None, medium="GPU", lora_name=None, extra_keys=[None, None], group_idx=0,
                          kv_cache_spec_kind="full_attention"),
              s["removed"](block_hashes=[5], medium="GPU", group_idx=0), s["cleared"]()]
    assert encode_wire_batch(ours, form, ts=TS, data_parallel_rank=1) == publish(s, theirs, rank=1)


def test_dp_endpoints_follow_vllms_port_offset() -> None:
    assert dp_endpoint("tcp://10.0.0.5:5557", 0) == "tcp://10.0.0.5:5557"
    assert dp_endpoint("tcp://10.0.0.5:5557", 3) == "tcp://10.0.0.5:5560"
    assert dp_endpoint("tcp://*:5557", 1) == "tcp://*:5558"
    assert dp_endpoint("inproc://cache", 1) == "inproc://cache_dp1"
    with pytest.raises(ValueError, match="tcp and inproc"):
        dp_endpoint("ipc:///tmp/kv", 1)


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


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[AffinityStore]:
    r = aioredis.Redis.from_url(redis_url)
    try:
        yield AffinityStore(r, timeout_s=1.0)
    finally:
        await r.aclose()


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


# --- malformed payloads ------------------------------------------------------------------
def test_malformed_is_counted_and_logged_once_per_run_with_its_shape_only() -> None:
    kinds: list[str] = []
    sub = KVEventSubscriber("tcp://127.0.0.1:1", "fast", "i0", InstanceIndexer(SEED, BS, 64, 512, 4096),
                            store=None, ttl_s=600, capacity=lambda: 4096, on_event=kinds.append)  # type: ignore[arg-type]
    secret = "sk-live-do-not-log"
    bad = msgspec.msgpack.encode({"ts": "x", "events": [{"type": "BlockStored", "prompt": secret,
                                                         "token_ids": list(range(1000, 1020))}]})
    good = encode_wire_batch([BlockRemoved(block_hashes=[1])])
    with capture_logs() as logs:
        sub.ingest([b"kv", (0).to_bytes(8, "big"), bad])
        sub.ingest([b"kv", (1).to_bytes(8, "big"), b"\xc1garbage"])
        sub.ingest([b"kv", (2).to_bytes(8, "big"), good])
        sub.ingest([b"kv", (3).to_bytes(8, "big"), bad])
    warned = [e for e in logs if e["event"] == "kv_events_malformed"]
    assert kinds == ["malformed", "malformed", "malformed"] and sub.malformed == 3
    assert len(warned) == 2   # once for the first run, again after a good batch ended it
    shape = warned[0]["shape"]
    assert shape.startswith("map[2]{ts: str[1], events: array[1](map[3]{type: str[11], prompt: str[18], "
                            "token_ids: array[20](int, int, int, …)})")
    assert secret not in str(logs) and "BlockStored" not in str(logs) and "1000" not in str(logs)


def test_frame_shape_of_non_msgpack_names_only_length_and_first_byte() -> None:
    assert frame_shape(b"\xc1secret") == "not msgpack (7 bytes, first byte 0xc1)"
    assert frame_shape(msgspec.msgpack.encode([1.5, [b"\x00" * 9, None, True, -3, 2**40]])) == \
        "array[2](float, array[5](bin[9], nil, true, …))"
    assert frame_shape(msgspec.msgpack.encode({"k": [-3, 2**40, 255]})) == "map[1]{k: array[3](-3, int, 255)}"


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
    from router.app import kv_subscribers
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


def test_sim_cli_takes_the_wire_form() -> None:
    import argparse

    from backends.sim.run import add_sim_args

    p = argparse.ArgumentParser()
    add_sim_args(p)
    assert p.parse_args(["--profile", "qwen3-1.7b-fp8"]).kv_events_format == "current"
    assert p.parse_args(["--profile", "x", "--kv-events-format", "legacy"]).kv_events_format == "legacy"
    with pytest.raises(SystemExit):
        p.parse_args(["--profile", "x", "--kv-events-format", "arrays"])
