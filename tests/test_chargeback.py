"""GPU-hour chargeback and honest counterfactuals (issue #17): exact shares on constructed cases, a replayed
run's charges against the engines' busy time, exact savings on a known ledger, and /v1/usage's figures."""

from __future__ import annotations

import datetime as dt
import uuid
from fractions import Fraction
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from backends.sim.engine import Engine, SimRequest
from backends.sim.profile import SimProfile, get_profile
from backends.sim.virtual import VirtualEngine
from policies.schema import load_policy
from router.accounting import cost_units
from router.budget_store import BudgetStore, Usage, usd
from router.chargeback import live_charge, split_steps
from router.cli import main as cli_main
from router.cost_cli import CostInputs, prices
from router.lifecycle.billing import counterfactuals
from router.replay.budget_twin import MemoryBudgetStore
from router.replay.cluster import shape
from router.replay.driver import EPOCH_MS, Replay
from router.replay.synth import synth
from router.usage import report, to_csv

DEMO = Path(__file__).resolve().parents[1] / "policies" / "examples" / "demo.yaml"


def test_split_steps_gives_each_tenant_its_exact_share() -> None:
    """Tenant a's request shares a prefill step 3:1 with b's, then two decode steps 1:1 with it, then b decodes
    alone for two steps; every step takes 1/2 s. a: 3/8 + 1/4 + 1/4 = 7/8 s, b: 1/8 + 1/2 + 1 = 13/8 s."""
    half = Fraction(1, 2)
    steps = [(half, {"a": 30, "b": 10}), (half, {"a": 1, "b": 1}), (half, {"a": 1, "b": 1}),
             (half, {"b": 1}), (half, {"b": 1}), (half, {})]
    got = split_steps(steps)
    assert got == {"a": Fraction(7, 8), "b": Fraction(13, 8)}
    assert sum(got.values()) == 5 * half          # the busy steps' time, and nothing more


def _flat(step_s: float) -> SimProfile:
    """A profile whose every step with work takes exactly `step_s` (no per-token or per-context terms)."""
    return get_profile("qwen3-1.7b-fp8", prefill_tokens_per_s=1e15, prefill_attn_s_per_token_ctx=0.0,
                       decode_weight_read_s=step_s, decode_per_seq_s=0.0, hbm_bytes_per_s=1e300,
                       step_overhead_s=0.0)


def _pair() -> tuple[SimRequest, SimRequest]:
    a = SimRequest(request_id="a", prompt_ids=list(range(30)), target_len=3, length_capped=True, token_ids=False)
    b = SimRequest(request_id="b", prompt_ids=list(range(500, 510)), target_len=5, length_capped=True,
                   token_ids=False)
    return a, b


def _hashes(r: SimRequest) -> list[int]:
    return [hash((r.request_id, i)) for i in range(4)]   # its own blocks, prompt and output (no prefix hits)


def test_the_replay_engine_charges_a_constructed_case_exactly() -> None:
    """On the replay's engine (decode group, jumps), an idle engine schedules a's prefill (30 tokens, its first
    token) at once; b (10 tokens) joins the next step beside a's decode; a decodes once more beside b, then b
    three times alone, in one jump. Every step takes 1/2 s."""
    prof = _flat(0.5)
    ve = VirtualEngine(Engine(prof), lambda r, t: None, lambda r, t: None)
    a, b = _pair()
    for r in (a, b):
        ve.add(r, _hashes(r), 0.0)
    while ve.wake_at is not None:
        ve.wake(ve.wake_at)
    half = Fraction(1, 2)
    want = split_steps([(half, {"a": 30}), (half, {"a": 1, "b": 10}), (half, {"a": 1, "b": 1}),
                        (half, {"b": 1}), (half, {"b": 1}), (half, {"b": 1})])
    assert want == {"a": Fraction(35, 44), "b": Fraction(97, 44)}
    assert abs(a.gpu_s - want["a"]) < 1e-12 and abs(b.gpu_s - want["b"]) < 1e-12
    assert ve.engine.stats.gpu_busy_s == ve.busy_s == 3.0


async def test_the_simulator_loop_charges_the_constructed_case_exactly() -> None:
    """The same case on the live simulator's own loop (`Engine._run`; time_scale 0: no real sleeping)."""
    prof = _flat(0.5)
    eng = Engine(prof, time_scale=0.0)
    a, b = _pair()
    eng.add(a, _hashes(a))
    eng.add(b, _hashes(b))
    eng.start()
    try:
        for r in (a, b):
            while r.finish_reason is None:   # the engine sets the event at each token and at the finish
                await r.event.wait()
                r.event.clear()
    finally:
        await eng.stop()
    assert (a.gpu_s, b.gpu_s, eng.stats.gpu_busy_s) == (0.875, 1.625, 2.5)


def test_a_replayed_run_charges_its_engines_busy_time_and_the_ledger_each_tenant() -> None:
    """Done when: the GPU-seconds of a replayed run add up to the engines' busy time within 5% (here to the
    microsecond rounding of each request), and the ledger's per-tenant sums are the requests' own."""
    pol = load_policy(DEMO)
    run = Replay(pol, shape(pol, {}, {}))
    res = run.run(list(synth("mixed", 300, 11, rate=20.0, tenants=("demo", "capped"))))
    assert res.served == 300
    charged = sum(res.gpu_us.values()) / 1e6
    busy = sum(res.busy_s.values())
    assert busy > 10 and abs(charged - busy) <= 0.05 * busy
    assert abs(charged - busy) <= 300e-6                      # each request rounded to a microsecond
    assert abs(charged - sum(res.gpu_busy_s.values())) <= 300e-6
    assert set(res.tenants_gpu_us) == {"demo", "capped"} and sum(res.tenants_gpu_us.values()) == sum(
        res.gpu_us.values())
    sums = run.budget.all_aggregates()
    total = {m: sum(v for t in sums.values() for k, v in t.items() if k.endswith("|" + m))
             for m in ("gpu_src_sim", "base_n", "base_na", "gpu_us")}
    assert total["gpu_src_sim"] == total["base_n"] + total["base_na"] == 300   # every one charged exactly, compared
    assert total["base_na"] >= res.tiers["long"] > 0    # the long prompts: the baseline (32768 tokens) had no room
    assert total["gpu_us"] == sum(res.gpu_us.values())
    s = res.summary()
    assert s["baseline_no_alternative"] == total["base_na"]
    assert s["tenants_gpu_s"] == {t: round(v / 1e6, 6) for t, v in sorted(res.tenants_gpu_us.items())}


def test_live_charges_name_their_source() -> None:
    eng = live_charge(uncached=2000, completion=101, prefill_tps=10_000.0, decode_s=2.0, scraped_running=4.0,
                      in_flight=1, tpot_s=0.05)
    assert (eng.us, eng.src) == (200_000 + 500_000, "engine")             # 2000/10k s + 2 s / batch 4
    est = live_charge(uncached=2000, completion=100, prefill_tps=10_000.0, decode_s=None, scraped_running=None,
                      in_flight=2, tpot_s=0.05)
    assert (est.us, est.src) == (200_000 + 2_500_000, "throughput")       # 100 x 50 ms / 2 in flight
    none = live_charge(uncached=10, completion=10, prefill_tps=None, decode_s=None, scraped_running=None,
                       in_flight=0, tpot_s=None)
    assert (none.us, none.src) == (0, "throughput")


def _usage(tier: str, prompt: int, cached: int, completion: int, tenant: str, at_ms: int,
           gpu_us: int = 0, gpu_src: str = "", slo: tuple[str, bool] | None = None) -> Usage:
    pol = load_policy(DEMO)
    units = cost_units(pol.tiers[tier], prompt, cached, completion)
    base, ok, nocache = counterfactuals(pol, tenant, "balanced", {}, tier, units, prompt, cached, completion, 1.0)
    return Usage(tier=tier, instance="i0", route="auto", status=200, prompt=prompt, cached=cached,
                 completion=completion, cost=units, base=base, nocache=nocache, base_ok=ok, latency_ms=1.0,
                 ttft_ms=1.0, slo_met=None if slo is None else slo[1], at_ms=at_ms, gpu_us=gpu_us, gpu_src=gpu_src,
                 slo_class="" if slo is None else slo[0])


async def test_savings_count_only_requests_the_baseline_could_serve(redis: aioredis.Redis) -> None:
    """A known ledger for tenant demo (baseline: balanced, 32768 tokens, 0.15 / 0.03 / 0.60 USD per 1M):
    r1 on fast fits the baseline; r2 on long (40000 + 1000 tokens) does not: no alternative. fast-only may not
    use the baseline at all. Savings compare the baseline with r1's own cost, not with r2's."""
    store = BudgetStore(redis, clock_ms=lambda: EPOCH_MS)
    day = dt.date(2026, 1, 5)
    r1 = _usage("fast", 1000, 200, 100, "demo", EPOCH_MS, 3_600_000_000, "sim", ("interactive", True))
    r2 = _usage("long", 40_000, 0, 1000, "demo", EPOCH_MS, 1_800_000_000, "throughput", ("interactive", False))
    r3 = _usage("fast", 500, 0, 50, "fast-only", EPOCH_MS, 0, "engine", ("relaxed", True))
    assert (r1.base_ok, r2.base_ok, r3.base_ok) == (True, False, False)
    demo, fast_only = "cb-" + uuid.uuid4().hex[:10], "cb-" + uuid.uuid4().hex[:10]   # fresh ledgers
    for tenant, rid, u in ((demo, "r1", r1), (demo, "r2", r2), (fast_only, "r3", r3)):
        assert await store.settle(tenant, rid, u) == "orphan"
    rep = report(demo, await store.aggregates(demo, 1, day), 1, day, {},
                 gpu_per_hour={"fast": 2.0, "long": None, "balanced": 1.0})
    t = rep["totals"]
    assert t["cost_usd"] == 0.000062 + 0.0132              # fast: 800 x .05 + 200 x .01 + 100 x .2; long
    assert t["baseline_cost_usd"] == 0.000186               # 800 x .15 + 200 x .03 + 100 x .6, r1 only
    assert t["baseline_actual_cost_usd"] == 0.000062
    assert t["savings_vs_baseline_usd"] == 0.000124
    assert (t["baseline_requests"], t["no_alternative_requests"]) == (1, 1)
    assert t["no_cache_cost_usd"] == 0.00007 + 0.0132       # r1 uncached: 1000 x .05 + 100 x .2
    assert t["savings_from_cache_usd"] == 0.000008
    assert t["gpu_hours"] == 1.5 and t["gpu_cost_usd"] == 2.0   # long has no gpu_cost_per_hour: fast's only
    assert t["gpu_source_requests"] == {"engine": 0, "sim": 1, "throughput": 1}
    assert t["slo_by_class"] == {"interactive": {"met": 1, "measured": 2}}
    rows = {r["tier"]: r for r in rep["data"]}
    assert (rows["fast"]["gpu_cost_usd"], rows["long"]["gpu_cost_usd"]) == (2.0, None)
    lines = to_csv([rep]).splitlines()
    assert lines[0].endswith("baseline_requests,no_alternative_requests,baseline_actual_cost_usd,gpu_hours,"
                             "gpu_cost_usd")
    assert lines[1].endswith(",1,0,0.000062,1,2") and lines[2].endswith(",0,1,0,0.5,")
    other = report(fast_only, await store.aggregates(fast_only, 1, day), 1, day, {})["totals"]
    assert (other["baseline_requests"], other["no_alternative_requests"], other["baseline_cost_usd"]) == (0, 1, 0.0)
    assert other["gpu_cost_usd"] is None
    recs = [f for _, f in await store.ledger(demo)]
    assert [(f["gpu_us"], f["gpu_src"], f["base_n"], f["base_na"]) for f in recs] == [
        ("3600000000", "sim", "1", "0"), ("1800000000", "throughput", "0", "1")]


def test_an_unbilled_request_has_nothing_to_compare() -> None:
    pol = load_policy(DEMO)
    assert counterfactuals(pol, "demo", "balanced", {}, None, 0, 10, 0, 0, 1.0) == (0, None, 0)
    base, ok, _ = counterfactuals(pol, "demo", "balanced", {"balanced": 40_000}, "fast", 5, 100, 0, 1, 1.0)
    assert (base, ok) == (0, False)      # the baseline counts the prompt its own way: it does not fit there


async def test_twin_and_store_aggregate_the_new_ledger_fields_alike(redis: aioredis.Redis) -> None:
    twin = MemoryBudgetStore(clock_ms=lambda: EPOCH_MS)
    real = BudgetStore(redis, clock_ms=lambda: EPOCH_MS)
    u = _usage("fast", 1000, 200, 100, "demo", EPOCH_MS, 1234, "engine", ("a|b", True))
    day = dt.date(2026, 1, 5)
    tenant = "cb-" + uuid.uuid4().hex[:10]
    for s in (twin, real):
        await s.settle(tenant, "x", u)
    agg = await real.aggregates(tenant, 1, day)
    assert agg == await twin.aggregates(tenant, 1, day)
    h = "2026010500|fast|"
    assert {k[len(h):]: v for k, v in agg.items() if k.startswith(h)} == {
        "requests": 1, "cost": u.cost, "prompt": 1000, "cached": 200, "completion": 100, "base": u.base,
        "nocache": u.nocache, "slo_met": 1, "slo_n": 1, "base_n": 1, "base_na": 0, "base_cost": u.cost,
        "gpu_us": 1234, "gpu_src_engine": 1, "slo_met@a_b": 1, "slo_n@a_b": 1}
    assert usd(u.cost) == 0.000062


def _cost(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli_main(["cost", *argv])
    out, err = capsys.readouterr()
    return rc, out + err


def test_cost_prints_its_formula_and_the_prices_of_the_worked_example(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's example: ¥3.6 per hour, 89 (FP16) vs 125 (mixed precision) output tokens/s on one RTX 4090D."""
    rc, fp16 = _cost("--gpu-price-per-hour", "3.6", "--currency", "CNY", "--tokens-per-s", "89", capsys=capsys)
    assert rc == 0
    assert "price per output token = price_per_hour / (3600 s x output_tokens_per_s x utilization)" in fp16
    assert "output:       11.235955 CNY per 1M tokens = 3.6 / (3600 x 89 x 1) x 1e6" in fp16
    assert "input:        2.808989 CNY per 1M tokens = output price x 0.25" in fp16
    assert fp16.splitlines()[-1] == "prices: {input: 2.809, cached_input: 0.5618, output: 11.236}   # CNY per 1M tokens"
    assert "pass --usd-per-unit" in fp16
    _, mixed = _cost("--gpu-price-per-hour", "3.6", "--currency", "CNY", "--tokens-per-s", "125", capsys=capsys)
    assert "output:       8.000000 CNY per 1M tokens" in mixed
    assert round(1 - prices(CostInputs(3.6, 125)).output / prices(CostInputs(3.6, 89)).output, 4) == 0.288
    _, usd_line = _cost("--gpu-price-per-hour", "3.6", "--currency", "CNY", "--usd-per-unit", "0.14",
                        "--tokens-per-s", "125", capsys=capsys)
    assert usd_line.splitlines()[-1] == "prices: {input: 0.28, cached_input: 0.056, output: 1.12}   # USD per 1M tokens"


def test_cost_with_a_prefill_rate_and_utilization(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _cost("--gpu-price-per-hour", "2", "--tokens-per-s", "1000", "--utilization", "0.5",
                    "--input-tokens-per-s", "20000", capsys=capsys)
    assert rc == 0
    assert "output:       1.111111 USD per 1M tokens = 2 / (3600 x 1000 x 0.5) x 1e6" in out
    assert "input:        0.055556 USD per 1M tokens = 2 / (3600 x 20000 x 0.5) x 1e6" in out
    assert out.splitlines()[-1] == "prices: {input: 0.0556, cached_input: 0.0111, output: 1.1111}   # USD per 1M tokens"
    for bad in (["--utilization", "0"], ["--utilization", "1.5"], ["--tokens-per-s", "0"]):
        args = ["--gpu-price-per-hour", "2", "--tokens-per-s", "1000", *bad]
        rc, err = _cost(*args, capsys=capsys)
        assert rc == 2 and err.startswith("error: --")
