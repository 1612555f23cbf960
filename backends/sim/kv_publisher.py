"""Publish the simulator's KV-cache events the way vLLM does: ZMQ PUB, msgpack batches.

Events raised during one event-loop turn (one engine step) go out as one
`KVEventBatch` in a multipart message `[topic, seq (8-byte big-endian), payload]`.
Sends never block: like vLLM's publisher, a slow subscriber loses messages (and can
see the gap in `seq`) rather than stalling the engine.
"""

from __future__ import annotations

import asyncio
import json
import time

import zmq

from backends.kv_events import BlockStored, KVEvent, KVEventBatch, encode_batch


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
    def __init__(self, endpoint: str, topic: str = "") -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.topic = topic.encode()
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
        payload = encode_batch(KVEventBatch(ts=time.time(), events=batch))
        try:
            self.sock.send_multipart([self.topic, self.seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
            self.sent_events += len(batch)
        except zmq.Again:
            pass
        self.seq += 1

    def close(self) -> None:
        self.flush()
        self.sock.close(linger=0)
