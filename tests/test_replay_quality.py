"""Replay measures what live does: a time-scaled profile is the live simulator's --time-scale, exactly;
a prefix is recorded in the affinity index as its request is sent, so the next request with it follows."""

from __future__ import annotations

import pytest

from backends.sim.engine import Engine
from backends.sim.profile import get_profile, time_scaled
from policies.schema import load_policy, parse_policy
from router.replay.cluster import ClusterError, shape
from router.replay.driver import Replay
from router.replay.trace import Prefix, TraceRequest
from tests.test_replay import DEMO, _sim, _workload


@pytest.mark.parametrize("profile", ["qwen3-1.7b-fp8", "qwen3-4b-mixed", "qwen3-4b-256k"])
@pytest.mark.parametrize("scale", [0.5, 2.0, 3.7])
def test_a_scaled_profile_steps_exactly_scale_times_as_long(profile: str, scale: float) -> None:
    prof = get_profile(profile)
    engine, scaled = Engine(prof, keep_latencies=False), Engine(time_scaled(prof, scale), keep_latencies=False)
    for i, (_, ids, out) in enumerate(_workload(3, 40)):
        r, h = _sim(i, ids, out, prof.block_size)
        engine.add(r, h)
    seen = 0
    while engine.running or engine.waiting:
        batch = engine.schedule()
        assert scaled.step_time(batch) == pytest.approx(scale * engine.step_time(batch), rel=1e-12)
        engine.commit(batch)
        seen += bool(batch)
    assert seen > 10
    assert time_scaled(prof, scale).step_overhead_s == pytest.approx(scale * prof.step_overhead_s)
    assert time_scaled(prof, 1.0) is prof


def test_replay_runs_each_tier_at_its_policy_time_scale_or_the_override() -> None:
    text = DEMO.read_text().replace("simulate: {profile: qwen3-1.7b-fp8, replicas: 1}",
                                    "simulate: {profile: qwen3-1.7b-fp8, replicas: 1, time_scale: 4}")
    pol = parse_policy(text)
    sizes = shape(pol, {}, {})
    base = get_profile("qwen3-1.7b-fp8").prefill_tokens_per_s
    assert sizes["fast"][0].prefill_tokens_per_s == pytest.approx(base / 4)
    assert sizes["balanced"][0] == get_profile("qwen3-4b-mixed")
    over = shape(pol, {}, {}, 2.0)
    assert over["fast"][0].prefill_tokens_per_s == pytest.approx(base / 2)
    assert over["long"][0].name.endswith("@x2")
    with pytest.raises(ClusterError, match="time-scale"):
        shape(load_policy(DEMO), {}, {}, 0.0)


def test_a_prefix_is_recorded_as_its_request_is_sent_so_the_next_one_follows_it() -> None:
    """Six documents, each asked twice 50 ms apart on a 2-instance long tier: the second question arrives
    while the first is still queued or prefilling (30K tokens take ~0.6 s), and goes where the document is
    going, where the engine has its blocks by the time it schedules the second (vLLM registers a
    request's full blocks as it schedules them). Recorded only at the first token, each second question
    would find no index entry yet and land on either instance by the tie-break hash."""
    pol = load_policy(DEMO)
    trace = [TraceRequest(t=10.0 * d + 0.05 * k, tenant="demo", model="qwen3-4b-long", slo="relaxed",
                          prompt=30_000 + 40, output=20, prefix=(Prefix(f"doc-{d}", 30_000),), id=f"d{d}q{k}")
             for d in range(6) for k in range(2)]
    run = Replay(pol, shape(pol, {"fast": "0", "balanced": "0", "long": "2"}, {}), decision_records=100)
    res = run.run(trace)
    assert run.records is not None
    for d in range(6):
        a, b = run.records.lookup(f"d{d}q0"), run.records.lookup(f"d{d}q1")
        assert a is not None and b is not None
        # the blocks the first has been scheduled for so far (its chunked prefill may still be running)
        assert a.instance == b.instance and b.cached_tokens >= 8192, (d, a.instance, b.instance, b.cached_tokens)
    assert res.cached >= 6 * 8192


def test_replay_runs_the_admission_gate_when_windows_are_on() -> None:
    """The same Gate as the live router, on the virtual clock: a burst of documents closes the windows of a
    2-instance long tier; later requests wait, are released as windows open (or bypass at their class's
    max_queue_ms), every one is served, and two runs agree to the byte."""
    text = DEMO.read_text().replace("max_model_len: 262144\n",
                                    "max_model_len: 262144\n    prefill_tokens_per_s: 52600\n")
    text += "\nadmission: {windows: true}\n"     # (a window needs the tier's prefill rate: seeded here)
    pol = parse_policy(text)
    trace = [TraceRequest(t=0.01 * k, tenant="demo", model="qwen3-4b-long", slo="relaxed",
                          prompt=30_000 + 40 * k, output=20, prefix=(Prefix(f"doc-{k}", 30_000),), id=f"d{k}")
             for k in range(12)]
    runs = []
    for _ in range(2):
        run = Replay(pol, shape(pol, {"fast": "0", "balanced": "0", "long": "2"}, {}))
        runs.append(run.run(trace).summary())
    s = runs[0]
    assert runs[0] == runs[1]
    assert s["served"] == 12 and s["queue"]["released"] + s["queue"].get("bypassed", 0) >= 8
    assert s["queue"]["wait_p99_s"] > 0.1
