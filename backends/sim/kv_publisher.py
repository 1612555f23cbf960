"""Publish the simulator's KV-cache events the way vLLM does: ZMQ PUB, msgpack batches.

Events raised during one event-loop turn (one engine step) go out as one batch in a
multipart message `[topic, seq (8-byte big-endian), payload]`. Sends never block: like
vLLM's publisher, a slow subscriber loses messages (and can see the gap in `seq`) rather
than stalling the engine.

The payload takes one of vLLM's three wire forms (see backends/kv_events.py):
`current` (the default: map batch of tagged-map events, vLLM after 0.26), `v0.26` (array
batch of tagged-map events) or `legacy` (array batch of tagged arrays). The wire Structs
below mirror vLLM's own (vllm-project/vllm vllm/distributed/kv_events.py @
0181ea3173e53eea8cf04a86891488e3dc89bb34): BlockStored always carries `lora_id`, `medium`
and `lora_name`, and the GPU block pool fills `medium="GPU"`, one `extra_keys` entry per
block (nil for plain text), `group_idx` and `kv_cache_spec_kind`, as a vLLM v0.26.0 stream
shows (volcano-sh/kthena#1535). The legacy form sends the same Structs positionally
(PR #42892 only dropped `array_like`); an array_like Struct writes every field, nil included.
`data_parallel_rank` is always set, as `ZmqEventPublisher.publish` sets it, and a rank > 0
binds the endpoint offset by its rank, as vLLM's data-parallel engine cores do.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgspec
import zmq

from backends.kv_events import BlockRemoved, BlockStored, KVEvent, dp_endpoint

WIRE_FORMATS = ("current", "v0.26", "legacy")


class _Stored(msgspec.Struct, tag="BlockStored", omit_defaults=True, gc=False):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class _Removed(msgspec.Struct, tag="BlockRemoved", omit_defaults=True, gc=False):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class _Cleared(msgspec.Struct, tag="AllBlocksCleared", omit_defaults=True, gc=False):
    pass


class _Batch(msgspec.Struct, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class _ArrayStored(_Stored, array_like=True, tag="BlockStored"):
    pass


class _ArrayRemoved(_Removed, array_like=True, tag="BlockRemoved"):
    pass


class _ArrayCleared(_Cleared, array_like=True, tag="AllBlocksCleared"):
    pass


class _ArrayBatch(_Batch, array_like=True):
    pass


def wire_event(event: KVEvent, wire_format: str) -> msgspec.Struct:
    """One event as vLLM's GPU block pool would send it in `wire_format`."""
    legacy = wire_format == "legacy"
    if isinstance(event, BlockStored):
        return (_ArrayStored if legacy else _Stored)(
            event.block_hashes, event.parent_block_hash, event.token_ids, event.block_size, lora_id=None,
            medium="GPU", lora_name=None, extra_keys=[None] * len(event.block_hashes), group_idx=0,
            kv_cache_spec_kind="full_attention")
    if isinstance(event, BlockRemoved):
        return (_ArrayRemoved if legacy else _Removed)(event.block_hashes, medium="GPU", group_idx=0)
    return _ArrayCleared() if legacy else _Cleared()


def encode_wire_batch(events: list[KVEvent], wire_format: str = "current", *, ts: float | None = None,
                      data_parallel_rank: int = 0) -> bytes:
    if wire_format not in WIRE_FORMATS:
        raise ValueError(f"unknown KV-event format {wire_format!r}; one of {', '.join(WIRE_FORMATS)}")
    batch_type = _Batch if wire_format == "current" else _ArrayBatch
    batch = batch_type(ts=time.time() if ts is None else ts, events=[wire_event(e, wire_format) for e in events],
                       data_parallel_rank=data_parallel_rank)
    return msgspec.msgpack.encode(batch)


def parse_kv_events_config(raw: str | None) -> tuple[str, str] | None:
    """vLLM's `--kv-events-config` JSON -> (endpoint, topic), or None when disabled."""
    if not raw:
        return None
    cfg = json.loads(raw)
    if not cfg.get("enable_kv_cache_events", False):
        return None
    if cfg.get("publisher", "zmq") != "zmq":
        raise ValueError("only the zmq KV-event publisher is simulated")
    return str(cfg.get("endpoint", "tcp://*:5557")), str(cfg.get("topic", ""))


class KVEventPublisher:
    def __init__(self, endpoint: str, topic: str = "", wire_format: str = "current",
                 data_parallel_rank: int = 0) -> None:
        if wire_format not in WIRE_FORMATS:
            raise ValueError(f"unknown KV-event format {wire_format!r}; one of {', '.join(WIRE_FORMATS)}")
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = dp_endpoint(endpoint, data_parallel_rank)
        self.sock.bind(self.endpoint)
        self.topic = topic.encode()
        self.wire_format = wire_format
        self.data_parallel_rank = data_parallel_rank
        self.seq = 0
        self.sent_events = 0
        self._buf: list[KVEvent] = []
        self._scheduled = False

    def add(self, event: KVEvent) -> None:
        last = self._buf[-1] if self._buf else None
        if (isinstance(event, BlockStored) and isinstance(last, BlockStored) and event.parent_block_hash is not None
                and last.block_hashes and event.parent_block_hash == last.block_hashes[-1]
                and event.block_size == last.block_size):
            # one request's consecutive blocks in one event, as vLLM sends them
            last.block_hashes.extend(event.block_hashes)
            last.token_ids.extend(event.token_ids)
        else:
            self._buf.append(event)
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (unit use): send at once
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        batch, self._buf = self._buf, []
        payload = encode_wire_batch(batch, self.wire_format, data_parallel_rank=self.data_parallel_rank)
        try:
            self.sock.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
            self.sent_events += len(batch)
        except zmq.Again:
            pass
        self.seq += 1

    def close(self) -> None:
        self.flush()
        self.sock.close(linger=0)
