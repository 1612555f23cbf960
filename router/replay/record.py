"""Record the live router's traffic as a replay trace (router/replay/trace.py): opt-in, no prompt text.

`TIERGATE_RECORD_TRACE=/path/trace.jsonl` makes `tiergate serve` append one line per served request:
its arrival (seconds since the recording started), tenant, route, SLO class (and targets where headers
set them), max_tokens, whether it streamed, prompt and completion tokens, and its shared prefix as salted
block hashes. Prefixes come from the affinity hashes the router already computed for the request's first
tier with an index (router/prefix_hash.py: chained hashes over the token ids of every full KV block,
sampled at fixed positions): the blocks up to each recorded position become one prefix group, whose id
is blake2b-64 of the chained hash keyed by a secret drawn when the recording starts (never written, so
the ids can't be matched against hashes of guessed prompts). Two requests share exactly the groups
they share blocks for: block-exact for the first 16 sampled positions (256 tokens), then every 8th
sampled position (the router's sampling resolution, coarser further out), at most ~80 groups a line. The
prompt's tokens after the last recorded position are its own. Not recorded: a follow-up turn's reuse
of the previous answer's blocks (`continues`), which only the engine knows; a request whose tiers keep no
affinity index has no prefix groups.

The core calls `begin` when a request is admitted and `end` at its close-out (router/lifecycle/core.py),
which only encodes the line into a bounded buffer (`max_buffered` lines; beyond it lines are dropped and
counted). `run` (owned by the app's lifespan) writes, every `interval_s` and on a worker thread, the
lines of every request that arrived before the earliest one still open, so the file stays in arrival
order; `aclose` writes the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from router.budget_store import Usage
from router.lifecycle.core import Pending
from router.relay import Outcome
from router.replay.trace import Prefix, TraceRequest, encode_line

ENV = "TIERGATE_RECORD_TRACE"
DENSE = 16      # leading sampled positions recorded one by one
EVERY = 8       # then every 8th sampled position


class TraceRecorder:
    def __init__(self, path: Path, *, interval_s: float = 1.0, max_buffered: int = 100_000) -> None:
        self.path = path
        self.interval_s = interval_s
        self.max_buffered = max_buffered
        self.start = time.perf_counter()
        self._salt = os.urandom(16)
        self._open: dict[int, float] = {}               # admitted, not closed: id(Pending) -> arrival
        self._done: list[tuple[float, int, bytes]] = []  # closed, waiting for every earlier arrival to close
        self._seq = 0
        self.dropped = 0
        self.written = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tiergate-trace")
        path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_env(cls) -> TraceRecorder | None:
        path = os.environ.get(ENV)
        return cls(Path(path)) if path else None

    def _gid(self, h: bytes) -> str:
        return hashlib.blake2b(h, key=self._salt, digest_size=8).hexdigest()

    def begin(self, p: Pending) -> None:
        """Admitted (router/lifecycle/core.py `admit`): its line waits for it to close."""
        self._open[id(p)] = p.t0

    def end(self, p: Pending, out: Outcome, usage: Usage) -> None:
        """Closed out: encode its line (a served one) and buffer it; cheap, on the request path."""
        self._open.pop(id(p), None)
        if out.status != 200 or out.tier is None:
            return
        if len(self._done) >= self.max_buffered:
            self.dropped += 1
            return
        self._seq += 1
        t = round(max(p.t0 - self.start, 0.0), 6)
        heapq.heappush(self._done, (t, self._seq, encode_line(self._line(p, out, usage, t))))

    def _line(self, p: Pending, out: Outcome, u: Usage, t: float) -> TraceRequest:
        prefix: list[Prefix] = []
        ph = next((p.hashes[x] for x in p.tiers if x in p.hashes and p.hashes[x].hashes), None)
        if ph is not None:
            prev, shared, last = -1, 0, len(ph.positions) - 1
            for i, pos in enumerate(ph.positions):
                if i < DENSE or (i + 1) % EVERY == 0 or i == last:
                    tokens = (pos - prev) * ph.block_size
                    if shared + tokens > u.prompt:
                        break
                    prefix.append(Prefix(self._gid(ph.hashes[i]), tokens))
                    prev, shared = pos, shared + tokens
        r = p.rreq
        cls = p.view.policy.slo_classes.get(r.slo_class)

        def own(target: float | None, of_class: float | None) -> float | None:   # a header's target, in ms
            return None if target is None or target == of_class else target * 1000

        return TraceRequest(t=t, tenant=p.tenant, model=p.route, slo=r.slo_class if cls else "",
                            ttft_ms=own(r.ttft_target_s, cls.ttft_ms / 1000.0 if cls else None),
                            tpot_ms=own(r.tpot_target_s, cls.tpot_ms / 1000.0 if cls else None),
                            prompt=max(u.prompt, 1), output=u.completion, max_tokens=r.max_tokens,
                            stream=out.first_token_at is not None, prefix=tuple(prefix))

    def _ready(self, everything: bool) -> list[bytes]:
        """Lines whose arrival precedes every open request's (the trace stays in arrival order)."""
        horizon = float("inf") if everything or not self._open else min(self._open.values()) - self.start
        out = []
        while self._done and self._done[0][0] <= horizon:
            out.append(heapq.heappop(self._done)[2])
        return out

    def _write(self, lines: list[bytes]) -> None:
        with self.path.open("ab") as f:
            f.write(b"".join(lines))
        self.written += len(lines)

    async def flush(self, everything: bool = False) -> None:
        lines = self._ready(everything)
        if lines:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._write, lines)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def aclose(self) -> None:
        await self.flush(everything=True)
        self._writer.shutdown(wait=True)
