"""The replay driver: the lifecycle core (router/lifecycle/core.py) on a virtual clock, against simulated
engines, in one process, with no sockets and no sleeping.

A discrete-event loop over three kinds of event, in time order (ties: engines, then scrapes, then
arrivals; then the order they were made):
  arrival   a trace request: the SLO from its headers (router/slo.py), the route, the core's `start`,
            `gather` (the affinity twin), `decide` (the policy's profile over the registry's candidates),
            `admit` (the real `Accountant` over the budget twin); with `admission.windows`, the prefix claim
            (`Lifecycle.coalesce`, as the live gateway makes it before its gate: a request may wait in the
            queue between decision and dispatch, and a later one must see its prefix claimed meanwhile;
            without windows, lookup, decision and dispatch happen at one instant, so the claim could only
            record what the dispatch records, and is skipped) and the gate; then dispatch to the chosen instance:
            the load counts the forwarder keeps (`dispatched`), the affinity record the forwarder writes
            as it sends, the engine request with the max_tokens the live router would forward;
  engine    the end of an engine's step or decode run (backends/sim/virtual.py): first tokens (the
            stream's first byte: `chosen`, `prefilled`) and finishes (the usage,
            `released`, the core's `close_out`: billing, learning the tier's TTFT/TPOT/prefill rate and
            the route's output length, settling in the budget twin);
  scrape    every `scrape_interval_s`, each instance's running, waiting and KV usage, as /metrics says.
The registry therefore sees what the live router sees: in-flight and pending counts at dispatch, scraped
engine state at the scrape interval, and EWMAs learned from first tokens and usage. Nothing is retried:
simulated engines do not fail. The core's ports are the in-memory twins, whose coroutines never suspend;
`run_sync` drives them to completion without an event loop turning (the loop only hosts the task the
accounting's timeouts need).

Garbage collection: the replay holds millions of long-lived objects (the affinity twin's entries, the
block chains, the engines' caches), which CPython's generational collector would traverse again and
again. While `run` runs, automatic collection is off and `_collect` runs it on a schedule instead: the
young generations every `GC_YOUNG_EVERY` arrivals (their cost follows what was allocated since), a full
collection every `GC_FULL_EVERY` (cycles are rare here: a bounded leak between two). Results are the same.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import random
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from backends.registry import InstanceState
from backends.sim.engine import SimRequest
from backends.sim.profile import SimProfile
from backends.sim.virtual import VirtualEngine
from policies.schema import Policy
from policies.types import Candidate
from router.accounting import Accountant
from router.budget_store import Usage
from router.errors import ApiError
from router.journal import Journal
from router.lifecycle.core import Lifecycle, Pending, chosen, dispatched, prefilled, released
from router.lifecycle.records import MemoryRecordSink
from router.metrics import RouterMetrics
from router.prefix_hash import PrefixHashes
from router.relay import Outcome
from router.replay.affinity_twin import MemoryAffinityStore
from router.replay.blocks import BlockChains
from router.replay.budget_twin import MemoryBudgetStore
from router.replay.cluster import build
from router.replay.gating import ReplayGate
from router.replay.results import Results
from router.replay.sync import run_sync
from router.replay.trace import TraceRequest
from router.schemas import Usage as ApiUsage
from router.slo import resolve_slo

T = TypeVar("T")
EPOCH_MS = 1_767_571_200_000   # 2026-01-05T00:00:00Z: the replay's wall clock starts here (budget periods)
ENGINE, SCRAPE, ARRIVAL, GATE = 0, 1, 2, 3
_NO_RNG = random.Random(0)    # replayed requests draw no token ids (and nobody waits on their event)
_NO_EVENT = asyncio.Event()
GC_YOUNG_EVERY = 4096      # arrivals between collections of the young generations (automatic GC is off)
GC_FULL_EVERY = 1 << 18    # arrivals between full collections


class ReplayAccountant(Accountant):
    """The live accountant over the budget twin, settling at once (live: a task after the response)."""

    def settle(self, tenant: str, rid: str, usage: Usage) -> None:
        run_sync(self._settle(tenant, rid, usage))


@dataclass(eq=False)
class _Flight:
    p: Pending
    out: Outcome
    cand: Candidate
    inst: InstanceState
    prefill: int
    stream: bool
    tier: str


class Replay:
    def __init__(self, policy: Policy, sizes: dict[str, tuple[SimProfile, int]], *, scrape_interval_s: float = 1.0,
                 max_attempts: int = 3, progress: Callable[[int, float], None] | None = None,
                 decision_records: int = 1000) -> None:
        """`decision_records`: the last N decision records kept in `self.records` (as the live driver keeps
        them in Redis), looked up by request id; 0 keeps none."""
        self.now = 0.0
        self.records = MemoryRecordSink(decision_records) if decision_records > 0 else None
        self.aff = MemoryAffinityStore(self.wall_ms)
        self.budget = MemoryBudgetStore(clock_ms=self.wall_ms, keep_s=600.0, ledger_maxlen=0)
        self.view, self.registry, engines = build(policy, sizes, lambda: self.now, self.aff)
        pol = self.view.policy
        self._tmp = tempfile.TemporaryDirectory(prefix="tiergate-replay-")
        self.accountant = ReplayAccountant(pol, self.budget, Journal(Path(self._tmp.name)), RouterMetrics(),
                                           clock=lambda: self.wall_ms() / 1000)
        self.core = Lifecycle(self.registry, accountant=self.accountant, max_attempts=max_attempts,
                              clock=lambda: self.now, wall_ms=self.wall_ms, new_id=self._new_id,
                              records=self.records)
        self.chains = BlockChains()
        self.scrape_interval_s = scrape_interval_s
        self.progress = progress
        self.results = Results()
        self.flights: dict[SimRequest, _Flight] = {}
        self.engines: dict[str, VirtualEngine] = {}
        self.insts: dict[str, InstanceState] = {}
        self.wakes: dict[str, float | None] = {}
        for key, eng in engines.items():
            self.engines[key] = VirtualEngine(eng, self._first_token, self._finish)
            tier, _, iid = key.partition("/")
            self.insts[key] = self.registry.instance(tier, iid)
            self.wakes[key] = None
        self.heap: list[tuple[float, int, int, str]] = []
        self.seq = 0
        self.ids = 0
        self.bs = {t: s.block_size for t, s in pol.tiers.items()}
        self.gate = ReplayGate(pol, self.core, self.wall_ms, lambda t, key: self._push(t, GATE, key),
                               self._dispatch, self.results.refuse) if pol.admission.windows else None
        for tier, spec in pol.tiers.items():
            if spec.gpu_cost_per_hour:
                self.results.gpu[tier] = (sizes[tier][1], spec.gpu_cost_per_hour)

    def wall_ms(self) -> int:
        return EPOCH_MS + int(self.now * 1000)

    def _new_id(self) -> str:
        self.ids += 1
        return f"a{self.ids}"

    # --- the loop ---------------------------------------------------------------------------
    def run(self, trace: Iterable[TraceRequest]) -> Results:
        was = gc.isenabled()
        gc.disable()              # see the module doc: `_collect` collects on a schedule instead
        try:
            return asyncio.run(self.arun(trace))
        finally:
            if was:
                gc.enable()

    @staticmethod
    def _collect(serial: int) -> None:
        if gc.isenabled():
            return                # automatic collection is on (`arun` called directly)
        if serial % GC_FULL_EVERY == 0:
            gc.collect()
        elif serial % GC_YOUNG_EVERY == 0:
            gc.collect(1)

    async def arun(self, trace: Iterable[TraceRequest]) -> Results:
        """The replay, in the running loop's task (synchronously: it never awaits)."""
        try:
            return self._main(trace)
        finally:
            self.accountant.journal.close()
            self._tmp.cleanup()

    def _main(self, trace: Iterable[TraceRequest]) -> Results:
        it = iter(trace)
        pending: list[TraceRequest] = []
        nxt = next(it, None)
        if nxt is not None:
            self._push(nxt.t, ARRIVAL, "")
            pending.append(nxt)
        self._push(0.0, SCRAPE, "")
        serial = 0
        while self.heap:
            t, kind, _, key = heapq.heappop(self.heap)
            if kind == ENGINE:
                if self.wakes.get(key) != t:
                    continue      # superseded: the engine's step end moved
                self.now = t
                ve = self.engines[key]
                ve.wake(t)
                self._rewake(key)
            elif kind == GATE:
                self.now = t
                assert self.gate is not None
                self.gate.on_event(key, t)
            elif kind == SCRAPE:
                self.now = t
                self._scrape(t)
                if pending or any(w is not None for w in self.wakes.values()) or (self.gate and self.gate.tickets):
                    self._push(t + self.scrape_interval_s, SCRAPE, "")
            else:
                r = pending.pop()
                self.now = t
                self._arrive(r, serial, t)
                serial += 1
                if serial % GC_YOUNG_EVERY == 0:
                    self._collect(serial)
                if self.progress is not None and serial % 1024 == 0:
                    self.progress(serial, t)
                nxt = next(it, None)
                if nxt is not None:
                    if nxt.t < t:
                        raise ValueError(f"trace request {serial}: arrival {nxt.t} before {t}")
                    self._push(nxt.t, ARRIVAL, "")
                    pending.append(nxt)
        self._finish_results(serial)
        return self.results

    def _push(self, t: float, kind: int, key: str) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, key))

    def _rewake(self, key: str) -> None:
        w = self.engines[key].wake_at
        if w != self.wakes[key]:
            self.wakes[key] = w
            if w is not None:
                self._push(w, ENGINE, key)

    def _scrape(self, t: float) -> None:
        for key, ve in self.engines.items():
            inst = self.insts[key]
            running, waiting, kv = ve.signals(t)
            inst.running, inst.waiting, inst.kv_usage = float(running), float(waiting), kv
            inst.scraped_at = t
            self._rewake(key)

    def _finish_results(self, n: int) -> None:
        res = self.results
        res.requests = n
        res.makespan_s = self.now
        for key, ve in self.engines.items():
            tier = key.partition("/")[0]
            res.busy_s[tier] = res.busy_s.get(tier, 0.0) + ve.busy_s
            res.gpu_busy_s[tier] = res.gpu_busy_s.get(tier, 0.0) + ve.engine.stats.gpu_busy_s
        if self.gate is not None:
            res.queue, res.queue_wait = dict(self.gate.outcomes), self.gate.waited
        for tenant, sums in self.budget.all_aggregates().items():
            res.tenants_units[tenant] = sum(v for k, v in sums.items() if k.endswith("|cost"))
            res.tenants_gpu_us[tenant] = sum(v for k, v in sums.items() if k.endswith("|gpu_us"))
        if self.progress is not None:
            self.progress(n, self.now)

    # --- one request ------------------------------------------------------------------------
    def _arrive(self, r: TraceRequest, serial: int, t: float) -> None:
        v, core = self.view, self.core
        if r.tenant not in v.policy.tenants:    # live: no key of this policy names it
            self.results.refuse(401, "invalid_api_key")
            return
        try:
            slo = resolve_slo(v.policy, r.tenant, r.headers())
            route, tiers, tenant_tiers = core.route(v, r.tenant, r.model)
            counts = {tier: r.prompt for tier in tiers}
            p = core.start(v, r.id or f"r{serial}", r.tenant, route, tiers, tenant_tiers, counts, r.max_tokens,
                           slo, t)
            blocks = {bs: self.chains.blocks(r, max(1, r.output), bs, serial)
                      for bs in sorted({self.bs[x] for x in tiers})}
            hashes: dict[str, PrefixHashes] = {}
            sampled: dict[tuple[int, int, int], PrefixHashes] = {}   # tiers that sample alike share one
            for x in tiers:
                if v.affinity.enabled(x):
                    spec = v.affinity.specs[x]
                    k = (self.bs[x], spec.dense_blocks, spec.max_blocks)
                    ph = sampled.get(k)
                    if ph is None:
                        ph = sampled[k] = blocks[k[0]].prefix_hashes(k[1], k[2])
                    hashes[x] = ph
            run_sync(core.gather(p, hashes))
            core.decide(p)
            cap, _ = run_sync(core.admit(p, r.max_tokens))
        except ApiError as exc:
            self.results.refuse(exc.status, exc.code)
            return
        ctx = (r, serial, cap, blocks, hashes)
        if self.gate is not None:
            run_sync(core.coalesce(p))     # the live gateway claims before its gate (module doc)
        if self.gate is None or self.gate.enter(p, ctx, t):
            self._dispatch(p, ctx)

    def _dispatch(self, p: Pending, ctx: Any) -> None:
        """Send a decided, admitted request to its instance, as the forwarder does (the gate may have held
        it: `ctx` is what `_arrive` knew of it)."""
        r, serial, cap, blocks, hashes = ctx
        v, core, t = self.view, self.core, self.now
        assert p.decision is not None
        cand = next((c for c in p.decision.ranked[: core.max_attempts]
                     if self.registry.find(c.tier, c.instance_id) is not None), None)
        if cand is None:
            self.results.refuse(503, "upstream_unavailable")
            return
        key = f"{cand.tier}/{cand.instance_id}"
        ve = self.engines[key]
        room = v.policy.tiers[cand.tier].max_model_len - r.prompt
        max_tokens = r.max_tokens if r.max_tokens is not None else (None if cap is None else max(1, min(cap, room)))
        engine_room = ve.engine.profile.max_model_len - r.prompt
        limit = engine_room if max_tokens is None else min(max_tokens, engine_room)
        if limit < 1:
            self.results.refuse(400, "context_length_exceeded")
            return
        natural = max(1, r.output)
        target, capped = (limit, True) if natural >= limit else (natural, False)
        p.wall_ms = core.wall_ms()
        inst = self.insts[key]
        out = Outcome(attempts=1)
        prefill = max(0, r.prompt - cand.cached_tokens)
        dispatched(inst, prefill)
        self.view.affinity.record(cand.tier, cand.instance_id, hashes)   # as the forwarder does as it sends
        sim = SimRequest(request_id=p.rid, prompt_ids=range(r.prompt), target_len=target,  # type: ignore[arg-type]
                         length_capped=capped, token_ids=False, rng=_NO_RNG, event=_NO_EVENT)
        self.flights[sim] = _Flight(p, out, cand, inst, prefill, r.stream, cand.tier)
        bs = ve.engine.profile.block_size
        b = blocks.get(bs) or self.chains.blocks(r, max(1, r.output), bs, serial)
        ve.add(sim, b.ints[: (r.prompt + target) // bs], t)
        self._rewake(key)

    def _answered(self, f: _Flight, t: float) -> None:
        """The stream's first content (else the whole answer): what the forwarder does as it hands over."""
        chosen(f.out, f.cand, 200, t)
        prefilled(f.inst, f.prefill)

    def _first_token(self, sim: SimRequest, t: float) -> None:
        f = self.flights[sim]
        if f.stream:
            self.now = t
            self._answered(f, t)
            f.out.first_token_at = t

    def _finish(self, sim: SimRequest, t: float) -> None:
        f = self.flights.pop(sim)
        self.now = t
        if not f.stream:
            self._answered(f, t)
        f.out.usage = ApiUsage(prompt_tokens=len(sim.prompt_ids), completion_tokens=sim.n_output,
                               prompt_tokens_details={"cached_tokens": max(sim.cached_tokens, 0)})
        f.out.gpu_s = sim.gpu_s        # the engine's exact share of its steps (backends/sim/gpu_time.py)
        self.registry.record_success(f.inst)
        released(f.inst)
        u = self.core.close_out(f.p, f.out)
        rq = f.p.rreq
        first = f.out.first_token_at if f.out.first_token_at is not None else f.out.first_byte_at
        tpot = None
        if f.stream and first is not None and sim.n_output > 1:
            tpot = (t - first) / (sim.n_output - 1)
        self.results.serve(u, rq.slo_class or "none", rq.ttft_target_s, rq.tpot_target_s,
                           None if first is None else first - f.p.t0, tpot, f.p.tenant)
