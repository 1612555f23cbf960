"""vLLM's KV-cache event wire format (ZMQ PUB, msgpack), read in every form vLLM has sent.

vLLM (`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq",
"endpoint": "tcp://*:5557", "topic": "kv-events"}'`) publishes multipart messages
`[topic, seq (8-byte big-endian), payload]`; the payload is one msgspec-encoded batch of
BlockStored, BlockRemoved and AllBlocksCleared events. Its msgpack shape has changed:

* **legacy** (before vLLM PR #42892): `EventBatch` and `KVCacheEvent` are
  `array_like=True`, so the batch is `[ts, [event, ...], data_parallel_rank]` and an event is
  a positional array whose first element is its tag: `["BlockStored", block_hashes,
  parent_block_hash, token_ids, block_size, lora_id, medium, lora_name, extra_keys, ...]`,
  every field written, nil included (msgspec omits no defaults in arrays). The first
  release stopped at lora_id and had no data_parallel_rank (vllm-project/vllm
  vllm/distributed/kv_events.py @ b4e69e0af33f4698e157a262cc787fe61983cd3d); later fields
  were appended, and #42892 only dropped `array_like` (llm-d/llm-d-kv-cache#661).
* **v0.26** (vLLM 0.26.x, the first release with #42892): the batch is still a positional
  array, but every event is a map tagged by its `"type"` key (as captured from vLLM v0.26.0
  in volcano-sh/kthena#1535: `[ts, [{"type": "BlockStored", "block_hashes": [...], ...}], 0]`).
* **current** (vllm-project/vllm vllm/distributed/kv_events.py @
  0181ea3173e53eea8cf04a86891488e3dc89bb34): neither struct is `array_like`, so the batch is
  a map `{"ts", "events", "data_parallel_rank"}` of tagged maps. `tag=True` makes the tag
  field `"type"` and its value the class name. BlockStored's `lora_id`, `medium` and
  `lora_name` have no default and are always sent (often nil); `extra_keys` (one entry per
  block, nil for plain text), `group_idx`, `kv_cache_spec_kind` and
  `kv_cache_spec_sliding_window` are omitted when None (`omit_defaults=True`).
  `ZmqEventPublisher.publish` fills `data_parallel_rank`, so it is always present.

One set of Structs reads them all: the map Structs below are the decoded result, and
`array_like` subclasses of them (same fields, same order, same tags) read the positional
forms, so every decoded event is a `BlockStored`, `BlockRemoved` or `AllBlocksCleared` and
consumers need not know which form arrived. Fields a consumer does not use are not
declared after `kv_cache_spec_sliding_window`: unknown map keys and extra trailing array
elements are skipped by msgspec, so a newer vLLM that adds fields still decodes.
"""

from __future__ import annotations

from typing import Any

import msgspec

EngineHash = int | bytes   # vLLM's ExternalBlockHash: bytes (sha256 hashing) or int (older builds)

class BlockStored(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None     # per block: None for plain text, else MM / LoRA / cache_salt keys
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    block_hashes: list[EngineHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True, gc=False):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, omit_defaults=True, gc=False):
    """One decoded batch, whatever form it came in."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


# The positional forms: the same Structs, read from arrays.
class _ArrayBlockStored(BlockStored, array_like=True, tag="BlockStored"):
    pass


class _ArrayBlockRemoved(BlockRemoved, array_like=True, tag="BlockRemoved"):
    pass


class _ArrayAllBlocksCleared(AllBlocksCleared, array_like=True, tag="AllBlocksCleared"):
    pass


class _ArrayBatchOfMaps(KVEventBatch, array_like=True):   # v0.26
    pass


class _ArrayBatchOfArrays(KVEventBatch, array_like=True):  # legacy
    events: list[_ArrayBlockStored | _ArrayBlockRemoved | _ArrayAllBlocksCleared]  # type: ignore[assignment]


FORMS = ("current", "v0.26", "legacy")


def _is_map(first: int) -> bool:
    return 0x80 <= first <= 0x8F or first in (0xDE, 0xDF)


class BatchDecoder:
    """Decode a payload in any of vLLM's forms; `form` is the form of the last batch decoded.

    A map payload is the current form. An array payload holds maps (v0.26) or arrays
    (legacy); which one is tried first is the one that decoded last, so the steady state is
    one decode call, and a wrong guess fails at the first event's first byte.
    msgspec.DecodeError (or its subclass ValidationError) means the payload is none of them.
    """

    def __init__(self) -> None:
        self._current = msgspec.msgpack.Decoder(KVEventBatch)
        self._arrays: list[tuple[str, msgspec.msgpack.Decoder[KVEventBatch]]] = [
            ("v0.26", msgspec.msgpack.Decoder(_ArrayBatchOfMaps)),
            ("legacy", msgspec.msgpack.Decoder(_ArrayBatchOfArrays)),
        ]
        self.form: str | None = None

    def decode(self, payload: bytes) -> KVEventBatch:
        if not payload:
            raise msgspec.DecodeError("empty payload")
        if _is_map(payload[0]):
            batch = self._current.decode(payload)
            self.form = "current"
            return batch
        try:
            batch = self._arrays[0][1].decode(payload)
        except msgspec.ValidationError as first_error:
            try:
                batch = self._arrays[1][1].decode(payload)
            except msgspec.ValidationError:
                raise first_error from None
            self._arrays.reverse()
        self.form = self._arrays[0][0]
        return batch


decode_batch = BatchDecoder().decode


def frame_shape(payload: bytes, depth: int = 4, items: int = 3) -> str:
    """The msgpack type tree of a payload, for logs: types, lengths, small ints and identifier-like map
    keys (field names), never string, bytes or other values. Containers show their first `items` entries."""
    try:
        obj = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError:
        return f"not msgpack ({len(payload)} bytes, first byte 0x{payload[:1].hex() or '--'})"
    return _shape(obj, depth, items)


def _shape(obj: Any, depth: int, items: int) -> str:
    if obj is None or isinstance(obj, bool):
        return repr(obj).lower() if obj is not None else "nil"
    if isinstance(obj, int):
        return str(obj) if -256 < obj < 256 else "int"
    if isinstance(obj, float):
        return "float"
    if isinstance(obj, str):
        return f"str[{len(obj)}]"
    if isinstance(obj, bytes | bytearray | memoryview):
        return f"bin[{len(obj)}]"
    if isinstance(obj, list | tuple):
        if depth <= 0 or not obj:
            return f"array[{len(obj)}]"
        inner = ", ".join(_shape(x, depth - 1, items) for x in obj[:items])
        return f"array[{len(obj)}]({inner}{', …' if len(obj) > items else ''})"
    if isinstance(obj, dict):
        if depth <= 0 or not obj:
            return f"map[{len(obj)}]"
        parts = [f"{_key(k)}: {_shape(v, depth - 1, items)}" for k, v in list(obj.items())[:items * 4]]
        return f"map[{len(obj)}]{{{', '.join(parts)}{', …' if len(obj) > items * 4 else ''}}}"
    return type(obj).__name__


def _key(k: Any) -> str:
    if isinstance(k, str) and len(k) <= 40 and k.isidentifier() and k.isascii():
        return k
    return _shape(k, 0, 0)


def dp_endpoint(endpoint: str, rank: int) -> str:
    """The endpoint data-parallel rank `rank` publishes on: vLLM's ZmqEventPublisher.offset_endpoint_port
    (vllm/distributed/kv_events.py @ 0181ea3173e53eea8cf04a86891488e3dc89bb34) adds the rank to a tcp port
    and appends `_dp<rank>` to an inproc name; rank 0 keeps the endpoint, and any other scheme is refused.
    Each DP engine core creates its publisher with its rank (vllm/v1/core/sched/scheduler.py @
    00024d314514900f361ad072af6931e403b7f589: `EventPublisherFactory.create(..., data_parallel_index)`)."""
    if rank == 0:
        return endpoint
    if "inproc" in endpoint:
        return f"{endpoint}_dp{rank}"
    if "tcp" in endpoint and ":" in endpoint:
        base, _, port = endpoint.rpartition(":")
        return f"{base}:{int(port) + rank}"
    raise ValueError(f"vLLM offsets only tcp and inproc KV-event endpoints by DP rank, not {endpoint!r}")
