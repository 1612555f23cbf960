"""Replay at a time scale: a time-scaled profile is the live simulator's --time-scale, exactly."""

from __future__ import annotations

import pytest

from backends.sim.engine import Engine
from backends.sim.profile import get_profile, time_scaled
from policies.schema import load_policy, parse_policy
from router.replay.cluster import ClusterError, shape
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
