"""Micro-batched settlement and affinity records (router/redis_batch.py, issue #15) against a real Redis:
concurrent settlements land exactly once in fewer round trips than settlements, a lone one goes out without
waiting for the window, a failed flush journals every item and the replay bills each exactly once, and
`drain` flushes what is queued. No timed asserts: windows are set to an hour where they must not matter."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from backends.valkey import EmbeddedValkey, free_port
from router.accounting import Accountant
from router.affinity_store import AffinityStore, index_key
from router.budget_store import BudgetStore, Usage
from router.journal import Journal
from router.metrics import RouterMetrics
from router.redis_batch import MicroBatcher
from router.redis_pool import make_redis
from tests.test_accounting import policy, wait_for

HOUR = 3600.0


def usage(cost: int) -> Usage:
    return Usage(tier="fast", instance="i0", route="chat", status=200, prompt=100, cached=0, completion=10,
                 cost=cost, base=cost, nocache=cost, latency_ms=5.0, ttft_ms=1.0, slo_met=None,
                 at_ms=int(time.time() * 1000))


def counted(metrics: RouterMetrics, how: str) -> float:
    return float(metrics.child(metrics.settlements, how)._value.get())


async def billed(store: BudgetStore, tenant: str) -> dict[str, int]:
    """request id -> cost, from the tenant's ledger (raises on an id billed twice)."""
    out: dict[str, int] = {}
    for _, rec in await store.ledger(tenant, count=100_000):
        assert rec["id"] not in out, f"{rec['id']} billed twice"
        out[rec["id"]] = int(rec["cost"])
    return out


@contextlib.asynccontextmanager
async def flushing(batch: MicroBatcher[Any]) -> AsyncIterator[None]:
    """The flusher as the app's lifespan runs it."""
    task = asyncio.create_task(batch.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def accountant(url: str, tmp_path: Path, tag: str, timeout_s: float = 5.0
               ) -> tuple[Any, BudgetStore, RouterMetrics, Accountant]:
    """A Redis client, its budget store, metrics, and an accountant over them with a journal in `tmp_path`."""
    client = make_redis(url, 1.0)
    store, metrics = BudgetStore(client), RouterMetrics()
    return client, store, metrics, Accountant(policy(tag), store, Journal(tmp_path / "j"), metrics,
                                              settle_timeout_s=timeout_s)


async def test_concurrent_settlements_land_exactly_once_in_fewer_round_trips(redis_url: str,
                                                                              tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    tenant = f"capped-{tag}"
    client, store, metrics, acct = accountant(redis_url, tmp_path, tag)
    n, opened = 200, 50
    try:
        for i in range(opened):   # these settle an open reservation, the rest are orphans
            await store.admit(tenant, f"r{i}", rpm=None, tpm=None, tokens=110, reserve=10_000, daily=None,
                              monthly=None, ttl_s=600)

        async def request(i: int) -> None:   # a request finishing after a few loop turns of its own
            for _ in range(i % 7):
                await asyncio.sleep(0)
            acct.settle(tenant, f"r{i}", usage(1_000 + i))
            if i % 10 == 0:
                acct.settle(tenant, f"r{i}", usage(1_000 + i))   # settled twice: billed once

        async with flushing(acct.batch):
            await asyncio.gather(*(request(i) for i in range(n)))
            await acct.drain()
        assert await billed(store, tenant) == {f"r{i}": 1_000 + i for i in range(n)}
        assert (await store.status(tenant))["reserved_day"] == 0          # every reservation released
        assert counted(metrics, "open") == opened and counted(metrics, "orphan") == n - opened
        assert counted(metrics, "dup") == n // 10 and counted(metrics, "journaled") == 0
        b = acct.batch
        assert b.items == n + n // 10 and not b.queue and not acct.tasks   # all batched, none unbatched
        assert b.flushes < b.items / 8, (b.flushes, b.items)               # batched: round trips << settles
    finally:
        await client.aclose()


async def test_a_lone_settlement_goes_out_at_once(redis_url: str, tmp_path: Path) -> None:
    """With an hour-long window, a settlement on an idle queue is billed: it waited for no window."""
    tag = uuid.uuid4().hex[:6]
    tenant = f"free-{tag}"
    client, store, _, acct = accountant(redis_url, tmp_path, tag)
    acct.batch.window_s = HOUR
    try:
        async with flushing(acct.batch):
            for k in range(3):
                acct.settle(tenant, f"lone{k}", usage(7))

                async def lone_billed() -> bool:   # billed, and its flush over: the next one comes to an idle queue
                    return f"lone{k}" in await billed(store, tenant) and acct.batch.idle  # noqa: B023
                await wait_for(lone_billed, 10)
        b = acct.batch
        assert (b.flushes, b.items, b.windowed) == (3, 3, 0)
    finally:
        await client.aclose()


async def test_under_load_the_window_collects_until_max_batch() -> None:
    """The batcher's algorithm on a flush the test holds open: items queued while a flush is in flight wait
    for the window (an hour here), which `max_batch` items end early; the next idle item goes out at once."""
    gate = asyncio.Event()
    batches: list[list[int]] = []

    async def flush(items: list[int]) -> None:
        batches.append(items)
        await gate.wait()
    b: MicroBatcher[int] = MicroBatcher("test", flush, window_s=HOUR, max_batch=8)

    async def until(cond: Callable[[], bool]) -> None:
        for _ in range(10_000):
            if cond():
                return
            await asyncio.sleep(0)
        raise AssertionError("not reached")
    async with flushing(b):
        b.put(0)
        await until(lambda: len(batches) == 1)           # idle: out at once, and held open
        for i in range(1, 4):
            assert b.put(i)                               # queued while that flush is in flight
        gate.set()
        await until(lambda: b._full is not None)        # the flusher collects for the window ...
        assert len(batches) == 1 and len(b.queue) == 3
        for i in range(4, 9):
            b.put(i)                                      # ... until max_batch (8) items are queued
        await until(lambda: len(batches) == 2)
        assert batches == [[0], list(range(1, 9))] and (b.flushes, b.windowed) == (2, 1)
        await until(lambda: b._full is None and not b.queue)
        b.put(9)                                          # idle again: out at once
        await until(lambda: len(batches) == 3)
        assert batches[2] == [9] and (b.flushes, b.items, b.windowed) == (3, 10, 1)
    b.max_queue = 2
    assert b.put(10) and b.put(11) and not b.put(12) and b.overflow == 1   # full: refused, the caller decides
    await b.drain()                                       # no flusher running: drain flushes them
    assert batches[3] == [10, 11] and not b.queue


async def test_drain_flushes_what_is_queued_without_a_flusher(redis_url: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    tenant = f"free-{tag}"
    client, store, _, acct = accountant(redis_url, tmp_path, tag)
    try:
        for i in range(150):
            acct.settle(tenant, f"d{i}", usage(i + 1))
        assert len(acct.batch.queue) == 150 and not acct.tasks        # queued, no task per request
        await acct.drain()
        assert await billed(store, tenant) == {f"d{i}": i + 1 for i in range(150)}
        assert (acct.batch.flushes, acct.batch.items) == (3, 150)      # 64 + 64 + 22
    finally:
        await client.aclose()


@pytest.mark.skipif(os.name != "posix", reason="SIGSTOP")
@pytest.mark.parametrize("fault", ["killed", "frozen"])
async def test_a_failed_flush_journals_every_item_and_the_replay_bills_each_once(tmp_path: Path,
                                                                                  fault: str) -> None:
    """killed: the pipeline fails at once, nothing landed. frozen: the flush times out with its commands sent,
    and Redis runs them when it wakes; the journal holds them too, and the replay bills each exactly once."""
    tag = uuid.uuid4().hex[:6]
    tenant = f"capped-{tag}"
    port = free_port()
    valkey = EmbeddedValkey(tmp_path / "v", port=port, appendfsync="always")
    valkey.start()
    assert valkey.proc is not None
    proc, pid = valkey.proc, valkey.proc.pid
    client, store, metrics, acct = accountant(valkey.url, tmp_path, tag, timeout_s=0.5)
    n = 40
    try:
        for i in range(n // 2):
            await store.admit(tenant, f"f{i}", rpm=None, tpm=None, tokens=110, reserve=10_000, daily=None,
                              monthly=None, ttl_s=600)
        if fault == "killed":
            proc.kill()
            proc.wait()
        else:
            os.kill(pid, signal.SIGSTOP)
        for i in range(n):
            acct.settle(tenant, f"f{i}", usage(100 + i))
        await acct.drain()                       # one flush of n: it fails, all n go to the journal
        assert (acct.batch.flushes, acct.batch.items) == (1, n)
        assert counted(metrics, "journaled") == n and acct.journal.pending == n and not acct.store_ok
        if fault == "killed":
            valkey = EmbeddedValkey(tmp_path / "v", port=port, appendfsync="always")
            valkey.start()                       # its append-only file keeps the admissions
        else:
            os.kill(pid, signal.SIGCONT)
        acct.settle(tenant, "late", usage(5))    # records pending: straight to the journal, as before
        await acct.drain()
        assert counted(metrics, "journaled") == n + 1 and acct.batch.flushes == 2
        assert await acct.replay_once() == n + 1 and acct.journal.pending == 0 and acct.store_ok
        want = {f"f{i}": 100 + i for i in range(n)} | {"late": 5}
        assert await billed(store, tenant) == want
        assert (await store.status(tenant))["reserved_day"] == 0
        replayed = sum(counted(metrics, "replayed_" + h) for h in ("open", "orphan", "dup"))
        assert replayed == n + 1
        if fault == "killed":                    # nothing had landed: every record is billed by the replay
            assert counted(metrics, "replayed_dup") == 0
        acct.settle(tenant, "after", usage(3))   # Redis back and the journal empty: batched again
        await acct.drain()
        assert (await billed(store, tenant))["after"] == 3 and counted(metrics, "journaled") == n + 1
    finally:
        if fault == "frozen":
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await client.aclose()
        acct.journal.close()
        valkey.stop()


async def test_a_flushed_script_cache_is_loaded_again(tmp_path: Path) -> None:
    """NOSCRIPT (a restarted Redis, or SCRIPT FLUSH; on a private server here): the batch loads the script
    and sends those calls again."""
    valkey = EmbeddedValkey(tmp_path / "v", appendfsync=None)
    valkey.start()
    client = make_redis(valkey.url, 1.0)
    store = BudgetStore(client)
    try:
        assert await store.settle_many([("t", "x0", usage(1))]) == ["orphan"]
        await client.script_flush()
        assert await store.settle_many([("t", "x0", usage(1)), ("t", "x1", usage(2))]) == ["dup", "orphan"]
        assert await billed(store, "t") == {"x0": 1, "x1": 2}
    finally:
        await client.aclose()
        valkey.stop()


async def test_affinity_records_are_batched_and_fail_open(redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    events: dict[tuple[str, str], int] = {}

    def on_event(op: str, result: str) -> None:
        events[(op, result)] = events.get((op, result), 0) + 1
    aff = AffinityStore(r, timeout_s=2.0, on_event=on_event)
    tier = "t-" + uuid.uuid4().hex[:6]
    dead = AffinityStore(aioredis.Redis(port=free_port()), timeout_s=0.5, on_event=on_event)
    try:
        async with flushing(aff.batch):
            for k in range(100):
                aff.record_later(tier, f"i{k % 4}", [f"{k:08d}".encode()], 60.0, 1000)
            await aff.drain()
        assert [await aff.size(tier, f"i{j}") for j in range(4)] == [25] * 4
        assert events == {("record", "ok"): 100} and aff.batch.items == 100 and aff.batch.flushes <= 2
        for _ in range(5):                       # no Redis there: one failed flush
            dead.record_later(tier, "i0", [b"deadbeef"], 60.0, 1000)
        await dead.drain()
        assert events[("record", "error")] == 5 and dead.breaker.consecutive == 1   # per record; breaker once
    finally:
        await r.delete(*(index_key(tier, f"i{j}") for j in range(4)))
        await r.aclose()
        await dead.redis.aclose()
