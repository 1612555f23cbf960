"""vLLM's KV-cache events in every wire form: golden bytes from vLLM's own Struct definitions, the
simulator's publisher byte-for-byte against them, DP endpoints, and the malformed path. ZMQ round trips
into Redis and the indexer are in test_kv_events_zmq.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest
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
from backends.sim.kv_publisher import encode_wire_batch
from router.kv_events import InstanceIndexer, KVEventSubscriber
from router.prefix_hash import tier_seed

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


SEED = tier_seed("fast", MODEL, BS)


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


def test_sim_cli_takes_the_wire_form() -> None:
    import argparse

    from backends.sim.run import add_sim_args

    p = argparse.ArgumentParser()
    add_sim_args(p)
    assert p.parse_args(["--profile", "qwen3-1.7b-fp8"]).kv_events_format == "current"
    assert p.parse_args(["--profile", "x", "--kv-events-format", "legacy"]).kv_events_format == "legacy"
    with pytest.raises(SystemExit):
        p.parse_args(["--profile", "x", "--kv-events-format", "arrays"])
