"""vLLM's KV-cache event wire format (ZMQ PUB, msgpack), shared by the simulator and the router.

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557", "topic": "kv-events"}'`) publishes multipart messages
`[topic, seq (8-byte big-endian), payload]`. The payload is a msgpack array
`[ts, [event, ...], data_parallel_rank?]`; each event is a tagged array whose first
element names its type: BlockStored, BlockRemoved or AllBlocksCleared. Block hashes
are the engine's own (int or bytes); BlockStored carries the blocks' token ids, so a
consumer can recompute its own hashes from them.
"""

from __future__ import annotations

import msgspec

EngineHash = int | bytes


class BlockStored(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class BlockRemoved(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    block_hashes: list[EngineHash]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


encode_batch = msgspec.msgpack.Encoder().encode
decode_batch = msgspec.msgpack.Decoder(KVEventBatch).decode
