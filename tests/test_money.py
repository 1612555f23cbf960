"""One objective in money: the `expected_money` scorer, its predictor (policies/predict.py), the TPOT
targets in `slo_feasible`, and the demo's `money` profile against the old `weighted` one."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.engine import Profile
from policies.plugins.expected_money import ExpectedMoney, money
from policies.plugins.slo_feasible import SloFeasible
from policies.predict import PredictParams, observed_batches, p_exceed, predict, predicted_tpot_s, predicted_ttft_s
from policies.schema import PolicyError, load_policy, parse_policy
from policies.types import Candidate, RoutingRequest
from tests.conftest import DEMO_KEY
from tests.test_policies import DEMO, DEMO_TEXT

POLICY = load_policy(DEMO)
TIERS = ("fast", "balanced", "long")
MONEY = Profile.from_spec("money", POLICY.profiles["money"])
WEIGHTED = Profile.from_spec("weighted", POLICY.profiles["weighted"])
# the demo tiers' sim profiles (backends/sim/profiles.yaml): prefill rate, and TPOT of an idle instance
RATES = {"fast": (190_200.0, 0.002), "balanced": (72_600.0, 0.0032), "long": (52_600.0, 0.0037)}


def cand(tier: str, iid: str = "0", *, known: bool = True, **kw: object) -> Candidate:
    t = POLICY.tiers[tier]
    tps, tpot = RATES[tier] if known else (0.0, 0.0)
    fields: dict[str, object] = dict(tier=tier, instance_id=f"{tier[0]}{iid}", max_model_len=t.max_model_len,
                                     price_input=t.prices.input, price_cached_input=t.prices.cached_input,
                                     price_output=t.prices.output, prefill_tps=tps, tpot_s=tpot)
    fields.update(kw)
    return Candidate(**fields)  # type: ignore[arg-type]


def req(prompt: int = 1200, max_tokens: int | None = 265, *, cls: str | None = "interactive", rid: str = "r",
        **kw: object) -> RoutingRequest:
    slo = POLICY.slo_classes.get(cls or "")
    fields: dict[str, object] = dict(
        request_id=rid, tenant="demo", virtual_model="auto", route_tiers=TIERS, tenant_tiers=None,
        prompt_tokens={t: prompt for t in TIERS}, max_tokens=max_tokens, default_completion_tokens=1024,
        slo_class=cls or "", ttft_target_s=slo.ttft_ms / 1000 if slo else None,
        tpot_target_s=slo.tpot_ms / 1000 if slo else None, miss_cost_usd=slo.miss_cost_usd if slo else 0.0)
    fields.update(kw)
    return RoutingRequest(**fields)  # type: ignore[arg-type]


def usd_tokens(c: Candidate, prompt: int, cached: int, out: int) -> float:
    return ((prompt - cached) * c.price_input + cached * c.price_cached_input + out * c.price_output) / 1e6


# --- the 218 vs 113 u$ case: the cache counted twice --------------------------------------------
def test_weighted_profile_pays_1_93x_where_money_picks_the_cheapest() -> None:
    # fast: 1200 uncached x $0.05 + 265 out x $0.20 per 1M = 113 u$. balanced holds 1008 of the prompt:
    # 192 x $0.15 + 1008 x $0.03 + 265 x $0.60 = 218.04 u$. long: 360 + 318 = 678 u$.
    r = req()
    fast, bal, long = cand("fast"), cand("balanced", cached_tokens=1008), cand("long")
    costs = {c.key: usd_tokens(c, 1200, c.cached_tokens, 265) for c in (fast, bal, long)}
    assert costs[fast.key] == pytest.approx(113e-6) and costs[bal.key] == pytest.approx(218.04e-6)
    old = WEIGHTED.decide(r, [long, bal, fast])
    # the flaw: expected_cost already prices balanced's cache hit (0.518 x 10), then prefix_affinity
    # adds 1008/1200 x 10 for the same hit, and the sum beats the cheaper tier's 10
    assert old.chosen == bal
    assert old.scores[bal.key]["prefix_affinity"] == pytest.approx(1008 / 1200)
    assert costs[old.chosen.key] / min(costs.values()) == pytest.approx(1.9296, abs=1e-3)
    new = MONEY.decide(r, [long, bal, fast])
    assert new.chosen == fast and [c.key for c in new.ranked] == [fast.key, bal.key, long.key]
    for c in (fast, bal, long):   # idle and fast enough: the estimate is the token bill, plus a tiny miss term
        e = new.estimates[c.key]
        assert e["usd_tokens"] == pytest.approx(costs[c.key]) and e["usd_miss"] < 1e-9
        assert e["usd"] == pytest.approx(e["usd_tokens"] + e["usd_gpu"] + e["usd_miss"])
        assert new.scores[c.key]["expected_money"] == pytest.approx(new.estimates[fast.key]["usd"] / e["usd"])
    assert "least $0.000113 on fast/f0" in " ".join(x.reason for x in new.reasons)


# --- the cache counts once: no affinity signal beyond the expected cached tokens ---------------------
cand_st = st.builds(
    cand, tier=st.sampled_from(TIERS), iid=st.sampled_from("0123"), known=st.booleans(),
    cached_tokens=st.integers(0, 4000), running=st.integers(0, 300), waiting=st.integers(0, 40),
    pending_requests=st.integers(0, 10), pending_tokens=st.integers(0, 100_000),
    mean_uncached_tokens=st.floats(1, 8000), gpu_cost_per_hour=st.sampled_from([0.0, 2.5, 36.0]))


def unique(cands: list[Candidate]) -> list[Candidate]:
    return list({c.key: c for c in cands}.values())


@settings(max_examples=150, deadline=None)
@given(cands=st.lists(cand_st, min_size=1, max_size=8).map(unique), prompt=st.integers(1, 3000),
       cls=st.sampled_from(["interactive", "relaxed", None]), data=st.data())
def test_affinity_never_changes_a_decision_when_expected_cached_tokens_are_equal(
        cands: list[Candidate], prompt: int, cls: str | None, data: st.DataObject) -> None:
    """The raw match the index reports past the prompt (the same expected cached tokens), the in-flight
    count and the KV usage (inputs of the affinity scorer's guards) never move the money decision."""
    r = req(prompt, cls=cls)
    twins = []
    for c in cands:
        cached = c.cached_tokens if c.cached_tokens < prompt else data.draw(st.integers(prompt, 10 * prompt + 1))
        twins.append(Candidate(**{**{f: getattr(c, f) for f in c.__struct_fields__}, "cached_tokens": cached,
                                  "in_flight": data.draw(st.integers(0, 500)), "kv_usage": data.draw(st.floats(0, 1))}))
    a, b = MONEY.decide(r, cands), MONEY.decide(r, twins)
    assert [c.key for c in a.ranked] == [c.key for c in b.ranked]
    assert a.estimates == b.estimates and a.totals == b.totals


@settings(max_examples=100, deadline=None)
@given(cands=st.lists(cand_st, min_size=2, max_size=6).map(unique), i=st.integers(0, 5),
       other_cached=st.lists(st.integers(0, 4000), min_size=6, max_size=6))
def test_a_candidates_money_never_depends_on_what_the_others_hold(cands: list[Candidate], i: int,
                                                                    other_cached: list[int]) -> None:
    # prefix_affinity discounts a prefix several instances hold (its `common` part); money has no such term
    i %= len(cands)
    others = [c if j == i else Candidate(**{**{f: getattr(c, f) for f in c.__struct_fields__},
                                            "cached_tokens": other_cached[j]}) for j, c in enumerate(cands)]
    s = ExpectedMoney()
    assert s.estimates(req(), cands)[i] == s.estimates(req(), others)[i]


# --- the predictor ---------------------------------------------------------------------------------
def test_ttft_prediction_moved_not_changed() -> None:
    from policies.plugins import slo_feasible

    c = cand("fast", waiting=3, pending_requests=1, pending_tokens=2000, cached_tokens=200, mean_uncached_tokens=500)
    # ours: 2000 tokens; 2 others at the mean 500; the prompt's 1000 uncached: 4000 tokens at 190.2K tok/s
    assert predicted_ttft_s(req(), c) == pytest.approx(4000 / 190_200)
    assert slo_feasible.predicted_ttft_s is predicted_ttft_s   # router/deadlines.py and budget_degrade use it


def test_tpot_scales_with_the_batch_it_would_join() -> None:
    idle, busy = cand("fast", "0", tpot_s=0.01), cand("fast", "1", tpot_s=0.01, running=64, pending_requests=3)
    ref = observed_batches([idle, busy])
    assert ref == {"fast": 32.0}                                 # the tier's mean running
    assert predicted_tpot_s(idle, ref["fast"], knee=32) == pytest.approx(0.01 * (32 + 1) / (32 + 32))
    assert predicted_tpot_s(busy, ref["fast"], knee=32) == pytest.approx(0.01 * (32 + 68) / (32 + 32))
    assert predicted_tpot_s(idle, ref["fast"], knee=32) >= 0.01 * 32 / (32 + 32)   # type: ignore[operator]  # floor
    lone = cand("fast", tpot_s=0.01)
    assert predicted_tpot_s(lone, observed_batches([lone])["fast"], knee=32) == pytest.approx(0.01 * 33 / 33)
    assert predicted_tpot_s(cand("fast", known=False), 1.0) is None


def test_p_exceed_is_the_lognormal_tail_around_the_prediction() -> None:
    for cv in (0.1, 0.5, 1.0):
        s2 = math.log1p(cv * cv)
        assert p_exceed(1.0, math.exp(-s2 / 2), cv) == pytest.approx(0.5)         # the median
        assert p_exceed(1.0, math.exp(-s2 / 2 + 1.6448536 * math.sqrt(s2)), cv) == pytest.approx(0.05, abs=1e-6)
    assert p_exceed(0.9, 1.0, 0.0) == 0.0 and p_exceed(1.1, 1.0, 0.0) == 1.0 and p_exceed(0.1, 0.0, 0.5) == 1.0
    p = predict(req(ttft_target_s=None), [cand("fast", known=False)], PredictParams(prior_miss_p=0.1))[0]
    assert (p.p_ttft, p.p_tpot) == (0.0, 0.1)                    # no target: 0; rate unknown: the prior
    assert p.p_miss == pytest.approx(0.1)
    q = predict(req(), [cand("fast", known=False)], PredictParams(prior_miss_p=0.1))[0]
    assert q.p_miss == pytest.approx(1 - 0.9 * 0.9)              # independent targets


@settings(max_examples=150, deadline=None)
@given(c=cand_st.filter(lambda c: c.prefill_tps > 0), more=st.integers(0, 60), more_tokens=st.integers(0, 200_000),
       more_running=st.integers(0, 300), ref=st.floats(1, 300))
def test_p_miss_is_monotone_in_queue_length_and_batch(c: Candidate, more: int, more_tokens: int,
                                                       more_running: int, ref: float) -> None:
    fields = {f: getattr(c, f) for f in c.__struct_fields__}
    queued = Candidate(**{**fields, "waiting": c.waiting + more, "pending_tokens": c.pending_tokens + more_tokens})
    r = req()
    (p,), (q,) = predict(r, [c], PredictParams()), predict(r, [queued], PredictParams())
    assert q.p_ttft >= p.p_ttft and q.p_tpot == p.p_tpot and q.p_miss >= p.p_miss
    assert money(r, queued, q)["usd_miss"] >= money(r, c, p)["usd_miss"]
    # a bigger batch, against the same observed one, predicts a slower TPOT
    bigger = Candidate(**{**fields, "running": c.running + more_running})
    assert predicted_tpot_s(bigger, ref) >= predicted_tpot_s(c, ref)  # type: ignore[operator]


# --- TPOT targets in the filter -----------------------------------------------------------------------
def test_slo_feasible_enforces_tpot_targets() -> None:
    # the tier's mean running is 200, so 20 ms per token was seen at batch 200 (knee 32): ok joins a batch
    # of 1 (0.02 x 33/232 = 2.8 ms), slow one of 201 (20.1 ms), slower one of 401 (37.3 ms)
    ok = cand("fast", "0", tpot_s=0.02)
    slow = cand("fast", "1", tpot_s=0.02, running=200)
    slower = cand("fast", "2", tpot_s=0.02, running=400)
    unknown = cand("balanced", known=False)
    r = req(tpot_target_s=0.015, ttft_target_s=None)
    kept, why = SloFeasible().filter(r, [ok, slow, slower, unknown])
    assert kept == [ok, unknown] and "tpot 15 ms" in why      # unknown TPOT passes, as unknown TTFT does
    assert SloFeasible().filter(req(tpot_target_s=0.025, ttft_target_s=None), [ok, slow, slower])[0] == [ok, slow]
    kept, why = SloFeasible().filter(req(tpot_target_s=0.002, ttft_target_s=None), [ok, slow, slower])
    assert kept == [ok] and "least late" in why                # none meets 2 ms: the least late
    assert SloFeasible(fallback="reject").filter(req(tpot_target_s=0.002), [ok, slow])[0] == []
    assert SloFeasible().filter(req(tpot_target_s=None, ttft_target_s=None), [slow])[0] == [slow]
    d = MONEY.decide(r, [slow, ok])
    assert d.chosen == ok and d.rejected == {slow.key: "slo_feasible"}


# --- the GPU-time term ---------------------------------------------------------------------------------
def test_gpu_seconds_at_the_current_batch_and_the_bill_parameter() -> None:
    # $36/hour = $0.01/s. 1000 uncached tokens at 100K tok/s = 0.01 s of prefill; 100 output tokens at
    # 10 ms, shared by the batch it joins (3 running + itself = 4): 0.25 s; tpot scaled to batch 4 vs ref 3
    r = req(1000, 100, cls=None)
    c = Candidate(tier="fast", instance_id="g", max_model_len=40960, price_input=1.0, price_cached_input=0.1,
                  price_output=2.0, gpu_cost_per_hour=36.0, prefill_tps=100_000.0, tpot_s=0.01, running=3)
    tpot = 0.01 * (32 + 4) / (32 + 3)
    gpu = 0.01 * (0.01 + 100 * tpot / 4)
    tokens = (1000 * 1.0 + 100 * 2.0) / 1e6
    for bill, want in (("both", tokens + gpu), ("tokens", tokens), ("gpu", gpu)):
        (e,) = ExpectedMoney(bill=bill).estimates(r, [c])
        assert e["usd"] == pytest.approx(want) and e["usd_gpu"] == pytest.approx(gpu)
        assert e["tpot_s"] == pytest.approx(tpot)
    plain = Candidate(**{**{f: getattr(c, f) for f in c.__struct_fields__}, "gpu_cost_per_hour": 0.0,
                         "instance_id": "p", "key": ""})
    assert ExpectedMoney(bill="gpu").estimates(r, [plain])[0]["usd"] == pytest.approx(tokens)  # not free
    # an idle GPU's hour costs each request more: with the GPU billed, the busier instance is cheaper
    idle = Candidate(**{**{f: getattr(c, f) for f in c.__struct_fields__}, "running": 0, "instance_id": "i",
                        "key": ""})
    low, high = ExpectedMoney(bill="gpu").estimates(r, [c, idle])
    assert low["usd"] < high["usd"]
    with pytest.raises(ValueError):
        ExpectedMoney(bill="dollars")


# --- the miss-cost term ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("miss_cost", "want"), [(0.0, "fast"), (0.0002, "fast"), (0.002, "balanced")])
def test_miss_cost_moves_a_request_off_a_cheap_but_likely_late_tier(miss_cost: float, want: str) -> None:
    # fast: 180,000 tokens queued ahead at 190.2K tok/s = 0.95 s predicted against the 1 s target (kept by
    # slo_feasible, but a miss is likely); balanced: idle, ~17 ms, on time
    late = cand("fast", pending_requests=9, pending_tokens=180_000 - 500)
    on_time = cand("balanced")
    r = req(500, 256, miss_cost_usd=miss_cost)
    assert predicted_ttft_s(r, late) == pytest.approx(0.95, abs=0.01)
    d = MONEY.decide(r, [late, on_time])
    assert d.rejected == {} and d.chosen is not None and d.chosen.tier == want, d.estimates
    e = d.estimates
    assert e[late.key]["usd_tokens"] < e[on_time.key]["usd_tokens"]
    assert e[late.key]["p_miss"] > 0.3 > 0.01 > e[on_time.key]["p_miss"]
    assert e[late.key]["usd_miss"] == pytest.approx(e[late.key]["p_miss"] * miss_cost)


# --- the policy file and the router -------------------------------------------------------------------------
def test_miss_cost_must_not_be_negative() -> None:
    text = DEMO_TEXT.replace("priority: 2, miss_cost_usd: 0.002}", "priority: 2, miss_cost_usd: -1}")
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "demo.yaml")
    assert info.value.path == "$.slo_classes.interactive.miss_cost_usd"
    assert {r.profile for r in POLICY.routes.values()} == {"money"} and "weighted" in POLICY.profiles


async def test_the_router_prices_misses_at_the_requests_class() -> None:
    from backends.sim.run import start_sim
    from tests.conftest import serve_router

    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    try:
        async with serve_router(POLICY, {"fast": [("f", sim.url)]}, expose_decision_header=True) as url, \
                httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {DEMO_KEY}"}) as c:
            body = {"model": "qwen3-1.7b", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            seen = {}
            for cls in ("interactive", "relaxed"):
                r = await c.post("/v1/chat/completions", json=body, headers={"x-tiergate-slo-class": cls})
                assert r.status_code == 200, r.text
                reasons = json.loads(r.headers["x-tiergate-decision"])["reasons"]
                seen[cls] = next(x for x in reasons if x.startswith("expected_money: "))
        assert "x $0.002)" in seen["interactive"] and "x $0.0002)" in seen["relaxed"], seen
    finally:
        await sim.close()


def test_an_unmeasured_tier_is_not_shunned_by_default() -> None:
    # the stack test's case: only long has been measured (a 50K prompt taught its prefill rate); balanced,
    # half its price, has served nothing yet. A prior of 0.1 per target would send it to long for good.
    r = req(20, 1, route_tiers=("balanced", "long"))
    cands = [cand("balanced", known=False), cand("long")]
    assert MONEY.decide(r, cands).chosen == cands[0]
    wary = ExpectedMoney(prior_miss_p=0.1)
    scores, why = wary.score(r, cands)
    assert scores[1] == 1.0 > scores[0] and "on long/l0" in why
