"""Hypothesis stateful test of the budget scripts on a real Redis: whatever the interleaving of
admissions, settlements (repeated), sweeps and clock steps, the sum settled equals the sum billed
in the ledger, and no reservation counter ever goes below zero."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import redis.asyncio as aioredis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from router.budget_store import BudgetStore, Usage, tag

T0 = int(dt.datetime(2026, 11, 22, 23, 58, tzinfo=dt.UTC).timestamp() * 1000)  # crosses midnight


def make_machine(url: str) -> type[RuleBasedStateMachine]:
    class Budget(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.loop = asyncio.new_event_loop()
            self.redis = aioredis.Redis.from_url(url)
            self.now = T0
            self.store = BudgetStore(self.redis, clock_ms=lambda: self.now)
            self.tenant = "sf-" + uuid.uuid4().hex[:8]
            self.ids: list[str] = []
            self.billed: dict[str, int] = {}   # id -> cost of its one successful settlement

        def run(self, coro: object) -> object:
            return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

        @rule(reserve=st.integers(0, 5000), daily=st.one_of(st.none(), st.integers(0, 20000)))
        def admit(self, reserve: int, daily: int | None) -> None:
            rid = f"r{len(self.ids)}"
            self.ids.append(rid)
            self.run(self.store.admit(self.tenant, rid, rpm=None, tpm=None, tokens=10, reserve=reserve,
                                      daily=daily, monthly=None, ttl_s=30))

        @rule(data=st.data(), cost=st.integers(0, 6000))
        def settle(self, data: st.DataObject, cost: int) -> None:
            rid = data.draw(st.sampled_from(self.ids)) if self.ids and data.draw(st.booleans()) else \
                f"orphan{len(self.billed)}-{cost}"
            u = Usage(tier="fast", instance="i", route="r", status=200, prompt=5, cached=0, completion=5,
                      cost=cost, base=cost, nocache=cost, latency_ms=1.0, ttft_ms=None, slo_met=None,
                      at_ms=self.now)
            how = self.run(self.store.settle(self.tenant, rid, u))
            if how != "dup":
                assert rid not in self.billed
                self.billed[rid] = cost

        @rule(ms=st.integers(0, 40_000))
        def tick(self, ms: int) -> None:
            self.now += ms

        @rule()
        def sweep(self) -> None:
            self.run(self.store.sweep(self.tenant))

        @invariant()
        def sums_match_and_nothing_negative(self) -> None:
            if not hasattr(self, "store"):
                return
            raw = self.run(self.redis.hgetall(f"{tag(self.tenant)}:b"))
            vals = {k.decode(): int(v) for k, v in raw.items()}  # type: ignore[union-attr]
            assert all(v >= 0 for k, v in vals.items() if k.startswith("r")), vals
            spent_days = sum(v for k, v in vals.items() if k.startswith("sd:"))
            spent_months = sum(v for k, v in vals.items() if k.startswith("sm:"))
            assert spent_days == spent_months == sum(self.billed.values())
            rows = self.run(self.store.ledger(self.tenant, count=10_000))
            assert sum(int(f["cost"]) for _, f in rows) == sum(self.billed.values())  # type: ignore[union-attr]
            assert len(rows) == len(self.billed)  # type: ignore[arg-type]

        def teardown(self) -> None:
            if hasattr(self, "redis"):
                self.run(self.redis.aclose())
                self.loop.close()

    return Budget


def test_budget_state_machine(redis_url: str) -> None:
    machine = make_machine(redis_url)
    machine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
    machine.TestCase().runTest()
