"""A frozen Redis must not leave reservations behind: admissions that timed out for refused requests
are released (or their ids blocked) once Redis answers again, not after the reservation TTL."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from backends.valkey import EmbeddedValkey
from router.accounting import Accountant
from router.budget_store import BudgetStore
from router.errors import ApiError
from router.journal import Journal
from router.metrics import RouterMetrics
from router.redis_pool import make_redis
from tests.test_accounting import policy, wait_for


@pytest.mark.skipif(os.name != "posix", reason="SIGSTOP")
async def test_a_frozen_redis_leaves_no_phantom_reservations(tmp_path: Path) -> None:
    """Admissions sent to a SIGSTOPped Redis time out (the router refuses them: on_store_failure reject),
    and Redis runs the scripts when it wakes. They must not stay reserved until their 900 s TTL."""
    tag = uuid.uuid4().hex[:6]
    pol = policy(tag)
    tenant = f"strict-{tag}"
    valkey = EmbeddedValkey(tmp_path / "v", appendfsync=None)
    valkey.start()
    assert valkey.proc is not None
    hot = make_redis(valkey.url, 0.05)                 # the router's hot-path client
    store = BudgetStore(hot)
    check = BudgetStore(aioredis.Redis.from_url(valkey.url))
    acct = Accountant(pol, store, Journal(tmp_path / "journal"), RouterMetrics(), timeout_s=0.1)
    try:
        # warm the pool: each frozen admission below goes out on an open connection, as under load
        await store.admit(tenant, "warm", rpm=None, tpm=None, tokens=1, reserve=1, daily=None, monthly=None,
                          ttl_s=1)                       # loads the script, as any earlier request has
        await store.release(tenant, "warm")
        for _ in range(20):
            await asyncio.gather(*(hot.ping() for _ in range(16)), return_exceptions=True)
            if len(hot.connection_pool._available_connections) >= 16:  # type: ignore[attr-defined]
                break
        assert len(hot.connection_pool._available_connections) >= 16  # type: ignore[attr-defined]
        os.kill(valkey.proc.pid, signal.SIGSTOP)
        try:
            rs = await asyncio.gather(*(acct.admit(tenant, f"r{i}", 100, 1_000, pol) for i in range(16)),
                                      return_exceptions=True)
        finally:
            os.kill(valkey.proc.pid, signal.SIGCONT)
        assert all(isinstance(r, ApiError) and r.code == "accounting_unavailable" for r in rs)

        async def nothing_reserved() -> bool:
            st = await check.status(tenant)
            return bool(st["reserved_day"] == 0 and st["reserved_month"] == 0)
        await acct.drain()                               # the background loop would retry the same way
        await wait_for(nothing_reserved, 10)             # well before the 900 s TTL
        assert await check.redis.zcard(f"{{tg:{tenant}}}:open") == 0
        assert not acct.unknown
        ok = await acct.admit(tenant, "after", 100, 1_000, pol)   # Redis is back: admission works again
        assert ok.granted is None and (await check.status(tenant))["reserved_day"] == 1_000
    finally:
        await hot.aclose()
        await check.redis.aclose()
        valkey.stop()


async def test_release_blocks_an_admission_that_arrives_late(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = BudgetStore(client)
    tenant = "late-" + uuid.uuid4().hex[:6]
    try:
        assert await store.release(tenant, "r1") == "blocked"        # the script has not run yet
        late = await store.admit(tenant, "r1", rpm=None, tpm=None, tokens=10, reserve=500, daily=10_000,
                                 monthly=None, ttl_s=900)
        assert late.kind == "dup"                                     # a late run reserves nothing
        ok = await store.admit(tenant, "r2", rpm=None, tpm=None, tokens=10, reserve=500, daily=10_000,
                               monthly=None, ttl_s=900)
        assert ok.ok and (await store.status(tenant))["reserved_day"] == 500
        assert await store.release(tenant, "r2") == "released"
        assert await store.release(tenant, "r2") == "released"       # idempotent by id
        assert (await store.status(tenant))["reserved_day"] == 0
    finally:
        await client.aclose()


async def test_a_timeout_on_a_healthy_store_is_asked_again_not_refused(tmp_path: Path, redis_url: str) -> None:
    """The short admission timeout expires (here: at once) while Redis answers: the event loop, busy with
    other requests, outlasted it. A `reject` tenant's request must be admitted on the second ask, reserved
    exactly once, with no 503."""
    tag = uuid.uuid4().hex[:6]
    pol = policy(tag)
    tenant = f"strict-{tag}"
    client = make_redis(redis_url, 2.0)
    store = BudgetStore(client)
    metrics = RouterMetrics()
    acct = Accountant(pol, store, Journal(tmp_path / "journal"), metrics, timeout_s=1e-9, settle_timeout_s=2.0)
    try:
        got = await asyncio.gather(*(acct.admit(tenant, f"r{i}", 100, 1_000, pol) for i in range(8)))
        assert all(g.granted is None for g in got)
        st = await store.status(tenant)
        assert st["reserved_day"] == 8 * 1_000                        # each reserved once, none twice
        assert metrics.child(metrics.admission_retries, "ok")._value.get() == 8   # type: ignore[attr-defined]
    finally:
        await acct.drain()
        await client.aclose()
