"""Event-loop time per prompt with and without the batching stage (backends/tokenize_batch.py).

Bursts of 64 concurrent chats (and single chats, one at a time), each distinct (no segment-cache
hits), encoded with the real Qwen3 tokenizer on a uvloop loop with the router's tokenizer executor.
"inline" is the path before batching (every text up to 16,384 characters encoded on the loop:
`inline_chars` = 16,384, so nothing is ever in flight); "batched" is the default `BatchLimits`;
"worker" sends every text to the worker thread (`inline_chars` = 0), what the inline rule avoids.
Printed per mix: the loop thread's CPU time per prompt, the burst's wall time (median), and the
batches formed per burst. Figures only, no asserts; a few seconds in all.

    python bench/tokenize_batch.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.token_bounds import TokenizeStats
from backends.tokenization import TierTokenizer, tokenizer_executor
from backends.tokenize_batch import BatchLimits

WORDS = ("the router counts tokens of every prompt before it picks a tier and the backend serves it "
         "while other requests wait in line for their turn on the loop").split()
BURST = 64
MIXES: dict[str, tuple[int, Callable[[random.Random, int], int]]] = {   # name: (chats per burst, chars of chat i)
    "lone short (300 chars)": (1, lambda rng, i: 300),
    "lone rag (2K chars)": (1, lambda rng, i: 2_000),
    "short (300 chars)": (BURST, lambda rng, i: 300),
    "rag (1-8K chars)": (BURST, lambda rng, i: rng.randint(1_000, 8_000)),
    "short + 1 in 8 rag (8K)": (BURST, lambda rng, i: 8_000 if i % 8 == 0 else 300),
}


def chat(rng: random.Random, chars: int, tag: str) -> list[dict[str, str]]:
    body = " ".join(rng.choice(WORDS) for _ in range(chars // 5))[:chars]
    return [{"role": "system", "content": f"You are assistant {tag}."}, {"role": "user", "content": f"{tag} {body}"}]


async def burst(tok: TierTokenizer, ex: Executor, chats: list[list[dict[str, str]]]) -> tuple[float, float]:
    c0, w0 = time.thread_time(), time.perf_counter()
    await asyncio.gather(*(tok.encode_chat(c, ex) for c in chats))
    return time.thread_time() - c0, time.perf_counter() - w0


def run(tok: TierTokenizer, ex: Executor, limits: BatchLimits, n: int, size: Callable[[random.Random, int], int],
        rounds: int, seed: int) -> dict[str, Any]:
    tok.batch_limits = limits
    tok.stats = TokenizeStats()
    rng = random.Random(seed)
    cpu: list[float] = []
    wall: list[float] = []
    loop_factory: Any = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        for r in range(rounds):
            chats = [chat(rng, size(rng, i), f"{seed}-{r}-{i}") for i in range(n)]
            c, w = runner.run(burst(tok, ex, chats))
            cpu.append(c)
            wall.append(w)
    return {"loop_us": statistics.median(cpu) / n * 1e6, "wall_ms": statistics.median(wall) * 1e3,
            "batches": tok.stats.batches / rounds, "callers": tok.stats.batch_callers / rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    tok = TierTokenizer(None)
    ex = tokenizer_executor(4)
    modes = {"inline": BatchLimits(inline_chars=16_384), "batched": BatchLimits(),
             "worker": BatchLimits(inline_chars=0)}
    run(tok, ex, modes["batched"], *MIXES["short (300 chars)"], 2, seed=99)   # warm up
    print(f"distinct chats per burst, median of {args.rounds} bursts")
    print(f"{'mix':<26}{'mode':<9}{'loop CPU/prompt':>17}{'burst wall':>12}{'batches':>9}{'callers':>9}")
    for m, (name, (n, size)) in enumerate(MIXES.items()):
        for k, (mode, limits) in enumerate(modes.items()):
            got = run(tok, ex, limits, n, size, args.rounds * (10 if n == 1 else 1), seed=1000 * m + k)
            print(f"{name:<26}{mode:<9}{got['loop_us']:>14.0f} us{got['wall_ms']:>9.2f} ms"
                  f"{got['batches']:>9.1f}{got['callers']:>9.1f}")
    ex.shutdown()


if __name__ == "__main__":
    main()
