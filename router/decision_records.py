"""The live driver's decision-record sink: the last N records in a bounded Redis stream, looked up by id.

`write` (the core's RecordSink port, router/lifecycle/records.py) only appends to a bounded in-process
queue: nothing on the request path waits for Redis. A background task (`run`) takes up to `BATCH`
records at a time, serializes them (router/explain.py `record_doc`: outcome, estimated next to actual,
the decision's candidates; never the prompt) and sends them in one pipeline of
`XADD tiergate:decisions MAXLEN ~ N * id <request id> r <json>` under `timeout_s`. A batch that fails
or times out is dropped (fail open), counted (`tiergate_decision_records_total{result="failed"}`) and
logged once per streak; a full queue drops new records (`result="dropped"`). After a failure the writer
waits `backoff_s` before the next batch, so a Redis that is down costs one timeout per `backoff_s`.

`lookup(request_id)`: the newest record with that id (a client may reuse an x-request-id), scanned
newest first with XREVRANGE in pages of `PAGE` (each page one short round trip, far from blocking Redis
as a server-side scan of the whole stream would), at most the stream's length. An admin operation:
`GET /admin/decisions/{request_id}` (router/decision_routes.py).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import msgspec

from router.explain import record_doc
from router.lifecycle.records import DecisionRecord
from router.logs import get_logger
from router.metrics import RouterMetrics
from router.redis_pool import RedisClient

__all__ = ["STREAM_KEY", "RedisDecisionRecords"]

STREAM_KEY = "tiergate:decisions"
BATCH = 64
PAGE = 100
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()


class RedisDecisionRecords:
    def __init__(self, store: RedisClient, metrics: RouterMetrics, *, maxlen: int = 10_000,
                 timeout_s: float = 0.25, queue_max: int = 2048, backoff_s: float = 1.0,
                 max_candidates: int = 8, key: str = STREAM_KEY) -> None:
        self.store = store
        self.metrics = metrics
        self.maxlen = maxlen
        self.timeout_s = timeout_s
        self.queue_max = queue_max
        self.backoff_s = backoff_s
        self.max_candidates = max_candidates
        self.key = key
        self.queue: collections.deque[DecisionRecord] = collections.deque()
        self.wake = asyncio.Event()
        self.failing = False
        self.log = get_logger("tiergate.decisions")

    def write(self, record: DecisionRecord) -> None:
        if len(self.queue) >= self.queue_max:
            self.metrics.child(self.metrics.decision_records, "dropped").inc()
            return
        self.queue.append(record)
        self.wake.set()

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                if not await self.write_batch():
                    await asyncio.sleep(self.backoff_s)

    async def write_batch(self) -> bool:
        """Send up to BATCH queued records; -> whether Redis took them."""
        batch = [self.queue.popleft() for _ in range(min(BATCH, len(self.queue)))]
        if not batch:
            return True
        try:
            async with asyncio.timeout(self.timeout_s):
                pipe = self.store.pipeline(transaction=False)
                for rec in batch:
                    body = _enc.encode(record_doc(rec, self.max_candidates))
                    pipe.xadd(self.key, {"id": rec.request_id, "r": body}, maxlen=self.maxlen, approximate=True)
                await pipe.execute()
        except Exception as exc:   # Redis slow or down: fail open
            self.metrics.child(self.metrics.decision_records, "failed").inc(len(batch))
            if not self.failing:
                self.log.warning("decision_records_unavailable", error=type(exc).__name__, dropped=len(batch))
            self.failing = True
            return False
        self.metrics.child(self.metrics.decision_records, "written").inc(len(batch))
        if self.failing:
            self.log.info("decision_records_recovered")
        self.failing = False
        return True

    async def flush(self, timeout_s: float = 2.0) -> None:
        """At shutdown: write what is queued, within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.queue and await self.write_batch():
                    pass
        except TimeoutError:
            pass

    async def lookup(self, request_id: str) -> dict[str, Any] | None:
        """The newest record of `request_id`, or None. Raises what Redis raises (the handler answers 503)."""
        want = request_id.encode()
        top = "+"
        scanned = 0
        while scanned <= self.maxlen + PAGE:
            entries = await self.store.xrevrange(self.key, max=top, min="-", count=PAGE)
            for _, fields in entries:
                rid = fields.get(b"id", fields.get("id"))
                if rid == want or rid == request_id:
                    doc: dict[str, Any] = _dec.decode(fields.get(b"r", fields.get("r")))
                    return doc
            if len(entries) < PAGE:
                return None
            scanned += len(entries)
            last = entries[-1][0]
            top = "(" + (last.decode() if isinstance(last, bytes) else str(last))
        return None
