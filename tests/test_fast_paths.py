"""The hot paths that compute the decision in one pass give exactly (bit for bit) what the plain functions
give: `Predictor` and `ExpectedMoney.estimates` against `predict` / `money` / the predictor functions, the
`slo_feasible` lateness against them, and `max_score`'s tie handling against sorting by (total, hash)."""

from __future__ import annotations

import gc
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.plugins.expected_money import ExpectedMoney, money
from policies.plugins.max_score import MaxScore
from policies.plugins.slo_feasible import SloFeasible
from policies.predict import (
    Prediction,
    PredictParams,
    observed_batches,
    p_exceed,
    predict,
    predicted_tpot_s,
    predicted_ttft_s,
)
from policies.types import Candidate
from tests.test_money import POLICY, TIERS, cand, req

_cand = st.builds(
    lambda tier, i, known, cached, running, waiting, pr, pt, mean, gpu: cand(
        tier, str(i), known=known, cached_tokens=cached, running=running, waiting=waiting, pending_requests=pr,
        pending_tokens=pt, mean_uncached_tokens=mean, gpu_cost_per_hour=gpu),
    st.sampled_from(TIERS), st.integers(0, 5), st.booleans(), st.integers(-5, 5000), st.integers(-1, 40),
    st.integers(0, 20), st.integers(-1, 10), st.integers(0, 50_000), st.floats(1.0, 5000.0),
    st.sampled_from([0.0, 1.2, 3.5]))


def _plain_predict(r, cands, params):   # type: ignore[no-untyped-def]
    """policies/predict.py's `predict` as it was: function by function."""
    ref = observed_batches(cands)

    def miss(pred, target, cv):   # type: ignore[no-untyped-def]
        if target is None:
            return 0.0
        return params.prior_miss_p if pred is None else p_exceed(pred, target, cv)
    out = []
    for c in cands:
        ttft = predicted_ttft_s(r, c)
        tpot = predicted_tpot_s(c, ref[c.tier], params.decode_knee)
        batch = max(c.running, 0) + max(c.pending_requests, 0) + 1
        out.append(Prediction(ttft_s=ttft, tpot_s=tpot, batch=batch, p_ttft=miss(ttft, r.ttft_target_s, params.ttft_cv),
                              p_tpot=miss(tpot, r.tpot_target_s, params.tpot_cv)))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(_cand, min_size=1, max_size=12), st.sampled_from(["interactive", "relaxed", None]),
       st.integers(1, 20_000), st.sampled_from([None, 1, 265]), st.sampled_from([0.0, 0.5]),
       st.sampled_from([0.0, 0.1]), st.sampled_from(["both", "tokens", "gpu"]), st.sampled_from([None, 100]),
       st.sampled_from([1e-6, 0.3]))
def test_one_pass_equals_the_functions(cands: list[Candidate], cls: str | None, prompt: int, max_tokens: int | None,
                                       ttft_cv: float, prior: float, bill: str, cap: int | None,
                                       ttft_target: float) -> None:
    r = req(prompt, max_tokens, cls=cls)
    if cls is not None:
        r = req(prompt, max_tokens, cls=cls, ttft_target_s=ttft_target)
    params = PredictParams(ttft_cv=ttft_cv, prior_miss_p=prior)
    plain = _plain_predict(r, cands, params)
    assert predict(r, cands, params) == plain
    scorer = ExpectedMoney(bill=bill, output_tokens_cap=cap, ttft_cv=ttft_cv, prior_miss_p=prior)
    assert scorer.estimates(r, cands) == [money(r, c, p, bill, cap) for c, p in zip(cands, plain, strict=True)]
    f = SloFeasible(margin=0.9)
    ref = observed_batches(cands)
    want = []
    for c in cands:
        late = None
        for pred, target in ((predicted_ttft_s(r, c) if r.ttft_target_s is not None else None,
                              None if r.ttft_target_s is None else r.ttft_target_s * 0.9),
                             (predicted_tpot_s(c, ref[c.tier], 32.0) if r.tpot_target_s is not None else None,
                              None if r.tpot_target_s is None else r.tpot_target_s * 0.9)):
            if pred is not None and target is not None:
                x = pred / target - 1.0 if target > 0 else float("inf")
                late = x if late is None else max(late, x)
        want.append(late)
    assert f.lateness(r, cands) == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.5, 0.5 + 1e-12, 1.0, 2.0, -0.0]), min_size=1, max_size=20),
       st.sampled_from([1e-9, 0.0, 0.25]), st.sampled_from(["hash", "order"]), st.text(max_size=4))
def test_max_score_order_equals_sorting_by_total_then_hash(totals: list[float], eps: float, ties: str,
                                                          rid: str) -> None:
    cands = [cand(TIERS[i % 3], str(i)) for i in range(len(totals))]
    r = req(rid=rid)
    want = sorted(range(len(cands)), key=lambda i: (-round(totals[i] / eps) if eps > 0 else -totals[i],
                                                    i if ties == "order" else
                                                    zlib.crc32(f"{rid}/{cands[i].key}".encode())))
    assert MaxScore(epsilon=eps, ties=ties).pick(r, cands, totals)[0] == want


def test_replay_turns_automatic_gc_back_on() -> None:
    from router.replay.cluster import parse_assignments, shape
    from router.replay.driver import Replay
    from router.replay.synth import synth
    sizes = shape(POLICY, parse_assignments("fast=1,balanced=1,long=1", "--replicas"), {})
    assert gc.isenabled()
    Replay(POLICY, sizes).run(synth("mixed", 20, 1, rate=5.0))
    assert gc.isenabled()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.binary(min_size=1, max_size=2), min_size=1, max_size=8), min_size=1, max_size=3),
       st.integers(0, 3))
def test_affinity_bucket_order_equals_the_sort(records: list[list[bytes]], take: int) -> None:
    """A bucket keeps its records as they came; ordering gives the (-index, member) sort of their pairs (one
    record: reversed), and a record added after some were taken joins the rest in the same sort."""
    from router.replay.affinity_twin import _Index

    def key(e: tuple[int, bytes]) -> tuple[int, bytes]:
        return -e[0], e[1]
    idx = _Index()
    for hs in records:
        idx.add(5, hs)
    b = idx.buckets[5]
    b.order()
    assert b.entries == sorted([(i, m) for hs in records for i, m in enumerate(hs)], key=key)
    b.at = min(take, len(b.entries))
    rest = b.entries[b.at:]
    idx.add(5, [b"z", b"a"])
    b.order()
    assert b.entries == sorted([*rest, (0, b"z"), (1, b"a")], key=key)
