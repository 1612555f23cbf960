"""Bounded resources per request and per connection, against a real `tiergate serve` over sockets:
413 before the body is read (or as soon as a chunked one passes the limit), prompts that can't
fit refused without tokenizing all of them, header size/count limits and header/body timeouts
that close the connection. Plus the proofs the limits rest on (token bounds, NFC factors) and
the FIFO gate."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.health import wait_http_ok
from backends.registry import Registry
from backends.token_bounds import (
    BYTE_FACTOR_NFC,
    CHAR_FACTOR_NFC,
    FifoGate,
    GateFull,
    PromptTooLong,
    TokenizeStats,
)
from backends.tokenization import TierTokenizer, TokenizerCache
from backends.valkey import free_port
from policies.schema import load_policy
from router.errors import ApiError
from router.limits import JSON_ESCAPE, JSON_SLACK, derived_body_limit
from router.live_policy import build_view
from router.request_checks import check_nesting
from tests.conftest import DEMO_KEY, ROOT
from tests.test_policies import DEMO

LIMIT = 12 * 1024 * 1024
AUTH = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`tiergate serve` with small limits so that the tests hit them quickly."""
    data = tmp_path_factory.mktemp("limits")
    port = free_port()
    env = {**os.environ, "TIERGATE_DATA_DIR": str(data), "TIERGATE_MAX_BODY_BYTES": str(LIMIT),
           "TIERGATE_HTTP_HEADER_TIMEOUT_S": "1", "TIERGATE_HTTP_BODY_IDLE_TIMEOUT_S": "1",
           "TIERGATE_HTTP_MAX_HEADER_BYTES": "16384", "TIERGATE_HTTP_MAX_HEADERS": "50",
           "TIERGATE_HTTP_KEEP_ALIVE_TIMEOUT_S": "1", "TIERGATE_DRAIN_GRACE_S": "0", "TIERGATE_DRAIN_TIMEOUT_S": "5"}
    env.pop("TIERGATE_REDIS_URL", None)
    with open(data / "router.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if not wait_http_ok(url + "/ready", 90, alive=lambda: proc.poll() is None):
        proc.kill()
        raise RuntimeError("router did not start:\n" + (data / "router.log").read_text()[-3000:])
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the server closes (the socket timeout fails the test if it never does)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def error_of(reply: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


# ---- bodies -------------------------------------------------------------------------------------------

def test_413_from_content_length_before_any_body_is_sent(router: str) -> None:
    before = metric(router, 'tiergate_bodies_refused_total{how="content_length"}')
    with connect(router) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + DEMO_KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (LIMIT + 1))
        reply = b""
        while b"}}" not in reply:   # the whole answer arrives although not one body byte was sent
            reply += s.recv(65536)
    status, err = error_of(reply)
    assert status == 413 and err["code"] == "request_too_large" and str(LIMIT) in str(err["message"])
    assert metric(router, 'tiergate_bodies_refused_total{how="content_length"}') == before + 1


def test_413_while_a_chunked_body_streams_past_the_limit(router: str) -> None:
    before = metric(router, 'tiergate_bodies_refused_total{how="streamed"}')

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "auto", "messages": [{"role": "user", "content": "'
        for _ in range(14):
            yield b"a" * (1024 * 1024)

    r = httpx.post(router + "/v1/chat/completions", content=chunks(), headers=AUTH, timeout=60)
    assert r.status_code == 413 and r.request.headers.get("transfer-encoding") == "chunked"
    assert r.json()["error"]["code"] == "request_too_large"
    assert metric(router, 'tiergate_bodies_refused_total{how="streamed"}') == before + 1
    # the connection pool's next request on the same client still works (the rest was drained)
    assert httpx.get(router + "/health").status_code == 200


# ---- prompts ------------------------------------------------------------------------------------------

def test_prompt_over_the_largest_context_is_refused_after_tokenizing_part_of_it(router: str) -> None:
    prompt = "hello " * 150_000                       # 900K characters, ~150K tokens; qwen3-1.7b takes 40,960
    chars0 = metric(router, "tiergate_tokenized_chars_total")
    refused0 = metric(router, 'tiergate_prompts_refused_total{reason="tokens"}')
    r = httpx.post(router + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "qwen3-1.7b", "max_tokens": 1, "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "'messages'" in err["message"] and "40960" in err["message"]
    tokenized = metric(router, "tiergate_tokenized_chars_total") - chars0
    assert 0 < tokenized < len(prompt) / 2
    assert metric(router, 'tiergate_prompts_refused_total{reason="tokens"}') == refused0 + 1


def test_prompt_whose_characters_prove_it_cant_fit_is_refused_untokenized(router: str) -> None:
    prompt = " " * 8_000_000                      # > 40,960 tokens x 192 characters a token
    chars0 = metric(router, "tiergate_tokenized_chars_total")
    r = httpx.post(router + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "qwen3-1.7b", "max_tokens": 1, "prompt": prompt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt" and "192" in err["message"]
    assert metric(router, "tiergate_tokenized_chars_total") == chars0
    assert metric(router, 'tiergate_prompts_refused_total{reason="chars"}') >= 1
    ok = httpx.post(router + "/v1/completions", headers=AUTH, timeout=60,
                    json={"model": "qwen3-1.7b", "max_tokens": 1, "prompt": "hello " * 30_000})
    assert ok.status_code == 200, ok.text   # a long prompt that fits is still served
    assert metric(router, 'tiergate_long_prompts_total{result="admitted"}') >= 1   # the 8M one took a slot


# ---- connections --------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",     # whole, in one piece
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000,                   # unfinished
    b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60)) + b"\r\n",  # too many
])
def test_oversized_headers_get_431_and_the_connection_closed(router: str, head: bytes) -> None:
    with connect(router) as s:
        s.sendall(head)
        status, err = error_of(read_to_eof(s))
    assert status == 431 and err["code"] == "request_header_fields_too_large"


def test_headers_within_the_limits_are_served(router: str) -> None:
    r = httpx.get(router + "/health", headers={f"x-{i}": "v" * 100 for i in range(40)})
    assert r.status_code == 200


async def _slowloris(url: str, n: int) -> list[bytes | None]:
    """`n` connections that send a header line every 0.2 s: what each read before the server closed it
    (None: still open when the bound ran out)."""
    host, port = url.removeprefix("http://").split(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(n)]

    async def trickle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bytes | None:
        got = b""
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for i in range(100):                  # 20 s at most; the server closes after ~1 s
            if not w.is_closing():
                w.write(b"X-%d: 1\r\n" % i)
            try:
                async with asyncio.timeout(0.2):
                    chunk = await r.read(65536)
            except TimeoutError:
                continue
            except ConnectionError:           # reset or broken pipe: closed while our next line was on its way
                return got
            if not chunk:
                return got
            got += chunk
        return None

    try:
        return await asyncio.gather(*(trickle(r, w) for r, w in conns))
    finally:
        for _, w in conns:
            w.close()


def test_header_timeout_closes_slowloris_connections(router: str) -> None:
    replies = asyncio.run(_slowloris(router, 50))
    assert None not in replies                                   # every one was closed
    answered = [r for r in replies if r]
    assert answered and all(error_of(r)[0] == 408 for r in answered)


def test_silent_connection_is_closed_without_an_answer(router: str) -> None:
    with connect(router) as s:
        assert read_to_eof(s) == b""


def test_body_idle_timeout_closes_the_connection(router: str) -> None:
    with connect(router) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + DEMO_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        assert read_to_eof(s) == b""   # closed: the app saw a disconnect (logged 499), nothing to answer


def test_keep_alive_connection_serves_requests_then_idles_out(router: str) -> None:
    with connect(router) as s:
        for _ in range(3):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while b'"ok"' not in reply:
                reply += s.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200")
        assert read_to_eof(s) == b""   # then uvicorn's keep-alive timeout closes it


# ---- the proofs and the gate --------------------------------------------------------------------------

def test_nfc_factors_hold_for_every_code_point() -> None:
    chars = bytes_ = 0.0
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        d = unicodedata.normalize("NFD", c)
        chars = max(chars, len(d) / len(c.encode()))
        bytes_ = max(bytes_, len(d.encode()) / len(c.encode()))
    assert chars <= CHAR_FACTOR_NFC and bytes_ <= BYTE_FACTOR_NFC


_TOK: list[TierTokenizer] = []


def qwen3() -> TierTokenizer:
    if not _TOK:
        _TOK.append(TierTokenizer(None))
    return _TOK[0]


ADVERSARIAL = [" " * 300_000, "-" * 300_000, "a\u0308\u0304" * 100_000, "\u0390" * 100_000, "\n" * 200_000,
               "".join(chr(0x4E00 + i % 20_000) for i in range(100_000)), "<|im_start|>" * 20_000]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=["spaces", "dashes", "decomposed", "iota", "newlines", "cjk",
                                                  "special"])
def test_no_qwen3_token_stands_for_more_than_the_bound(text: str) -> None:
    tok = qwen3()
    assert tok.bounds is not None and tok.bounds.max_token_bytes == 128
    n = len(tok.encode_blocking_free(text))
    assert len(text) <= n * tok.bounds.chars_per_token
    assert len(text.encode()) <= n * tok.bounds.bytes_per_token


def test_encode_stops_after_the_round_that_passes_the_limit() -> None:
    tok = qwen3()
    tok.stats = TokenizeStats()
    text = "hello " * 500_000            # 3M characters, 500K tokens
    with ThreadPoolExecutor(2) as ex:
        with pytest.raises(PromptTooLong) as info:
            asyncio.run(tok.encode(text, ex, limit=50_000))
        assert 50_000 < info.value.counted < 100_000
        assert tok.stats.chars < len(text) / 5       # one first round and one more, not 3M characters
        exact = asyncio.run(tok.encode(text[:300_000], ex, limit=50_000))   # ends in the round: returned whole
    assert exact == tok.encode_sync(text[:300_000])


def test_body_limit_is_derived_from_the_policy_and_capped() -> None:
    policy = load_policy(DEMO)
    small = msgspec.structs.replace(policy, tiers={
        name: msgspec.structs.replace(t, max_model_len=4096) for name, t in policy.tiers.items()})
    tokenizers = TokenizerCache()
    with ThreadPoolExecutor(1) as ex:
        big_view = build_view(policy, Registry(policy), tokenizers, ex, None)
        small_view = build_view(small, Registry(small), tokenizers, ex, None)
    assert derived_body_limit(small_view) == 4096 * JSON_ESCAPE * 128 * 3 + JSON_SLACK        # 10 MiB
    assert derived_body_limit(big_view) == 262_144 * JSON_ESCAPE * 128 * 3 + JSON_SLACK       # 577 MiB
    from router.limits import RequestLimits
    from router.metrics import RouterMetrics
    from router.settings import Settings
    limits = RequestLimits(Settings(), RouterMetrics(), tokenizers)
    assert limits.body_limit(big_view) == 32 * 1024 * 1024        # the cap is smaller
    assert limits.body_limit(small_view) == 4096 * JSON_ESCAPE * 384 + JSON_SLACK   # after a reload: derived


async def test_fifo_gate_serves_in_order_and_sheds_past_its_queue() -> None:
    gate = FifoGate(slots=1, queue=2)
    order: list[int] = []
    release = asyncio.Event()

    async def job(i: int) -> None:
        async with gate.slot():
            order.append(i)
            await release.wait()

    first = asyncio.create_task(job(0))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(job(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    assert gate.running == 1 and gate.waiting == 2
    with pytest.raises(GateFull):
        async with gate.slot():
            pass
    waiting[0].cancel()                  # a cancelled waiter leaves the queue; the next one is served
    release.set()
    await asyncio.gather(first, waiting[1])
    assert order == [0, 2] and gate.running == 0 and gate.waiting == 0


# ---- JSON nesting (router/request_checks.py) ----------------------------------------------------------

def test_deep_json_is_400_and_bracketed_text_is_not_deep(router: str) -> None:
    r = httpx.post(router + "/v1/chat/completions", content=b"[" * 10_000 + b"]" * 10_000, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(router + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "qwen3-1.7b", "max_tokens": 1, "messages": [{"role": "user", "content": '[[{{\\"' * 5_000}]})
    assert r.status_code == 200, r.text


def _depth(o: object) -> int:
    if isinstance(o, list):
        return 1 + max((_depth(x) for x in o), default=0)
    if isinstance(o, dict):
        return 1 + max((_depth(x) for x in o.values()), default=0)
    return 0


tricky = st.text(alphabet='[]{}"\\ a\u00e9', max_size=6)
nested = st.recursive(tricky | st.integers() | st.none(),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky, inner, max_size=3),
                      max_leaves=40)


@settings(max_examples=400, deadline=None)
@given(doc=nested, ascii_only=st.booleans(), limit=st.integers(1, 6))
def test_nesting_check_agrees_with_the_real_depth(doc: object, ascii_only: bool, limit: int) -> None:
    raw = json.dumps(doc, ensure_ascii=ascii_only).encode()
    try:
        check_nesting(raw, limit)
        refused = False
    except ApiError:
        refused = True
    assert refused == (_depth(doc) > limit)
