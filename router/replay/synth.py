"""Standard workloads for `tiergate replay` (`tiergate replay synth --kind K --requests N --seed S`).

Every kind is a seeded generator of TraceRequests in arrival order (random.Random(seed), nothing else:
the same seed writes the same bytes). `rate` is the mean arrival rate in requests per second.

  chat        interactive chats: one of 4 app system prompts (300-1,500 tokens, shared), a user message of
              50-800 tokens, answers of ~250 tokens (lognormal); Poisson arrivals, and every 20 s a burst
              of 5 s worth of requests at once;
  rag         retrieval-augmented questions: a system prompt, then one of 2,000 documents (2-16K tokens,
              Zipf-popular: a few are asked about often) and a 20-200 token question; 70% interactive;
  docs        long documents of 20-200K tokens (one of 300, Zipf-popular, so a document is asked about more
              than once), a question of 20-400 tokens, answers of ~400 tokens; relaxed;
  multiturn   conversations of 2-10 turns, 5-60 s of thinking between turns: each turn's prompt is the
              conversation so far (one growing prefix group) and its answer continues it, so the next
              turn finds its blocks cached where it went; interactive;
  hot-system-prompt  one 3,000-token system prompt shared by every request, 20-400 tokens of its own;
              interactive;
  batch       offline work (reports, moderation): one of 40 task instructions (1-4K tokens, shared), then a
              record of 200-2,000 tokens of its own, answers of ~300 tokens; class `batch`;
  mixed       all of them but batch: chat 45%, rag 20%, multiturn 15%, hot-system-prompt 15%, docs 5% of
              requests.
  windows     the mixed load of the admission windows (issue 14): interactive chat bursts 70.4%, batch
              28.2% and 20-200K-token documents 1.4% of requests, so that batch is ~30% of the tokens,
              documents ~40% and interactive ~30%.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterator

from router.replay.trace import Prefix, TraceRequest

KINDS = ("mixed", "windows", "chat", "rag", "docs", "multiturn", "hot-system-prompt", "batch")
MIX = (("chat", 0.45), ("rag", 0.20), ("multiturn", 0.15), ("hot-system-prompt", 0.15), ("docs", 0.05))
WINDOWS_MIX = (("chat", 0.704), ("batch", 0.282), ("docs", 0.014))


def _lognormal(rng: random.Random, mean: float, sigma: float = 0.8, lo: int = 1, hi: int = 8192) -> int:
    mu = math.log(mean) - sigma * sigma / 2
    return max(lo, min(hi, int(rng.lognormvariate(mu, sigma))))


def _zipf(rng: random.Random, n: int, s: float = 1.1) -> int:
    """An index in [0, n) with P(k) ~ 1 / (k + 1)^s (inverse transform on the continuous approximation)."""
    u = rng.random()
    if s == 1.0:
        return min(n - 1, int(math.exp(u * math.log(n + 1))) - 1)
    a = 1.0 - s
    x = ((n + 1) ** a - 1) * u + 1
    return min(n - 1, max(0, int(x ** (1 / a)) - 1))


class _Ctx:
    def __init__(self, rng: random.Random, rate: float, tenants: list[str], model: str) -> None:
        self.rng, self.rate, self.tenants, self.model = rng, rate, tenants, model

    def tenant(self) -> str:
        return self.tenants[self.rng.randrange(len(self.tenants))]


def chat(c: _Ctx) -> Iterator[TraceRequest]:
    rng = c.rng
    sys_len = [rng.randint(300, 1500) for _ in range(4)]
    t, next_burst = 0.0, 20.0
    while True:
        t += rng.expovariate(c.rate)
        n = 1
        if t >= next_burst:
            t, n, next_burst = next_burst, max(1, int(5 * c.rate)), next_burst + 20.0
        for _ in range(n):
            k = rng.randrange(4)
            own = rng.randint(50, 800)
            yield TraceRequest(t=t, tenant=c.tenant(), model=c.model, slo="interactive", prompt=sys_len[k] + own,
                               output=_lognormal(rng, 250), prefix=(Prefix(f"chat-sys-{k}", sys_len[k]),))


def rag(c: _Ctx) -> Iterator[TraceRequest]:
    rng = c.rng
    docs = [rng.randint(2000, 16000) for _ in range(2000)]
    sys_len = 400
    t = 0.0
    while True:
        t += rng.expovariate(c.rate)
        d = _zipf(rng, len(docs))
        q = rng.randint(20, 200)
        yield TraceRequest(t=t, tenant=c.tenant(), model=c.model,
                           slo="interactive" if rng.random() < 0.7 else "relaxed", prompt=sys_len + docs[d] + q,
                           output=_lognormal(rng, 200),
                           prefix=(Prefix("rag-sys", sys_len), Prefix(f"rag-doc-{d}", docs[d])))


def docs(c: _Ctx) -> Iterator[TraceRequest]:
    rng = c.rng
    sizes = [rng.randint(20_000, 200_000) for _ in range(300)]
    t = 0.0
    while True:
        t += rng.expovariate(c.rate)
        d = _zipf(rng, len(sizes), 1.2)
        q = rng.randint(20, 400)
        yield TraceRequest(t=t, tenant=c.tenant(), model=c.model, slo="relaxed", prompt=sizes[d] + q,
                           output=_lognormal(rng, 400, hi=4096), prefix=(Prefix(f"doc-{d}", sizes[d]),))


def multiturn(c: _Ctx) -> Iterator[TraceRequest]:
    """Conversations start as a Poisson process (rate / mean turns); turns come out in time order."""
    rng = c.rng
    mean_turns = 6.0
    sys_len = 600
    pending: list[tuple[float, int, str, int, int, int]] = []   # (t, conv, tenant, turn, turns, history)
    start, conv = 0.0, 0
    while True:
        while not pending or start <= pending[0][0]:
            start += rng.expovariate(c.rate / mean_turns)
            heapq.heappush(pending, (start, conv, c.tenant(), 0, rng.randint(2, 10), 0))
            conv += 1
        t, cid, tenant, turn, turns, history = heapq.heappop(pending)
        user = rng.randint(30, 400)
        out = _lognormal(rng, 220)
        grown = history + user
        yield TraceRequest(t=t, tenant=tenant, model=c.model, slo="interactive", prompt=sys_len + grown,
                           output=out, prefix=(Prefix("conv-sys", sys_len), Prefix(f"conv-{cid}", grown)),
                           continues=True)
        if turn + 1 < turns:
            heapq.heappush(pending, (t + rng.uniform(5.0, 60.0), cid, tenant, turn + 1, turns, grown + out))


def hot_system_prompt(c: _Ctx) -> Iterator[TraceRequest]:
    rng = c.rng
    t = 0.0
    while True:
        t += rng.expovariate(c.rate)
        own = rng.randint(20, 400)
        yield TraceRequest(t=t, tenant=c.tenant(), model=c.model, slo="interactive", prompt=3000 + own,
                           output=_lognormal(rng, 200), prefix=(Prefix("hot-sys", 3000),))


def batch(c: _Ctx) -> Iterator[TraceRequest]:
    rng = c.rng
    tasks = [rng.randint(1000, 4000) for _ in range(40)]
    t = 0.0
    while True:
        t += rng.expovariate(c.rate)
        k = _zipf(rng, len(tasks))
        yield TraceRequest(t=t, tenant=c.tenant(), model=c.model, slo="batch",
                           prompt=tasks[k] + rng.randint(200, 2000), output=_lognormal(rng, 300),
                           prefix=(Prefix(f"batch-task-{k}", tasks[k]),))


_GEN = {"chat": chat, "batch": batch, "rag": rag, "docs": docs, "multiturn": multiturn,
        "hot-system-prompt": hot_system_prompt}


def synth(kind: str, requests: int, seed: int, rate: float = 20.0, tenants: tuple[str, ...] = ("demo",),
          model: str = "auto") -> Iterator[TraceRequest]:
    """`requests` requests of `kind` (KINDS), `rate` per second on average, in arrival order."""
    if kind not in KINDS:
        raise ValueError(f"unknown workload kind {kind!r}; one of {', '.join(KINDS)}")
    if requests < 0 or rate <= 0:
        raise ValueError("requests must be >= 0 and rate > 0")
    if kind in ("mixed", "windows"):
        gens = [_GEN[k](_Ctx(random.Random(f"{seed}/{k}"), rate * share, list(tenants), model))
                for k, share in (MIX if kind == "mixed" else WINDOWS_MIX)]
        stream: Iterator[TraceRequest] = heapq.merge(*gens, key=lambda r: r.t)
    else:
        stream = _GEN[kind](_Ctx(random.Random(seed), rate, list(tenants), model))
    for i, r in enumerate(stream):
        if i >= requests:
            return
        yield r
