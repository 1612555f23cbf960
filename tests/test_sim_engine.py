"""Property tests of the simulator's engine model, stepped on a virtual clock (no sleeping)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from backends.sim.engine import Engine, SimRequest
from backends.sim.profile import get_profile


class VClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_engine(num_blocks: int | None = None, profile: str = "qwen3-1.7b-fp8") -> tuple[Engine, VClock]:
    clock = VClock()
    return Engine(get_profile(profile), num_gpu_blocks=num_blocks, clock=clock), clock


def run_until_done(engine: Engine, clock: VClock, reqs: list[SimRequest], max_steps: int = 200_000) -> None:
    for _ in range(max_steps):
        if all(r.finish_reason is not None for r in reqs):
            return
        batch = engine.schedule()
        clock.t += engine.step_time(batch) or engine.profile.step_overhead_s
        engine.commit(batch)
    raise AssertionError("engine did not finish")


def req(prompt: list[int], out: int = 4, rid: str = "r") -> SimRequest:
    return SimRequest(request_id=rid, prompt_ids=prompt, target_len=out, length_capped=True, rng=random.Random(1))


def ttft(r: SimRequest) -> float:
    assert r.first_token_at is not None
    return r.first_token_at - r.arrival


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 100_000) for _ in range(n)]


@settings(max_examples=15, deadline=None)
@given(st.integers(min_value=64, max_value=6000), st.integers(min_value=1, max_value=20000))
def test_ttft_grows_with_uncached_prompt_tokens(small: int, extra: int) -> None:
    e1, c1 = make_engine()
    a = req(tokens(small, 1))
    e1.add(a)
    run_until_done(e1, c1, [a])
    e2, c2 = make_engine()
    b = req(tokens(small + extra, 2))
    e2.add(b)
    run_until_done(e2, c2, [b])
    assert ttft(b) > ttft(a)


@settings(max_examples=10, deadline=None)
@given(st.integers(min_value=1, max_value=40))
def test_ttft_grows_with_queue_depth(depth: int) -> None:
    def last_ttft(n: int) -> float:
        eng, clock = make_engine()
        reqs = [req(tokens(6000, i), out=2, rid=str(i)) for i in range(n + 1)]
        for r in reqs:
            eng.add(r)
        run_until_done(eng, clock, reqs)
        return ttft(reqs[-1])

    assert last_ttft(depth) > last_ttft(0)


def test_repeated_long_prefix_is_cached_and_faster() -> None:
    eng, clock = make_engine()
    system = tokens(8000, 7)
    first = req(system + tokens(50, 8), rid="a")
    eng.add(first)
    run_until_done(eng, clock, [first])
    second = req(system + tokens(50, 9), rid="b")
    eng.add(second)
    run_until_done(eng, clock, [second])
    assert first.cached_tokens == 0
    assert second.cached_tokens == 8000  # every full block of the shared 8000-token prefix
    assert ttft(second) < ttft(first) / 3
    assert eng.stats.prefix_hits == 8000


def test_eviction_under_kv_pressure_removes_the_benefit() -> None:
    eng, clock = make_engine(num_blocks=700)  # 11,200 tokens of KV
    system = tokens(8000, 7)
    first = req(system + tokens(50, 8), rid="a")
    eng.add(first)
    run_until_done(eng, clock, [first])
    flood = req(tokens(10_000, 99), rid="flood")  # needs most of the cache: evicts the free prefix
    eng.add(flood)
    run_until_done(eng, clock, [flood])
    again = req(system + tokens(50, 9), rid="b")
    eng.add(again)
    run_until_done(eng, clock, [again])
    assert again.cached_tokens < 8000 // 4
    assert ttft(again) > ttft(first) * 0.7


def test_preemption_when_kv_runs_out_and_everyone_still_finishes() -> None:
    eng, clock = make_engine(num_blocks=80)  # 1,280 tokens
    reqs = [req(tokens(300, i), out=200, rid=str(i)) for i in range(4)]
    for r in reqs:
        eng.add(r)
    run_until_done(eng, clock, reqs)
    assert eng.stats.preemptions > 0
    assert all(len(r.output_ids) == 200 for r in reqs)
    assert eng.kv.usage == 0.0


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=1, max_value=120), st.integers(min_value=1, max_value=120))
def test_decode_step_slows_as_batch_grows(b1: int, extra: int) -> None:
    eng, _ = make_engine()

    def step(batch: int) -> float:
        fake = []
        for i in range(batch):
            r = req(tokens(1, i), rid=str(i))
            r.num_computed = 1024
            r.prompt_ids = [1] * 1024
            fake.append((r, 1))
        return eng.step_time(fake)

    assert step(b1 + extra) > step(b1)


def test_chunked_prefill_respects_token_budget() -> None:
    eng, clock = make_engine()
    r = req(tokens(20_000, 3))
    eng.add(r)
    batch = eng.schedule()
    assert sum(n for _, n in batch) == eng.profile.max_num_batched_tokens
    run_until_done(eng, clock, [r])
    assert r.finish_reason == "length"
