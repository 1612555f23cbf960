"""The router's stores on a real Redis Cluster and through Sentinel (tests/redis_servers.py starts them).

* Admission stays exact when many tenants' scripts run on several shards at once, and a settlement flush
  (one pipeline of EVALSHAs whose keys hash to many slots, router/redis_batch.py) is split by node and
  reloads its script on every node that lost it (NOSCRIPT).
* A master is killed (SIGKILL) while 32 admit/settle loops of 8 tenants run: its replica takes over, the
  crashed node is started again and rejoins as the new master's replica. Budgets stay exact: nothing is
  admitted past a budget, and every settled request is in the ledger exactly once, with its cost. The
  store WAITs for a replica after each admission and settlement (`wait_replicas=1`): one the replica did
  not confirm is refused (admission) or journaled and replayed (settlement). Without it, writes the dead
  master had answered but not yet replicated are lost: seen here with a replica still in its first sync
  (79 settled requests missing from one tenant's ledger); with replicas in sync on loopback the window is
  microseconds (3 runs without WAIT lost none). Affinity fails open: lookups answer no match and count
  errors; nothing raises.
* The stores work through `redis+sentinel://` (1 master, 1 replica, 2 sentinels).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from redis.crc import key_slot

from policies.schema import parse_policy
from router.accounting import Accountant
from router.affinity_store import AffinityStore, Breaker, index_key
from router.budget_store import BudgetStore, Usage, tag
from router.errors import ApiError
from router.journal import Journal
from router.metrics import RouterMetrics
from router.redis_pool import close_redis, make_redis
from tests.redis_servers import cli, private_cluster, private_sentinel
from tests.test_accounting import policy_text


def usage(cost: int, tier: str = "fast") -> Usage:
    return Usage(tier=tier, instance="i0", route="auto", status=200, prompt=100, cached=0, completion=10,
                 cost=cost, base=cost, nocache=cost, latency_ms=1.0, ttft_ms=1.0, slo_met=True,
                 at_ms=int(time.time() * 1000))


async def test_cluster_admission_exact_and_pipelined_settlement_reloads_scripts_on_every_node(
        cluster_url: str) -> None:
    r = make_redis(cluster_url, 2.0)
    try:
        store = BudgetStore(r)
        tenants = [f"t-{uuid.uuid4().hex[:8]}" for _ in range(12)]
        assert len({key_slot(tag(t).encode()) for t in tenants}) == 12
        res = await asyncio.gather(*(store.admit(t, f"r{i}", rpm=None, tpm=None, tokens=1, reserve=1000,
                                                 daily=7_500, monthly=None, ttl_s=60)
                                     for t in tenants for i in range(24)))
        asked = [(t, f"r{i}") for t in tenants for i in range(24)]
        admitted = [ti for ti, a in zip(asked, res, strict=True) if a.ok]
        assert Counter(t for t, _ in admitted) == {t: 7 for t in tenants}   # no overshoot on any shard
        await r.script_flush()                                        # every primary forgets the scripts
        items = [(t, rid, usage(900)) for t, rid in admitted]
        random.Random(3).shuffle(items)
        assert await store.settle_many(items) == ["open"] * len(items)   # NOSCRIPT on each node: loaded, sent again
        assert await store.settle_many(items[:5]) == ["dup"] * 5
        for t in tenants:
            st = await store.status(t)
            assert (st["spent_day"], st["reserved_day"]) == (6300, 0)
            assert len(await store.ledger(t)) == 7
        aff = AffinityStore(r, timeout_s=2.0)                         # one lookup, tiers on several slots
        tiers = [f"tier-{uuid.uuid4().hex[:6]}" for _ in range(6)]
        hs = [bytes([i]) * 8 for i in range(1, 6)]
        for k, t in enumerate(tiers):
            assert await aff.record(t, "a", hs[:k], 60.0, 100) == k
        found = await aff.lookup([(t, ["a", "b"], hs) for t in tiers], 60.0)
        assert found == {**{(t, "a"): k for k, t in enumerate(tiers)}, **{(t, "b"): 0 for t in tiers}}
        await r.delete(*(index_key(t, "a") for t in tiers))
    finally:
        await close_redis(r)


async def test_a_master_killed_under_load_keeps_budgets_exact_and_affinity_fails_open(tmp_path: Path) -> None:
    tag_ = uuid.uuid4().hex[:6]
    names = [f"s{k}" for k in range(8)]
    # half the tenants run out of budget as the failover happens, half never do (settlements all along)
    limits_usd = {n: 0.0004 if k % 2 else 1.0 for k, n in enumerate(names)}
    pol = parse_policy(policy_text(tag_, [], {n: f", budgets: {{daily_usd: {limits_usd[n]}}}, on_store_failure: reject"
                                              for n in names}), "cluster-failover.yaml")
    tenants = [f"{n}-{tag_}" for n in names]
    limit = {f"{n}-{tag_}": round(usd * 10**10) for n, usd in limits_usd.items()}
    with private_cluster(tmp_path / "cluster") as cluster:
        r = make_redis(cluster.url, 0.2)
        events: Counter[tuple[str, str]] = Counter()
        aff = AffinityStore(r, timeout_s=0.05, breaker=Breaker(failures=1000),
                            on_event=lambda op, res: events.update([(op, res)]))
        # WAIT for the replica after each admission and settlement: a write the master answered but had
        # not yet sent to its replica when it died is taken as failed (refused, or journaled and replayed)
        acct = Accountant(pol, BudgetStore(r, wait_replicas=1, wait_timeout_ms=100), Journal(tmp_path / "journal"),
                          RouterMetrics(), timeout_s=0.2, settle_timeout_s=0.5)
        settled: dict[str, dict[str, int]] = {t: {} for t in tenants}
        refused: Counter[str] = Counter()
        lookups: list[Any] = []
        stop = asyncio.Event()

        async def loop(k: int) -> None:
            rng = random.Random(k)
            n = 0
            while not stop.is_set():
                t = tenants[k % len(tenants)]
                rid = f"{k}-{n}"
                n += 1
                try:
                    await acct.admit(t, rid, 10, 10_000, pol)
                except ApiError as exc:
                    refused[exc.code or str(exc.status)] += 1
                    await asyncio.sleep(0.01)
                    continue
                await asyncio.sleep(rng.random() * 0.01)
                cost = rng.randint(1, 10_000)
                settled[t][rid] = cost
                acct.settle(t, rid, usage(cost))

        async def affinity_loop(k: int) -> None:
            hs = [bytes([k, i]) * 4 for i in range(8)]
            while not stop.is_set():
                tiers = [f"aff{j}-{tag_}" for j in range(6)]
                for t in tiers:
                    aff.record_later(t, "a", hs, 60.0, 1000)
                lookups.append(await aff.lookup([(t, ["a", "b"], hs) for t in tiers], 60.0))
                await asyncio.sleep(0.005)

        flusher = asyncio.create_task(acct.batch.run())
        aff_flusher = asyncio.create_task(aff.batch.run())
        bg = asyncio.create_task(acct.background(replay_interval_s=0.2))
        workers = [asyncio.create_task(loop(k)) for k in range(32)]
        workers += [asyncio.create_task(affinity_loop(k)) for k in range(2)]
        try:
            await asyncio.sleep(1.5)
            victim = cluster.owner(key_slot(tag(tenants[1]).encode()))   # a master that holds budgets
            before = len(lookups)
            cluster.servers.kill(victim)                       # a crash: its replica takes over
            deadline = time.monotonic() + 20
            while victim in cluster.masters() or not cluster.ok():
                assert time.monotonic() < deadline, "no failover"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)    # traffic on the new master, which has no replica: nothing is confirmed
            cluster.servers.restart(victim)                    # the crashed node rejoins, as its replica
            while "master_link_status:up" not in cli(victim, "INFO", "replication"):
                assert time.monotonic() < deadline + 20, "the old master did not rejoin as a replica"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*workers)
        finally:
            stop.set()
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await acct.drain()
            bg.cancel()
            await asyncio.gather(bg, return_exceptions=True)
            for _ in range(50):
                if await acct.replay_once() or acct.journal.pending == 0:
                    if acct.journal.pending == 0:
                        break
                await asyncio.sleep(0.1)
            await aff.drain()
            for task in (flusher, aff_flusher):
                task.cancel()
            await asyncio.gather(flusher, aff_flusher, return_exceptions=True)
            acct.journal.close()
        try:
            assert acct.journal.pending == 0
            check = BudgetStore(r)
            total = 0
            for t in tenants:
                rows = await check.ledger(t, 100_000)
                ids = Counter(f["id"] for _, f in rows)
                assert ids == Counter(settled[t].keys()), t           # each settled request exactly once
                assert {f["id"]: int(f["cost"]) for _, f in rows} == settled[t]
                st = await check.status(t)
                assert st["spent_day"] == sum(settled[t].values())  # 0 tokens lost or doubled
                assert st["spent_day"] <= limit[t]                   # 0 overshoot
                total += len(rows)
            assert total > 300 and refused["insufficient_quota"] > 0   # budgets ran out during the run
            during = lookups[before:]
            assert None in during                                     # the failover: no match, fail open
            assert events[("lookup", "error")] > 0 and events[("lookup", "ok")] > 0
            assert any(isinstance(x, dict) and any(x.values()) for x in lookups[-20:])   # the index works again
            print(f"settled={total} refused={dict(refused)} journaled="
                  f"{acct.metrics.settlements.labels('journaled')._value.get():.0f} "
                  f"lookups_during={len(during)} no_match={during.count(None)} affinity={dict(events)}")
        finally:
            await close_redis(r)


async def test_stores_work_through_sentinel(tmp_path: Path) -> None:
    with private_sentinel(tmp_path / "sentinel") as group:
        r = make_redis(group.url, 1.0)
        try:
            store = BudgetStore(r)
            t = f"t-{uuid.uuid4().hex[:8]}"
            a = await store.admit(t, "a", rpm=None, tpm=None, tokens=1, reserve=600, daily=1000, monthly=None,
                                  ttl_s=60)
            assert a.ok and a.left_units == 400
            assert not (await store.admit(t, "b", rpm=None, tpm=None, tokens=1, reserve=600, daily=1000,
                                          monthly=None, ttl_s=60)).ok
            assert await store.settle_many([(t, "a", usage(250))]) == ["open"]
            assert (await store.status(t))["spent_day"] == 250
            aff = AffinityStore(r, timeout_s=1.0)
            assert await aff.record("fast", "i0", [b"x" * 8], 60.0, 10) == 1
            assert await aff.record("slow", "i1", [b"x" * 8, b"y" * 8], 60.0, 10) == 2
            hs = [b"x" * 8, b"y" * 8]               # one node: both tiers in one script
            assert await aff.lookup([("fast", ["i0", "i1"], hs), ("slow", ["i1"], hs)], 60.0) == {
                ("fast", "i0"): 1, ("fast", "i1"): 0, ("slow", "i1"): 2}
            info = await r.info("replication")
            assert info["role"] == "master" and int(info["connected_slaves"]) == 1
        finally:
            await close_redis(r)
