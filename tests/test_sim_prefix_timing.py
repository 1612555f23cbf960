"""The simulator registers a request's full blocks in its prefix cache when it schedules them, as vLLM V1
does (#14: simulator fidelity).

vLLM V1 (vllm-project/vllm @ ace980e6de0540f49b0c63248437a1a7807590c1, vllm/v1/core/sched/scheduler.py
`Scheduler.schedule` and vllm/v1/core/kv_cache_manager.py `KVCacheManager.allocate_slots`, which ends with
`num_tokens_to_cache = min(total_computed_tokens + num_new_tokens, request.num_tokens)` and
`self.coordinator.cache_blocks(request, num_tokens_to_cache)`): a request's new blocks are allocated
and, with prefix caching on, its full blocks up to `num_computed_tokens + num_new_tokens` are cached
(`coordinator.cache_blocks`) in the same call, before the step's forward pass runs. A later request
scheduled afterwards, in the same step or while the first is still in chunked prefill, finds them in
`get_computed_blocks`. Another instance has its own cache and recomputes them."""

from __future__ import annotations

import random

from backends.sim.engine import Engine, SimRequest
from backends.sim.profile import get_profile

PROF = get_profile("qwen3-1.7b-fp8")      # block 16, max_num_batched_tokens 8192, chunked prefill


def req(name: str, ids: list[int], out: int = 4) -> SimRequest:
    return SimRequest(request_id=name, prompt_ids=ids, target_len=out, length_capped=True, token_ids=False)


def doc(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 90_000) for _ in range(n)]


def test_same_step_a_later_request_reuses_the_blocks_an_earlier_one_was_just_scheduled_for() -> None:
    e = Engine(PROF, keep_latencies=False)
    shared = doc(2000)
    a, b = req("a", shared + doc(40, 2)), req("b", shared + doc(40, 3))
    e.add(a)
    e.add(b)
    batch = e.schedule()                                 # both fit one step's 8,192-token budget
    assert [r.request_id for r, _ in batch] == ["a", "b"]
    assert a.cached_tokens == 0 and b.cached_tokens == 2000 // 16 * 16   # a's full shared blocks, this step


def test_during_chunked_prefill_a_new_request_reuses_the_chunks_scheduled_so_far() -> None:
    e = Engine(PROF, keep_latencies=False)
    long = doc(20_000)
    a = req("a", long + doc(10, 2))
    e.add(a)
    for _ in range(2):                                   # a's first two chunks of 8,192 tokens run
        step = e.schedule()
        assert step == [(a, 8192)]
        e.commit(step)
    b = req("b", long + doc(10, 3))
    e.add(b)
    third = e.schedule()                                 # a's last chunk, then b in the budget left
    assert [r.request_id for r, _ in third] == ["a", "b"]
    assert b.cached_tokens == 20_000                     # a's third chunk counts: scheduled just before b


def test_another_instance_recomputes_the_prefix() -> None:
    shared = doc(4000)
    e1, e2 = Engine(PROF, keep_latencies=False), Engine(PROF, keep_latencies=False)
    a, b = req("a", shared + doc(8, 2)), req("b", shared + doc(8, 3))
    e1.add(a)
    e1.commit(e1.schedule())
    e2.add(b)
    e2.schedule()
    assert b.cached_tokens == 0
