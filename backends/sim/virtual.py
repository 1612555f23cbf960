"""One simulated engine (backends/sim/engine.py) on virtual time, stepped by a discrete-event loop.

`VirtualEngine` runs the engine's own scheduler (`schedule_running`, `admit_waiting`), step-time model
(`step_time`) and commit (`commit`) on a clock it sets, with no asyncio and no sleeping: the driver calls
`wake(t)` at `wake_at` (the end of the step in progress: commit it, schedule the next), `add(req, hashes,
t)` to dispatch and `signals(t)` to scrape. First tokens and finishes go to the callbacks with their
times.

What makes it fast: decoding requests are kept out of `engine.running`, as a group whose progress is a
function of the step count. The V1 scheduler serves running requests first, in order, within the token
budget (vllm-project/vllm vllm/v1/core/sched/scheduler.py `Scheduler.schedule`, "First, schedule the
RUNNING requests" @ 00024d314514900f361ad072af6931e403b7f589), and a request decodes only once its
prefill is complete; requests enter `running` at its tail and finish their prefill in that order, so
`running` is always [decoders..., prefilling tail], every decoder gets exactly one token a step, and
(with `max_num_seqs` < `max_num_batched_tokens`) the budget never runs out before the prefilling tail.
A decoder therefore costs nothing per step: its computed tokens are `base + steps since it joined`,
finishes come off a heap, and its KV work (cache the block it just filled, allocate the next) comes off
another heap once every `block_size` steps. A step's time takes the decoders as a count and a context
sum (`step_time(batch, decode_seqs, decode_ctx)`). With no prefilling request (and nothing admissible
waiting), a run of decode steps up to the next finish is one event (a "jump"); its step ends are summed
exactly as single steps would be, and an arrival or scrape inside it splits it at the step in progress.
Where the shortcut would differ from the plain scheduler (a decoder's next block does not fit, so a
preemption is due; or a decoder behind a prefilling request), the step runs "exact": every decoder
goes back into `engine.running` and the engine's `schedule()` / `commit()` run unchanged.
tests/test_replay.py checks this against the plain per-step loop, request by request.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Callable

from backends.sim.engine import Engine, SimRequest
from backends.sim.gpu_time import charge

Event = Callable[[SimRequest, float], None]


class _Dec:
    """A decoding request: its computed tokens are base_nc + (steps - base_step)."""

    __slots__ = ("acc0", "base_nc", "base_out", "base_step", "cached", "fill")

    def __init__(self, base_nc: int, base_out: int, base_step: int, cached: int, fill: int) -> None:
        self.base_nc = base_nc
        self.base_out = base_out
        self.base_step = base_step
        self.cached = cached      # leading blocks already cached
        self.fill = fill          # the step count at which its last block is full
        self.acc0 = 0.0           # the group's per-decoder GPU time when it joined


class VirtualEngine:
    def __init__(self, engine: Engine, on_first_token: Event, on_finish: Event) -> None:
        self.engine = engine
        self.now = 0.0
        engine.clock = lambda: self.now
        engine.keep_latencies = False
        prof = engine.profile
        self.bs = prof.block_size
        self.on_first_token = on_first_token
        self.on_finish = on_finish
        self.steps = 0                              # completed steps
        self.dec: dict[SimRequest, _Dec] = {}       # decoders, in running order
        self.fins: list[tuple[int, int, SimRequest]] = []    # (finish step, seq, req)
        self.fills: list[tuple[int, int, SimRequest]] = []   # (fill step, seq, req)
        self.seq = 0
        self.ctx_base = 0                           # sum of base_nc - base_step over decoders
        self.batch: list[tuple[SimRequest, int]] = []   # the prefilling part of the step in progress
        self.exact = prof.max_num_seqs >= prof.max_num_batched_tokens   # the shortcut needs budget left
        self.exact_step = False                     # the step in progress runs the plain scheduler
        self.wake_at: float | None = None           # end of the step (or jump) in progress; None: idle
        self.jump: list[float] | None = None        # ends of a jump's steps (steps + 1 ...)
        self.jump_fills: list[tuple[int, int, SimRequest]] = []   # fills due inside the jump, in order
        self.jump_decs: list[SimRequest] = []       # decoders whose next fill the jump took off the heap
        self.busy_s = 0.0                           # time with work to do, up to its last idle moment
        self.busy_since: float | None = None
        self.dec_acc = 0.0                          # GPU time charged to each decoder of the group so far
        self.step_start = 0.0                       # when the step in progress began
        self.step_r = 0                             # the group's decoders in it

    # --- the driver's calls ---------------------------------------------------------------------
    def add(self, req: SimRequest, hashes: list[int], t: float) -> None:
        """Dispatch at `t`; it waits for the next schedule (at once when idle). May move `wake_at`."""
        self.sync(t, cut=True)
        self.now = t
        self.engine.add(req, hashes)
        if self.wake_at is None:    # idle: the engine loop wakes and schedules at once
            self._schedule(t)

    def signals(self, t: float) -> tuple[int, int, float]:
        """(running, waiting, KV usage) as /metrics would say at `t`."""
        self.sync(t)
        e = self.engine
        return len(self.dec) + len(e.running), len(e.waiting), e.kv.usage

    def wake(self, t: float) -> None:
        """The step (or jump) in progress ends at `t` (== wake_at): commit it, schedule the next."""
        self.now = t
        if self.jump is not None:
            self._end_jump()
        else:
            self._commit(t)
        self._schedule(t)

    def sync(self, t: float, cut: bool = False) -> None:
        """Materialize a jump's steps completed by `t`; `cut`: the step in progress ends the jump (a request
        arrived and joins at the next schedule)."""
        if self.jump is None:
            return
        done = bisect_right(self.jump, t)
        if done:
            self._charge_jump(done)
            self.steps += done
            self.engine.stats.steps += done
            self._jump_kv(self.steps)
            self.jump = self.jump[done:]
        if cut or len(self.jump) == 1:     # only the step in progress is left: a single step
            self.wake_at = self.jump[0]
            self.jump = None
            self._unjump_fills()

    # --- decoders ---------------------------------------------------------------------------
    def _join(self, req: SimRequest) -> None:
        s = self.steps
        d = _Dec(req.num_computed, req.n_output, s, req.num_computed // self.bs,
                 s + len(req.blocks) * self.bs - req.num_computed)
        d.acc0 = self.dec_acc
        self.dec[req] = d
        self.ctx_base += d.base_nc - s
        self.seq += 1
        heapq.heappush(self.fins, (s + req.target_len - req.n_output, self.seq, req))
        heapq.heappush(self.fills, (d.fill, self.seq, req))

    def _leave(self, req: SimRequest) -> None:
        """Back to a plain running request: its counts, blocks cached up to its computed tokens."""
        d = self.dec.pop(req)
        req.gpu_s += self.dec_acc - d.acc0
        self.ctx_base -= d.base_nc - d.base_step
        n = self.steps - d.base_step
        req.num_computed = d.base_nc + n
        req.n_output = d.base_out + n
        self.engine.stats.generation_tokens += n
        if n:
            req.last_token_at = self.now
        self._cache(req, d, req.num_computed // self.bs)

    def _cache(self, req: SimRequest, d: _Dec, upto: int) -> None:
        self.engine._cache_full_blocks(req, d.cached, upto)
        d.cached = max(d.cached, upto)

    def _fill(self, items: list[tuple[int, int, SimRequest]]) -> None:
        """Decoders whose last block filled (one item per fill, in step order): cache each full block and
        allocate the next (the caller counted them free). All allocations are made first: they only take
        blocks off the free list and the LRU head, which caching (of blocks in use) never touches. (The one
        difference: a decoder's block whose exact content an evictable block also holds is cached if that
        block is evicted by the same batch; decoders' outputs are their own, so it does not arise.)"""
        got = self.engine.kv.allocate(len(items))
        assert got is not None, "a decoder's next blocks were counted free"
        per: dict[SimRequest, int] = {}
        for _, _, req in items:
            per[req] = per.get(req, 0) + 1
        at, bs = 0, self.bs
        for req, n in per.items():
            d = self.dec[req]
            req.blocks.extend(got[at:at + n])
            at += n
            d.fill += n * bs
            self._cache(req, d, len(req.blocks) - 1)   # every block but the newest is full

    def _push_fill(self, req: SimRequest, d: _Dec) -> None:
        self.seq += 1
        heapq.heappush(self.fills, (d.fill, self.seq, req))

    def _due_fills(self, upto: int, heap: list[tuple[int, int, SimRequest]]) -> list[tuple[int, int, SimRequest]]:
        out = []
        while heap and heap[0][0] <= upto:
            item = heapq.heappop(heap)
            d = self.dec.get(item[2])
            if d is not None and d.fill == item[0]:
                out.append(item)
        return out

    # --- steps ------------------------------------------------------------------------------
    def _commit(self, t: float) -> None:
        e = self.engine
        if self.exact_step:
            self._commit_exact(t)
            return
        self.dec_acc += charge(e.stats, self.batch, t - self.step_start, self.step_r)
        self.steps += 1
        e.stats.steps += 1
        while self.fins and self.fins[0][0] <= self.steps:
            _, _, req = heapq.heappop(self.fins)
            if req in self.dec:
                self._leave(req)
                e._finish(req, "length" if req.length_capped else "stop")
                self.on_finish(req, t)
        batch, self.batch = self.batch, []
        if not batch:
            return
        firsts = [r.first_token_at is None for r, _ in batch]
        e.commit(batch)
        self._events(batch, firsts, t)
        self._relazify()

    def _commit_exact(self, t: float) -> None:
        e = self.engine
        self.exact_step = False
        charge(e.stats, self.batch, t - self.step_start)
        self.steps += 1
        e.stats.steps += 1
        batch, self.batch = self.batch, []
        firsts = [r.first_token_at is None for r, _ in batch]
        e.commit(batch)
        self._events(batch, firsts, t)
        self._relazify()

    def _events(self, batch: list[tuple[SimRequest, int]], firsts: list[bool], t: float) -> None:
        for (req, _), first in zip(batch, firsts, strict=True):
            if first and req.first_token_at is not None:
                self.on_first_token(req, t)
            if req.finish_reason is not None and req.finished_at == t and not req.is_running:
                self.on_finish(req, t)

    @staticmethod
    def _decoding(req: SimRequest) -> bool:
        return req.is_running and req.first_token_at is not None and req.num_computed == req.total_len - 1

    def _relazify(self) -> None:
        """Move the decoders at the head of `running` into the group; a decoder behind a prefilling request
        keeps the next step exact."""
        running = self.engine.running
        i = 0
        while i < len(running) and self._decoding(running[i]):
            i += 1
        self.exact = self.engine.profile.max_num_seqs >= self.engine.profile.max_num_batched_tokens or \
            any(self._decoding(r) for r in running[i:])
        if self.exact and self.dec:
            return
        if not self.exact:
            for req in running[:i]:
                self._join(req)
            del running[:i]

    def _materialize(self) -> None:
        e = self.engine
        reqs = list(self.dec)
        for req in reqs:
            self._leave(req)
        e.running[:0] = reqs
        self.fins.clear()
        self.fills.clear()

    def _schedule(self, t: float) -> None:
        e = self.engine
        self.now = t
        self.step_start, self.step_r = t, 0
        if not self.dec and not e.running and not e.waiting:
            if self.busy_since is not None:
                self.busy_s += t - self.busy_since
                self.busy_since = None
            self.wake_at = None
            return
        if self.busy_since is None:
            self.busy_since = t
        r = len(self.dec)
        due = self._due_fills(self.steps, self.fills)
        if self.exact or len(due) > e.kv.num_free:
            for item in due:
                heapq.heappush(self.fills, item)
            self._materialize()
            self.batch = e.schedule()
            self.exact_step = True
            dt = e.step_time(self.batch) if self.batch else e.profile.step_overhead_s
            self.wake_at = t + dt
            return
        if due:
            self._fill(due)
            for _, _, req in due:
                self._push_fill(req, self.dec[req])
        out: list[tuple[SimRequest, int]] = []
        self.step_r = r
        budget, preempted = e.schedule_running(e.profile.max_num_batched_tokens - r, out)
        if not preempted:
            e.admit_waiting(budget, out, r)
        self.batch = out
        if not out and not r:
            self.wake_at = t + e.profile.step_overhead_s   # nothing fits (KV full of queued prefixes)
            return
        end = t + e.step_time(out, r, self.ctx_base + r * self.steps)
        self.wake_at = end
        if not out and not e.running and (not e.waiting or r >= e.profile.max_num_seqs):
            self._plan_jump(end)

    def _plan_jump(self, end: float) -> None:
        """Decode-only steps up to the next finish as one event (fewer when their blocks would not fit)."""
        while self.fins and self.fins[0][2] not in self.dec:
            heapq.heappop(self.fins)
        s, bs = self.steps, self.bs
        k = self.fins[0][0] - s
        if k <= 1:
            return
        firsts = self._due_fills(s + k - 1, self.fills)
        items = []                       # every fill inside the jump: allocations at steps s+2 .. s+k
        for f0, seq, req in firsts:
            for f in range(f0, s + k, bs):
                items.append((f, seq, req))
        items.sort(key=lambda x: (x[0], x[1]))
        free = self.engine.kv.num_free
        if len(items) > free:
            k = items[free][0] - s           # end at the boundary where the next block is short
            items = [x for x in items if x[0] < s + k]
            if k <= 1:
                for item in firsts:
                    heapq.heappush(self.fills, item)
                return
        prof = self.engine.profile
        r = len(self.dec)
        linear = max(prof.decode_weight_read_s, r / prof.prefill_tokens_per_s)
        base = prof.step_overhead_s + linear + r * prof.decode_per_seq_s + 0.0 * prof.prefill_attn_s_per_token_ctx
        kvb, hbm = prof.kv_bytes_per_token, prof.hbm_bytes_per_s
        ctx = self.ctx_base + r * s
        ends = [end]
        for j in range(1, k):            # the same sums, in the same order, as k single steps
            end += base + (ctx + r * j) * kvb / hbm
            ends.append(end)
        self.jump = ends
        self.jump_fills = items
        self.jump_decs = [req for _, _, req in firsts]
        self.wake_at = end

    def _charge_jump(self, done: int) -> None:
        """Charge the first `done` steps of the jump in progress (decode only: the group shares each)."""
        assert self.jump is not None
        stats, r, start = self.engine.stats, self.step_r, self.step_start
        for end in self.jump[:done]:
            self.dec_acc += charge(stats, (), end - start, r)
            start = end
        self.step_start = start

    def _jump_kv(self, upto: int) -> None:
        """A jump's block work for fills up to step `upto` (cache the full block, allocate the next)."""
        fills = self.jump_fills
        n = bisect_right(fills, upto, key=lambda x: x[0])
        if n:
            self._fill(fills[:n])
            del fills[:n]

    def _unjump_fills(self) -> None:
        for req in self.jump_decs:
            d = self.dec.get(req)
            if d is not None:
                self._push_fill(req, d)
        self.jump_fills, self.jump_decs = [], []

    def _end_jump(self) -> None:
        assert self.jump is not None
        n = len(self.jump)
        self._charge_jump(n - 1)
        self.steps += n - 1              # the last step is committed below, as a single step
        self.engine.stats.steps += n - 1
        self._jump_kv(self.steps)
        self.jump = None
        self._unjump_fills()
        self._commit(self.now)
