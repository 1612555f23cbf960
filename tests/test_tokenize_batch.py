"""Batched tokenization (backends/tokenize_batch.py) with the real Qwen3 tokenizer: concurrent callers get
exactly the ids a sequential encode gives, batches really form, and errors, cancellation and the queue
bound stay with the caller they belong to."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from backends.token_bounds import TokenizeStats
from backends.tokenization import TierTokenizer, TokenizerCache
from backends.tokenize_batch import BatchLimits, EncodeBatcher, TokenizerBusy
from policies.schema import load_policy
from router.errors import ApiError
from router.prompts import PromptTokenizer
from router.schemas import CompletionRequest
from tests.conftest import ROOT

_TOK: list[TierTokenizer] = []
BAD = "lone \ud800 surrogate"   # `tokenizers` refuses it (TypeError), as it would any text it can't take


def qwen3() -> TierTokenizer:
    if not _TOK:
        _TOK.append(TierTokenizer(None))
    tok = _TOK[0]
    tok.stats = TokenizeStats()
    return tok


@pytest.fixture
def ex() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def prompts(n: int, seed: int) -> list[str]:
    """Distinct texts from a few characters to 20K: words, digits, CJK, accents, newlines, special tokens."""
    rng = random.Random(seed)
    words = ["alpha", "beta,", "Gamma.", "δέλτα", "1234", "\n\n", "x-y", "  ", "naïve", "你好世界", "<|im_end|>",
             "don't", "\t", "https://example.com/a?b=c", "🙂"]
    sizes = [rng.choice([3, 40, 300, 2_000, 5_000, 20_000]) for _ in range(n)]
    return [f"{i}: " + "".join(rng.choice(words) + rng.choice(" \n") for _ in range(size // 5)) for i, size in
            enumerate(sizes)]


class HeldEncode:
    """The tokenizer's own `encode_texts`, held in the worker thread until `release()`: lets a test
    decide what is queued while a batch is in flight, without timing."""

    def __init__(self, tok: TierTokenizer) -> None:
        self.tok = tok
        self.gate = threading.Event()
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[list[int]]:
        self.calls.append(list(texts))
        assert self.gate.wait(30), "never released"
        return self.tok.encode_texts(texts)

    def release(self) -> None:
        self.gate.set()


def held_batcher(tok: TierTokenizer, **limits: int) -> tuple[EncodeBatcher, HeldEncode]:
    held = HeldEncode(tok)
    return EncodeBatcher(asyncio.get_running_loop(), held, lambda: tok.stats,
                         BatchLimits(**{"inline_chars": 0, **limits})), held


async def test_concurrent_encodes_give_the_sequential_ids_and_form_batches(ex: ThreadPoolExecutor) -> None:
    tok = qwen3()
    texts = ["w " * 4_000, *prompts(150, seed=1)]    # the first goes to the worker; the rest queue behind it
    got = await asyncio.gather(*(tok.encode(t, ex) for t in texts))
    assert got == [tok.encode_sync(t) for t in texts]
    s = tok.stats
    assert s.batch_callers > s.batches >= 2          # one batch carried several callers' texts
    assert s.batched_texts == s.batch_callers == len(texts)
    assert s.chars == sum(len(t) for t in texts)
    assert s.batch_shed == 0


async def test_concurrent_chats_give_the_ids_of_their_whole_rendered_text(ex: ThreadPoolExecutor) -> None:
    tok = qwen3()
    bodies = prompts(120, seed=2)
    chats = [[{"role": "system", "content": "You are terse. " * (i % 3)}, {"role": "user", "content": b},
              {"role": "assistant", "content": bodies[i - 1][:500]}, {"role": "user", "content": f"and {i}?"}]
             for i, b in enumerate(bodies)]
    got = await asyncio.gather(*(tok.encode_chat(c, ex) for c in chats))
    assert got == [tok.encode_sync(tok._render_jinja(c, True, None)) for c in chats]
    assert tok.stats.batch_callers > tok.stats.batches >= 1


async def test_short_text_is_encoded_inline_while_nothing_is_in_flight(ex: ThreadPoolExecutor) -> None:
    tok = qwen3()
    short, medium = "hello there " * 10, "hello there " * 1_000    # 120 and 12,000 characters
    assert await tok.encode(short, ex) == tok.encode_sync(short)
    assert tok.stats.batches == 0                    # nothing waited: no thread round trip
    assert await tok.encode(medium, ex) == tok.encode_sync(medium)
    assert tok.stats.batches == 1 and not tok.batcher().in_flight


async def test_an_error_in_one_text_reaches_only_its_caller(ex: ThreadPoolExecutor) -> None:
    tok = qwen3()
    good = ["first good text", "second: naïve 你好 🙂", "third\n\nline <|im_end|>"]
    texts = ["w " * 4_000, good[0], good[1], BAD, good[2]]
    got = await asyncio.gather(*(tok.encode(t, ex) for t in texts), return_exceptions=True)
    assert isinstance(got[3], TypeError)
    assert [g for i, g in enumerate(got) if i != 3] == [tok.encode_sync(t) for t in texts if t != BAD]
    assert tok.stats.batches == 2                   # the bad text shared its batch with three good ones
    with pytest.raises(TypeError):                  # inline, with nothing in flight, it raises to its caller too
        await tok.encode(BAD, ex)


async def test_a_cancelled_waiter_leaves_the_queue_and_the_others_get_their_ids(ex: ThreadPoolExecutor) -> None:
    tok = qwen3()
    batcher, held = held_batcher(tok)
    texts = prompts(5, seed=4)
    tasks = [asyncio.create_task(batcher.encode([t], ex)) for t in texts]
    await asyncio.sleep(0)                           # each task submitted: the first in flight, four queued
    assert batcher.in_flight and batcher.waiting == 4
    tasks[2].cancel()
    tasks[0].cancel()                                # its batch is in flight: the result will be dropped
    await asyncio.sleep(0)
    assert batcher.waiting == 3 and batcher.queued_chars == sum(len(texts[i]) for i in (1, 3, 4))
    held.release()
    got = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(got[0], asyncio.CancelledError) and isinstance(got[2], asyncio.CancelledError)
    assert [got[i] for i in (1, 3, 4)] == [[tok.encode_sync(texts[i])] for i in (1, 3, 4)]
    assert held.calls == [[texts[0]], [texts[1], texts[3], texts[4]]]    # the cancelled waiter was never encoded
    assert not batcher.in_flight and batcher.waiting == 0 and batcher.queued_chars == 0


async def test_the_queue_bound_sheds_what_would_pass_it(ex: ThreadPoolExecutor) -> None:
    tok = qwen3()
    batcher, held = held_batcher(tok, queue_chars=100, batch_chars=70)
    first = asyncio.create_task(batcher.encode(["x" * 500], ex))    # in flight: any size may run
    await asyncio.sleep(0)
    big = asyncio.create_task(batcher.encode(["y" * 500], ex))      # the queue is empty: admitted
    await asyncio.sleep(0)
    with pytest.raises(TokenizerBusy):
        await batcher.encode(["z"], ex)                              # 500 already wait
    assert tok.stats.batch_shed == 1
    held.release()
    await asyncio.gather(first, big)
    held.gate.clear()
    blocker = asyncio.create_task(batcher.encode(["b" * 10], ex))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(batcher.encode([c * 30, c * 30], ex)) for c in "cdef"]   # 60 each
    await asyncio.sleep(0)
    assert batcher.waiting == 1 and batcher.queued_chars == 60      # c waits; d, e, f were shed
    held.release()
    got = await asyncio.gather(*waiters, return_exceptions=True)
    assert got[0] == [tok.encode_sync("c" * 30)] * 2
    assert all(isinstance(g, TokenizerBusy) for g in got[1:])
    await blocker
    assert tok.stats.batch_shed == 4


async def test_batches_take_queued_submissions_up_to_batch_chars_in_order(ex: ThreadPoolExecutor) -> None:
    tok = qwen3()
    batcher, held = held_batcher(tok, batch_chars=100)
    texts = ["a" * 10] + [f"{c} " * 20 for c in "bcdefg"]           # 40 characters each after the first
    tasks = [asyncio.create_task(batcher.encode([t], ex)) for t in texts]
    await asyncio.sleep(0)
    held.release()
    got = await asyncio.gather(*tasks)
    assert got == [[tok.encode_sync(t)] for t in texts]
    assert held.calls == [[texts[0]], texts[1:3], texts[3:5], texts[5:7]]


def test_each_event_loop_gets_its_own_batcher() -> None:
    tok = qwen3()
    with ThreadPoolExecutor(1) as pool:
        for _ in range(2):      # a loop closed with its batcher idle leaves nothing behind for the next
            got = asyncio.run(_encode_all(tok, pool, prompts(20, seed=5)))
            assert got == [tok.encode_sync(t) for t in prompts(20, seed=5)]


async def _encode_all(tok: TierTokenizer, pool: ThreadPoolExecutor, texts: list[str]) -> list[list[int]]:
    return list(await asyncio.gather(*(tok.encode(t, pool) for t in ["w " * 4_000, *texts])))[1:]


async def test_a_full_queue_answers_503_tokenizer_busy(ex: ThreadPoolExecutor) -> None:
    policy = load_policy(ROOT / "policies" / "examples" / "demo.yaml")
    prompts_ = PromptTokenizer(policy, TokenizerCache(), ex)
    tier = next(iter(policy.tiers))
    prompts_.by_tier[tier].batch_limits = BatchLimits(inline_chars=0, queue_chars=1)

    async def ids(prompt: str) -> list[int]:
        return (await prompts_.completion_ids((tier,), CompletionRequest(model="m", prompt=prompt)))[tier]

    got = await asyncio.gather(ids("in flight"), ids("queued"), ids("shed"), return_exceptions=True)
    assert got[:2] == [qwen3().encode_sync("in flight"), qwen3().encode_sync("queued")]
    assert isinstance(got[2], ApiError) and got[2].status == 503 and got[2].code == "tokenizer_busy"
    assert got[2].headers["Retry-After"] == "1"


async def test_a_shut_down_executor_fails_its_callers_and_leaves_the_batcher_idle() -> None:
    tok = qwen3()
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    batcher = EncodeBatcher(asyncio.get_running_loop(), tok.encode_texts, lambda: tok.stats, BatchLimits())
    with pytest.raises(RuntimeError):
        await batcher.encode(["w " * 1_000], pool)
    assert not batcher.in_flight and batcher.waiting == 0
    assert await batcher.encode(["short"], pool) == [tok.encode_sync("short")]    # inline: no executor needed
