"""A continuous-batching engine model of one vLLM instance (V1 scheduler shape).

Each step the scheduler first serves running requests (1 decode token each, or the
next prefill chunk), then admits waiting requests in arrival order while the step's
token budget (`max_num_batched_tokens`) and `max_num_seqs` allow. Prompts are
prefilled in chunks when `chunked_prefill` is on. KV blocks come from `KVCache`;
a prompt's cached prefix is skipped. When a running request needs a block and none
is free, the most recently admitted running request is preempted (its blocks freed,
it goes back to the head of the queue and is recomputed later).

Step time is roofline-shaped:
    t = step_overhead
      + max(decode_weight_read, (prefill_tokens + decode_seqs) / prefill_tokens_per_s)
      + decode_seqs * decode_per_seq
      + sum(chunk * (ctx_before + chunk / 2)) * prefill_attn_s_per_token_ctx
      + decode_kv_tokens * kv_bytes_per_token / hbm_bytes_per_s
all multiplied by `time_scale` (1.0 = real time) and by a slow-start factor.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from backends.sim.gpu_time import charge
from backends.sim.kvcache import KVCache, block_hashes
from backends.sim.profile import SimProfile

Clock = Callable[[], float]


@dataclass(eq=False)
class SimRequest:
    request_id: str
    prompt_ids: list[int]
    target_len: int
    length_capped: bool  # True when target_len comes from max_tokens / context, not EOS
    output_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    cached_tokens: int = -1
    arrival: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    preemptions: int = 0
    is_running: bool = False
    rng: random.Random = field(default_factory=random.Random)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    n_output: int = 0      # output tokens generated (== len(output_ids) when token_ids)
    gpu_s: float = 0.0     # GPU time charged to it (backends/sim/gpu_time.py)
    token_ids: bool = True  # False: output tokens are counted, not drawn (replay: `prompt_ids` may be a range
    #                         and `hashes` given, so no token id is ever needed)

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + self.n_output

    def token_at(self, i: int) -> int:
        p = len(self.prompt_ids)
        return self.prompt_ids[i] if i < p else self.output_ids[i - p]


def _block_tokens(req: SimRequest, bi: int, bs: int) -> list[int]:
    return [req.token_at(j) for j in range(bi * bs, (bi + 1) * bs)]


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    delivered_tokens: int = 0     # generated tokens that were written to a client (an abort can strand some)
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0
    steps: int = 0
    gpu_busy_s: float = 0.0       # the summed durations of steps that served anything (backends/sim/gpu_time.py)
    success: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    queue_time: list[float] = field(default_factory=list)

    def drain(self) -> tuple[list[float], list[float], list[float], list[float]]:
        out = (self.ttft, self.itl, self.e2e, self.queue_time)
        self.ttft, self.itl, self.e2e, self.queue_time = [], [], [], []
        return out


class Engine:
    def __init__(
        self,
        profile: SimProfile,
        *,
        num_gpu_blocks: int | None = None,
        time_scale: float = 1.0,
        output_vocab: Sequence[int] = (),
        clock: Clock = time.monotonic,
        enable_prefix_caching: bool = True,
        keep_latencies: bool = True,
    ) -> None:
        self.profile = profile
        self.keep_latencies = keep_latencies   # per-token latency samples for /metrics (replay: off)
        self.time_scale = time_scale
        self.clock = clock
        self.kv = KVCache(num_gpu_blocks or profile.num_gpu_blocks, profile.block_size, enable_prefix_caching)
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.stats = EngineStats()
        self.output_vocab = list(output_vocab) or list(range(1000, 3000))
        self.slow_factor: Callable[[], float] = lambda: 1.0
        self._blocked: tuple[SimRequest, int, int, int, object] | None = None   # see _still_blocked
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # --- requests -------------------------------------------------------------
    def add(self, req: SimRequest, hashes: list[int] | None = None) -> None:
        """`hashes`: the request's block hashes when the caller has them (replay: prompt and output)."""
        req.arrival = self.clock()
        bs = self.profile.block_size
        req.hashes = block_hashes(req.prompt_ids, bs) if hashes is None else hashes
        self.waiting.append(req)
        self._wake.set()

    def abort(self, req: SimRequest) -> None:
        if req.finish_reason is not None:
            return
        if req.is_running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._finish(req, "abort")

    def target_length(self, rng: random.Random, prompt_len: int, max_tokens: int | None,
                      ignore_eos: bool) -> tuple[int, bool]:
        room = self.profile.max_model_len - prompt_len
        cap = room if max_tokens is None else min(max_tokens, room)
        if ignore_eos:
            return max(cap, 0), True
        mu = math.log(self.profile.output_len_mean) - self.profile.output_len_sigma ** 2 / 2
        natural = max(1, int(rng.lognormvariate(mu, self.profile.output_len_sigma)))
        return (cap, True) if natural >= cap else (natural, False)

    # --- scheduling -------------------------------------------------------------
    def _ensure_blocks(self, req: SimRequest, upto_tokens: int) -> bool:
        need = -(-upto_tokens // self.profile.block_size) - len(req.blocks)
        if need <= 0:
            return True
        got = self.kv.allocate(need)
        if got is None:
            return False
        req.blocks.extend(got)
        return True

    def _preempt(self, victim: SimRequest) -> None:
        self.running.remove(victim)
        victim.is_running = False
        self.kv.free(victim.blocks)
        victim.blocks = []
        victim.num_computed = 0
        victim.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(victim)

    def schedule(self) -> list[tuple[SimRequest, int]]:
        out: list[tuple[SimRequest, int]] = []
        budget, preempted = self.schedule_running(self.profile.max_num_batched_tokens, out)
        if not preempted:
            self.admit_waiting(budget, out)
        return out

    def schedule_running(self, budget: int, out: list[tuple[SimRequest, int]]) -> tuple[int, bool]:
        """The running requests first, in order, within the token budget (preempting the last on a KV
        shortage); -> (budget left, whether anything was preempted)."""
        preempted = False
        for req in list(self.running):
            if budget <= 0:
                break
            if not req.is_running:
                continue  # preempted below
            n = min(req.total_len - req.num_computed, budget)
            while not self._ensure_blocks(req, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    n = 0
                    break
            if n > 0:
                self._cache_scheduled(req, n)
                out.append((req, n))
                budget -= n
        return budget, preempted

    def _cache_scheduled(self, req: SimRequest, n: int) -> None:
        """As vLLM V1 does when it schedules a request (vllm-project/vllm @ ace980e6de0540f49b0c63248437a1a7807590c1,
        vllm/v1/core/kv_cache_manager.py `KVCacheManager.allocate_slots`: `cache_blocks(request,
        min(total_computed_tokens + num_new_tokens, request.num_tokens))`, before the forward pass): the
        prompt's full blocks this step will compute go into the prefix cache now, so a request scheduled
        after it, in this step or while it is still in chunked prefill, reuses them. (Output blocks are
        cached as their step commits, `commit`.)"""
        bs = self.profile.block_size
        upto = min(req.num_computed + n, len(req.prompt_ids))
        self._cache_full_blocks(req, req.num_computed // bs, upto // bs)

    def admit_waiting(self, budget: int, out: list[tuple[SimRequest, int]], others: int = 0) -> None:
        """Then waiting requests in arrival order while the budget and `max_num_seqs` allow (`others`: running
        requests that are not in `self.running`, backends/sim/virtual.py's decoders)."""
        prof = self.profile
        while self.waiting and budget > 0 and len(self.running) + others < prof.max_num_seqs:
            req = self.waiting[0]
            if not req.blocks and req.num_computed == 0:
                if self._still_blocked(req, budget):
                    break
                hit = self.kv.match(req.hashes)
                max_hit = (req.total_len - 1) // prof.block_size
                watch = req.hashes[len(hit)] if len(hit) < min(max_hit, len(req.hashes)) else None
                hit = hit[:max_hit]
                first = req.cached_tokens < 0
                self.kv.touch(hit)
                req.blocks = list(hit)
                req.num_computed = len(hit) * prof.block_size
                if first:
                    req.cached_tokens = req.num_computed
                    self.stats.prefix_queries += len(req.prompt_ids)
                    self.stats.prefix_hits += req.num_computed
            remaining = req.total_len - req.num_computed
            n = min(remaining, budget)
            if n < remaining and not prof.chunked_prefill:
                break
            if not self._ensure_blocks(req, req.num_computed + n):
                # Give its prefix hits back so a waiting request never pins blocks.
                self.kv.free(req.blocks)
                req.blocks = []
                req.num_computed = 0
                if req.cached_tokens >= 0 and prof.chunked_prefill:
                    self._blocked = (req, self.kv.gen_free, self.kv.gen_touch, budget, watch)
                break
            self.waiting.popleft()
            self.running.append(req)
            req.is_running = True
            if self.keep_latencies:
                self.stats.queue_time.append(self.clock() - req.arrival)
            self._cache_scheduled(req, n)
            out.append((req, n))
            budget -= n

    def _still_blocked(self, req: SimRequest, budget: int) -> bool:
        """The head request failed to get its blocks, and trying again now would change nothing and fail
        again: since then no block was freed (nothing went back to the LRU queue, none came free), none was
        touched, the hash its prefix match stopped at is still not cached, and the token budget is not
        smaller. Its last try left its prefix hits at the queue's tail in their order, and allocations since
        only took blocks from the queue's head, so matching, touching and freeing them again would leave
        every block where it is. (The replay retries a blocked request every step; this keeps that free.)"""
        b = self._blocked
        if b is None or b[0] is not req:
            return False
        kv = self.kv
        return b[1] == kv.gen_free and b[2] == kv.gen_touch and budget >= b[3] and \
            (b[4] is None or not kv.has(b[4]))

    def step_time(self, batch: Sequence[tuple[SimRequest, int]], decode_seqs: int = 0, decode_ctx: int = 0) -> float:
        """`decode_seqs`, `decode_ctx`: decoding requests not in `batch` and their computed tokens (virtual.py)."""
        prof = self.profile
        prefill_tokens = 0
        attn = 0.0
        for req, n in batch:
            if n == 1 and req.num_computed >= len(req.prompt_ids):
                decode_seqs += 1
                decode_ctx += req.num_computed
            else:
                prefill_tokens += n
                attn += n * (req.num_computed + n / 2)
        if not batch and not decode_seqs:
            return 0.0
        linear = max(prof.decode_weight_read_s, (prefill_tokens + decode_seqs) / prof.prefill_tokens_per_s)
        t = (prof.step_overhead_s + linear + decode_seqs * prof.decode_per_seq_s
             + attn * prof.prefill_attn_s_per_token_ctx
             + decode_ctx * prof.kv_bytes_per_token / prof.hbm_bytes_per_s)
        return t

    def commit(self, batch: Sequence[tuple[SimRequest, int]]) -> None:
        now = self.clock()
        bs = self.profile.block_size
        for req, n in batch:
            if not req.is_running:
                continue
            before = req.num_computed
            req.num_computed += n
            self._cache_full_blocks(req, before // bs, req.num_computed // bs)
            if req.num_computed < req.total_len:
                continue
            if req.first_token_at is None:
                req.first_token_at = now
                if self.keep_latencies:
                    self.stats.ttft.append(now - req.arrival)
                self.stats.prompt_tokens += len(req.prompt_ids)
            elif req.last_token_at is not None and self.keep_latencies:
                self.stats.itl.append(now - req.last_token_at)
            if req.n_output >= req.target_len:
                self.running.remove(req)
                self._finish(req, "length" if req.length_capped else "stop")
                continue
            if req.token_ids:
                req.output_ids.append(self.output_vocab[req.rng.randrange(len(self.output_vocab))])
            req.n_output += 1
            req.last_token_at = now
            self.stats.generation_tokens += 1
            if req.n_output >= req.target_len:
                self.running.remove(req)
                self._finish(req, "length" if req.length_capped else "stop")
            else:
                req.event.set()

    def _cache_full_blocks(self, req: SimRequest, a: int, b: int) -> None:
        """Blocks [a, b) of `req` are full: cache them under their chained hashes (and tell the listener)."""
        if a >= b:
            return
        if self.kv.listener is None and b <= len(req.hashes):
            self.kv.cache_run(req.blocks, req.hashes, a, b)
            return
        bs = self.profile.block_size
        for bi in range(a, b):
            h = req.hashes[bi] if bi < len(req.hashes) else self._extend_hash(req, bi)
            if self.kv.listener is None:
                self.kv.cache_block(req.blocks[bi], h)
            else:
                self.kv.cache_block(req.blocks[bi], h, req.hashes[bi - 1] if bi else None,
                                    functools.partial(_block_tokens, req, bi, bs))

    def _extend_hash(self, req: SimRequest, bi: int) -> int:
        bs = self.profile.block_size
        parent = req.hashes[-1] if req.hashes else 0x5EED
        while len(req.hashes) <= bi:
            i = len(req.hashes)
            parent = hash((parent, tuple(req.token_at(j) for j in range(i * bs, (i + 1) * bs))))
            req.hashes.append(parent)
        return req.hashes[bi]

    def _finish(self, req: SimRequest, reason: str) -> None:
        req.finish_reason = reason
        req.is_running = False
        req.finished_at = self.clock()
        self.kv.free(req.blocks)
        req.blocks = []
        self.stats.success[reason] = self.stats.success.get(reason, 0) + 1
        if self.keep_latencies:
            self.stats.e2e.append(req.finished_at - req.arrival)
        req.event.set()

    # --- loop -----------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            batch = self.schedule()
            work = self.step_time(batch) * self.slow_factor()
            charge(self.stats, batch, work)   # the modelled GPU time, whatever the time scale
            dt = work * self.time_scale
            if not batch:
                # Nothing fits (KV full of queued prefixes): wait a step's worth.
                dt = self.profile.step_overhead_s * self.time_scale
            await asyncio.sleep(dt)
            self.stats.steps += 1
            self.commit(batch)
