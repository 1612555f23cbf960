"""`tiergate replay`: the virtual-time engine, block hashes without token ids, workloads, the driver on the
decision core, the CLI, and a trace recorded by a live router replayed."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.kv_events import BlockRemoved
from backends.sim.engine import Engine, SimRequest
from backends.sim.kvcache import KVCache, block_hashes
from backends.sim.profile import get_profile
from backends.sim.run import running_sim
from backends.sim.virtual import VirtualEngine
from policies import registry as plugin_registry
from policies.schema import InstanceSpec, load_policy, parse_policy
from policies.types import Candidate, RoutingRequest
from router.replay.blocks import BlockChains
from router.replay.cluster import shape
from router.replay.driver import Replay
from router.replay.synth import KINDS, synth
from router.replay.trace import Prefix, TraceRequest, read_trace, write_trace
from tests.conftest import DEMO_KEY, ROOT, serve_router

DEMO = ROOT / "policies" / "examples" / "demo.yaml"


# --- the engine on virtual time ---------------------------------------------------------------
def _workload(seed: int, n: int) -> list[tuple[float, list[int], int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1000, 90000) for _ in range(3000)]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(40.0)
        ids = shared[: rng.choice([0, 0, 512, 2000])] + [rng.randrange(1000, 90000)
                                                         for _ in range(rng.choice([50, 300, 1200, 5000]))]
        out.append((t, ids, rng.choice([1, 5, 40, 200, 700])))
    return out


def _sim(i: int, ids: list[int], out: int, bs: int) -> tuple[SimRequest, list[int]]:
    r = SimRequest(request_id=str(i), prompt_ids=ids, target_len=out, length_capped=True, token_ids=False)
    return r, block_hashes(ids + [7000 + (i * 131 + j) % 5000 for j in range(out)], bs)


def _plain(engine: Engine, vt: list[float], wl: list[tuple[float, list[int], int]]) -> list[SimRequest]:
    """The engine's own loop (Engine._run) on virtual time: schedule, sleep the step, commit."""
    bs, reqs, i = engine.profile.block_size, [], 0
    batch: list[tuple[SimRequest, int]] | None = None
    end = 0.0
    while i < len(wl) or engine.running or engine.waiting or batch is not None:
        if batch is None:
            if not engine.running and not engine.waiting:   # idle: wait for the next arrival
                vt[0] = wl[i][0]
                r, h = _sim(i, wl[i][1], wl[i][2], bs)
                engine.add(r, h)
                reqs.append(r)
                i += 1
            batch = engine.schedule()
            end = vt[0] + (engine.step_time(batch) if batch else engine.profile.step_overhead_s)
        while i < len(wl) and wl[i][0] < end:
            vt[0] = wl[i][0]
            r, h = _sim(i, wl[i][1], wl[i][2], bs)
            engine.add(r, h)
            reqs.append(r)
            i += 1
        vt[0] = end
        engine.stats.steps += 1
        engine.commit(batch)
        batch = None
        if engine.running or engine.waiting:
            batch = engine.schedule()
            end = vt[0] + (engine.step_time(batch) if batch else engine.profile.step_overhead_s)
    return reqs


@pytest.mark.parametrize(("profile", "blocks"), [("qwen3-1.7b-fp8", 100_000), ("qwen3-1.7b-fp8", 2000),
                                                 ("qwen3-4b-256k", 1500)])
def test_virtual_engine_matches_the_plain_step_loop(profile: str, blocks: int) -> None:
    """Decode groups, jumps and their splits give every request the same first token, finish, cache hit and
    preemptions as stepping one step at a time (small KV: preemptions and exact steps happen)."""
    prof = get_profile(profile)
    wl = _workload(1, 300)
    vt = [0.0]
    plain_engine = Engine(prof, num_gpu_blocks=blocks, clock=lambda: vt[0], keep_latencies=False)
    plain = _plain(plain_engine, vt, wl)
    events: list[tuple[str, str, float]] = []
    ve = VirtualEngine(Engine(prof, num_gpu_blocks=blocks), lambda r, t: events.append(("first", r.request_id, t)),
                       lambda r, t: events.append(("finish", r.request_id, t)))
    virtual = []
    for i, (t, ids, out) in enumerate(wl):
        while ve.wake_at is not None and ve.wake_at <= t:
            ve.wake(ve.wake_at)
        if i % 7 == 0:
            ve.signals(t)          # a scrape splits a jump without changing anything
        r, h = _sim(i, ids, out, prof.block_size)
        ve.add(r, h, t)
        virtual.append(r)
    while ve.wake_at is not None:
        ve.wake(ve.wake_at)

    def facts(r: SimRequest) -> tuple[Any, ...]:
        return r.first_token_at, r.finished_at, r.cached_tokens, r.n_output, r.preemptions, r.finish_reason

    assert [facts(r) for r in virtual] == [facts(r) for r in plain]
    assert ve.engine.stats.steps == plain_engine.stats.steps
    assert ve.engine.stats.generation_tokens == plain_engine.stats.generation_tokens == sum(o for _, _, o in wl)
    assert sorted(e[1] for e in events if e[0] == "finish") == sorted(r.request_id for r in plain)
    if blocks < 10_000:
        assert plain_engine.stats.preemptions > 0
    assert ve.engine.kv.num_free == ve.engine.kv.num_blocks   # every block given back


def test_a_blocked_request_is_not_retried_when_nothing_changed() -> None:
    """Under KV pressure the head request waits step after step; skipping retries that could change nothing
    gives every request the same timings (and skips almost all of them)."""
    wl = _workload(3, 300)
    runs = []
    for skip in (True, False):
        vt = [0.0]
        e = Engine(get_profile("qwen3-1.7b-fp8"), num_gpu_blocks=600, clock=lambda vt=vt: vt[0], keep_latencies=False)
        if not skip:
            e._still_blocked = lambda req, budget: False   # type: ignore[method-assign]
        reqs = _plain(e, vt, wl)
        runs.append(([(r.first_token_at, r.finished_at, r.cached_tokens, r.preemptions) for r in reqs],
                     e.kv.gen_touch))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] * 10 < runs[1][1]


class _PerBlockKV:
    """The KV cache one block at a time (OrderedDict LRU): the model the array form must equal."""

    def __init__(self, n: int) -> None:
        self.never = list(range(n - 1, -1, -1))
        self.ev: OrderedDict[int, int] = OrderedDict()
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        self.ref = [0] * n
        self.removed: list[int] = []

    def match(self, hashes: list[int]) -> list[int]:
        out = []
        for h in hashes:
            if h not in self.by_hash:
                break
            out.append(self.by_hash[h])
        return out

    def touch(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                self.ev.pop(b, None)
            self.ref[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.never) + len(self.ev):
            return None
        out = []
        for _ in range(n):
            if self.never:
                b = self.never.pop()
            else:
                b, h = self.ev.popitem(last=False)
                del self.hash_of[b]
                if self.by_hash.get(h) == b:
                    del self.by_hash[h]
                    self.removed.append(h)
            self.ref[b] = 1
            out.append(b)
        return out

    def cache_block(self, b: int, h: int) -> None:
        if b in self.hash_of or h in self.by_hash:
            return
        self.hash_of[b] = h
        self.by_hash[h] = b

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.ev[b] = self.hash_of[b]
                else:
                    self.never.append(b)


def test_kv_cache_arrays_equal_the_per_block_model() -> None:
    rng = random.Random(5)
    model, kv = _PerBlockKV(300), KVCache(300, 16)
    removed: list[int] = []
    kv.listener = lambda ev: removed.extend(ev.block_hashes if isinstance(ev, BlockRemoved) else [])  # type: ignore
    held: list[list[int]] = []
    for _ in range(4000):
        op = rng.random()
        if op < 0.35:
            base = rng.randrange(40)
            hashes = [base * 1000 + j for j in range(rng.randint(1, 30))]
            hits = kv.match(hashes)
            assert hits == model.match(hashes)
            kv.touch(hits)
            model.touch(hits)
            n = len(hashes) - len(hits)
            got = kv.allocate(n)
            assert got == model.allocate(n)
            if got is None:
                kv.free(hits)
                model.free(hits)
                continue
            blocks = hits + got
            for b, h in zip(blocks, hashes, strict=True):
                kv.cache_block(b, h)
                model.cache_block(b, h)
            held.append(blocks)
        elif op < 0.7 and held:
            blocks = held.pop(rng.randrange(len(held)))
            kv.free(blocks)
            model.free(blocks)
        elif op < 0.72:
            assert kv.reset()
            for b, h in list(model.ev.items()):
                del model.hash_of[b]
                if model.by_hash.get(h) == b:
                    del model.by_hash[h]
                    model.removed.append(h)
                model.never.append(b)
            model.ev.clear()
        assert kv.num_free == len(model.never) + len(model.ev)
        assert kv.evictable() == list(model.ev)
    assert removed == model.removed and removed


# --- block hashes without token ids -----------------------------------------------------------
def test_blocks_share_exactly_the_shared_prefix() -> None:
    chains = BlockChains()
    bs = 16
    a = chains.blocks(TraceRequest(t=0, tenant="x", model="m", prompt=500, output=40,
                                   prefix=(Prefix("sys", 100), Prefix("doc", 300))), 40, bs, 1)
    b = chains.blocks(TraceRequest(t=0, tenant="x", model="m", prompt=450, output=40,
                                   prefix=(Prefix("sys", 100), Prefix("doc", 300))), 40, bs, 2)
    c = chains.blocks(TraceRequest(t=0, tenant="x", model="m", prompt=450, output=40,
                                   prefix=(Prefix("sys", 100), Prefix("other", 300))), 40, bs, 3)
    assert len(a.ints) == (500 + 40) // bs and len(b.ints) == (450 + 40) // bs
    assert a.ints[:25] == b.ints[:25] and a.ints[25] != b.ints[25]        # 400 shared tokens: 25 full blocks
    assert a.ints[:6] == c.ints[:6] and a.ints[6] != c.ints[6]            # 100 shared: 6 full, the 7th mixes
    assert len(set(a.ints) | set(b.ints)) == len(a.ints) + len(b.ints) - 25
    ha, hb = a.prefix_hashes(64, 512), b.prefix_hashes(64, 512)
    assert ha.positions[:28] == list(range(28)) and ha.hashes[:25] == hb.hashes[:25]
    assert ha.hashes[25] != hb.hashes[25]
    # a conversation: the answer continues its group, so the next turn's prompt hits the answer's blocks
    t1 = chains.blocks(TraceRequest(t=0, tenant="x", model="m", prompt=700, output=200, continues=True,
                                    prefix=(Prefix("sys", 600), Prefix("conv", 100))), 200, bs, 4)
    t2 = chains.blocks(TraceRequest(t=9, tenant="x", model="m", prompt=1000, output=50, continues=True,
                                    prefix=(Prefix("sys", 600), Prefix("conv", 400))), 50, bs, 5)
    assert t2.ints[: (700 + 200) // bs] == t1.ints


def test_synth_workloads_have_their_shapes_and_are_reproducible(tmp_path: Path) -> None:
    for kind in KINDS:
        reqs = list(synth(kind, 400, 7, rate=30.0))
        assert len(reqs) == 400
        assert all(a.t <= b.t for a, b in itertools.pairwise(reqs))
        assert all(sum(p.tokens for p in r.prefix) <= r.prompt and r.output >= 1 for r in reqs)
        one, two = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
        with one.open("wb") as f:
            write_trace(synth(kind, 400, 7, rate=30.0), f)
        with two.open("wb") as f:
            write_trace(synth(kind, 400, 7, rate=30.0), f)
        assert one.read_bytes() == two.read_bytes() and list(read_trace(one)) == reqs
    docs = list(synth("docs", 200, 1))
    assert all(20_000 <= r.prompt <= 200_400 and r.slo == "relaxed" for r in docs)
    assert len({r.prefix[0].id for r in docs}) < 200                      # documents are asked about again
    chat = list(synth("chat", 600, 1, rate=10.0))
    assert max(sum(1 for r in chat if r.t == t) for t in {r.t for r in chat}) >= 40   # a burst
    turns = list(synth("multiturn", 600, 1))
    by_conv: dict[str, list[TraceRequest]] = {}
    for r in turns:
        by_conv.setdefault(r.prefix[1].id, []).append(r)
    grown = [c for c in by_conv.values() if len(c) > 1]
    assert grown and all(c[i + 1].prefix[1].tokens > c[i].prefix[1].tokens + c[i].output
                         for c in grown for i in range(len(c) - 1))
    hot = list(synth("hot-system-prompt", 100, 1))
    assert {r.prefix for r in hot} == {(Prefix("hot-sys", 3000),)}
    mixed = list(synth("mixed", 2000, 1))
    kinds = {r.prefix[0].id.split("-")[0] for r in mixed}
    assert kinds == {"chat", "rag", "conv", "hot", "doc"}
    assert list(synth("mixed", 300, 2)) != list(synth("mixed", 300, 1))


# --- the driver --------------------------------------------------------------------------------
def _replay(policy: Any, trace: list[TraceRequest], replicas: dict[str, str] | None = None) -> dict[str, Any]:
    return Replay(policy, shape(policy, replicas or {}, {})).run(trace).summary()


def test_replay_runs_the_policy_decision_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scorer plugin registered like any other changes where replayed requests go."""

    class PreferTier:
        name = "prefer_tier"

        def __init__(self, tier: str) -> None:
            self.tier = tier

        def score(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[float], str]:
            return [1.0 if c.tier == self.tier else 0.0 for c in cands], f"prefer {self.tier}"

    monkeypatch.setitem(plugin_registry.KNOWN_SCORERS, "prefer_tier", PreferTier)
    text = DEMO.read_text()
    custom = parse_policy(text.replace("      - {type: expected_money, params: {bill: both}}",
                                       "      - {type: prefer_tier, params: {tier: balanced}}"), "custom.yaml")
    trace = [r for r in synth("chat", 300, 3, rate=20.0)]
    demo = _replay(load_policy(DEMO), trace)
    mine = _replay(custom, trace)
    assert mine["tiers"] == {"balanced": 300} and demo["tiers"].get("balanced", 0) < 300
    assert mine["usd_per_1m_tokens"] > demo["usd_per_1m_tokens"]
    assert mine["served"] == demo["served"] == 300


def test_replay_writes_a_decision_record_per_served_request() -> None:
    pol = load_policy(DEMO)
    trace = list(synth("chat", 50, 5, rate=20.0))
    run = Replay(pol, shape(pol, {}, {}), decision_records=1000)
    served = run.run(trace).summary()["served"]
    assert run.records is not None and len(run.records.records) == served == 50
    rec = run.records.records[-1]
    assert run.records.lookup(rec.request_id) is rec
    assert rec.tier is not None and rec.decision is not None and rec.decision.chosen is not None
    assert "usd" in rec.est and rec.completion_tokens > 0


def test_replay_counts_refusals_like_the_router() -> None:
    pol = load_policy(DEMO)
    trace = [TraceRequest(t=0.0, tenant="nobody", model="auto", prompt=10, output=5),
             TraceRequest(t=0.1, tenant="demo", model="no-such-model", prompt=10, output=5),
             TraceRequest(t=0.2, tenant="fast-only", model="qwen3-4b", prompt=10, output=5),
             TraceRequest(t=0.3, tenant="demo", model="qwen3-1.7b", prompt=50_000, output=5),
             TraceRequest(t=0.4, tenant="demo", model="auto", prompt=100, output=5, slo="no-such-class"),
             TraceRequest(t=0.5, tenant="demo", model="auto", prompt=100, output=5)]
    s = _replay(pol, trace)
    assert s["served"] == 1 and s["refused"] == {"400 context_length_exceeded": 1, "400 invalid_header": 1,
                                                  "401 invalid_api_key": 1, "403 model_not_allowed": 1,
                                                  "404 model_not_found": 1}


def test_replay_admits_through_the_tenant_limits() -> None:
    """The demo's `capped` tenant (600 requests per sliding minute) over the budget twin, on virtual time."""
    trace = list(synth("chat", 900, 4, rate=20.0, tenants=("capped",)))    # ~45 s of traffic, bursts included
    s = _replay(load_policy(DEMO), trace)
    assert s["refused"] == {"429 rate_limit_exceeded": 900 - s["served"]} and 600 <= s["served"] < 900
    assert s["tenants_usd"] == {"capped": pytest.approx(s["usd"])}


# --- the CLI -----------------------------------------------------------------------------------
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "router.cli", "replay", *args], cwd=ROOT, capture_output=True,
                          env={**os.environ, **(env or {})}, timeout=600, check=False)


def test_cli_compare_json_is_byte_identical_across_runs(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    assert _cli("synth", "--kind", "mixed", "--requests", "400", "--seed", "5", "--rate", "15",
                "-o", str(trace)).returncode == 0
    weighted = tmp_path / "weighted.yaml"
    weighted.write_text(DEMO.read_text().replace("profile: money", "profile: weighted"))
    args = ("run", "--trace", str(trace), "--compare", str(DEMO), str(weighted), "--replicas",
            "fast=2,balanced=2,long=1", "--json")
    one = _cli(*args, env={"PYTHONHASHSEED": "1"})
    two = _cli(*args, env={"PYTHONHASHSEED": "2"})       # str hashing differs; the output may not
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    assert one.stdout == two.stdout
    doc = json.loads(one.stdout)
    assert list(doc["policies"]) == ["demo", "weighted"]
    assert doc["meta"]["replicas"]["demo"] == {"fast": 2, "balanced": 2, "long": 1}
    for s in doc["policies"].values():
        assert s["served"] == 400 and s["usd_per_1m_tokens"] > 0
        assert set(s["slo"]) == {"interactive", "relaxed"} and s["slo"]["interactive"]["ttft_p50_s"] > 0
        assert sum(s["tiers"].values()) == 400 and s["tenants_usd"]["demo"] == pytest.approx(s["usd"])
    table = _cli("run", "--trace", str(trace), "--policy", str(DEMO), "--replicas", "long=1")
    assert table.returncode == 0 and b"USD per 1M tokens" in table.stdout and b"interactive: TTFT" in table.stdout
    bad = _cli("run", "--trace", str(trace), "--replicas", "gpu=3")
    assert bad.returncode == 2 and b"no tier 'gpu'" in bad.stderr


# --- recording live traffic ------------------------------------------------------------------
def _read(path: Path) -> tuple[bytes, list[TraceRequest]]:
    return path.read_bytes(), list(read_trace(path))


@pytest.fixture
def record_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "recorded.jsonl"
    monkeypatch.setenv("TIERGATE_RECORD_TRACE", str(path))
    yield path


async def test_a_recorded_trace_replays(record_path: Path, redis_url: str) -> None:
    """A live in-process router records its traffic (no prompt text); the trace replays on the same policy."""
    policy = load_policy(DEMO)
    secret = "violet-zebra-4417"
    system = "You are a careful assistant. " * 60
    async with running_sim("qwen3-1.7b-fp8", time_scale=0.001) as fast, \
            running_sim("qwen3-4b-mixed", time_scale=0.001) as bal, \
            running_sim("qwen3-4b-256k", time_scale=0.001) as long:
        urls = {"fast": [InstanceSpec(id="f0", url=fast.url)], "balanced": [InstanceSpec(id="b0", url=bal.url)],
                "long": [InstanceSpec(id="l0", url=long.url)]}
        async with serve_router(policy, urls, redis_url=redis_url) as url, \
                httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {DEMO_KEY}"},
                                  timeout=60) as c:
            for i in range(6):
                r = await c.post("/v1/chat/completions", json={
                    "model": "auto", "max_tokens": 5 + i, "stream": i % 2 == 0,
                    "messages": [{"role": "system", "content": system},
                                 {"role": "user", "content": f"question {i} {secret}"}]},
                    headers={"x-slo-ttft-ms": "2500"} if i == 5 else {})
                assert r.status_code == 200
    raw, trace = _read(record_path)
    assert secret.encode() not in raw and b"careful" not in raw
    assert len(trace) == 6
    assert [r.output for r in trace] == [5, 6, 7, 8, 9, 10] and [r.stream for r in trace] == [True, False] * 3
    assert trace[5].ttft_ms == 2500 and trace[0].slo == "interactive"
    shared = [p.id for p in trace[0].prefix]
    assert len(shared) >= 16 and all([p.id for p in r.prefix][:16] == shared[:16] for r in trace)
    s = (await Replay(policy, shape(policy, {}, {})).arun(trace)).summary()
    assert s["served"] == 6 and s["tokens"]["completion"] == sum(range(5, 11))
    assert s["cache_hit"] > 0.5            # the shared system prompt hits in the replayed engines too
