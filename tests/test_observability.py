"""Issue #16 (5, 6): JSON lines from every logger, the first-token and TPOT histograms.

The logging tests configure the process's logging (router/logs.py) and put it back as it was after.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import signal
import socket
import sys
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from backends.sim.run import start_sim
from router.logs import FOREIGN_LOGGERS, bind_request, configure_logging, get_logger
from tests.conftest import DEMO_KEY, serve_router
from tests.test_lifecycle import Router, slow_policy
from tests.test_router_proxy import fast_only_policy

REQUIRED = ("event", "level", "timestamp")


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """configure_logging onto a buffer; the logging state before it restored after the test."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook, threading.excepthook, warnings.showwarning,
             {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate, logging.getLogger(n).level)
              for n in FOREIGN_LOGGERS})
    buf = io.StringIO()
    configure_logging("info", buf)
    try:
        yield buf
    finally:
        structlog.contextvars.clear_contextvars()
        structlog.reset_defaults()
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        sys.excepthook, threading.excepthook, warnings.showwarning = saved[2], saved[3], saved[4]
        for name, (handlers, propagate, level) in saved[5].items():
            logging.getLogger(name).handlers[:] = handlers
            logging.getLogger(name).propagate = propagate
            logging.getLogger(name).setLevel(level)


def _lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        obj = json.loads(line)
        assert isinstance(obj, dict) and all(k in obj for k in REQUIRED), line
        out.append(obj)
    return out


def test_stdlib_loggers_write_json_with_the_bound_request_id(json_logs: io.StringIO) -> None:
    logging.getLogger("uvicorn").handlers.append(logging.StreamHandler(io.StringIO()))  # as uvicorn's dictConfig
    configure_logging("info", json_logs)   # ...which configure_logging takes off again
    rid = bind_request("req-" + uuid.uuid4().hex[:8])
    logging.getLogger("uvicorn.error").warning("worker %s is %s", 3, "slow")
    logging.getLogger("redis").error("connection reset")
    get_logger("tiergate").info("own_line", n=1)
    structlog.contextvars.clear_contextvars()
    logging.getLogger("aiohttp.client").warning("outside any request")
    lines = _lines(json_logs.getvalue())
    assert [(d["logger"] if "logger" in d else None, d["event"], d["level"]) for d in lines] == [
        ("uvicorn.error", "worker 3 is slow", "warning"), ("redis", "connection reset", "error"),
        (None, "own_line", "info"), ("aiohttp.client", "outside any request", "warning")]
    assert [d.get("request_id") for d in lines] == [rid, rid, rid, None]


async def test_a_library_logging_inside_a_request_carries_its_request_id(json_logs: io.StringIO) -> None:
    """httpx (the upstream client here) logs each upstream request at INFO, inside the request's context."""
    assert logging.getLogger("httpx").level == logging.WARNING   # that is a line per request: off but at debug
    logging.getLogger("httpx").setLevel(logging.INFO)
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.1)
    rid = "rid-" + uuid.uuid4().hex
    try:
        async with serve_router(fast_only_policy(), {"fast": [("x", sim.url)]}, http_client="httpx") as url, \
                httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {DEMO_KEY}"}) as c:
            r = await c.post("/v1/chat/completions", headers={"x-request-id": rid}, json={
                "model": "qwen3-1.7b", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
    finally:
        await sim.close()
    lines = _lines(json_logs.getvalue())
    upstream = [d for d in lines if d.get("logger") == "httpx" and f"POST {sim.url}" in d["event"]]
    assert upstream and all(d.get("request_id") == rid for d in upstream), lines
    probes = [d for d in lines if d.get("logger") == "httpx" and f"GET {sim.url}" in d["event"]]
    assert all("request_id" not in d for d in probes), probes   # background work: no request's id


def test_exceptions_render_as_types_and_frames_never_their_message(json_logs: io.StringIO) -> None:
    secret = "sk-secret-" + uuid.uuid4().hex

    async def handler_that_fails() -> None:
        raise ValueError(f"bad body {{'messages': [{secret!r}]}}")

    async def main() -> None:
        task = asyncio.ensure_future(handler_that_fails())
        await asyncio.sleep(0)
        assert task.done()
        del task   # never retrieved: asyncio logs it (its message carries the task's repr, the exception's text)

    asyncio.run(main())
    gc.collect()
    try:
        try:
            raise KeyError(secret)
        except KeyError as exc:
            raise RuntimeError(secret) from exc
    except RuntimeError:
        logging.getLogger("litestar").exception("handler failed")
        get_logger().error("internal_error", exc_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")   # not an error here: rendered by logging (captureWarnings)
        warnings.warn("a warning, as JSON", UserWarning, stacklevel=1)
    text = json_logs.getvalue()
    assert secret not in text
    lines = _lines(text)
    by_event = {d["event"]: d for d in lines}
    never = by_event["Task exception was never retrieved"]
    assert never["logger"] == "asyncio" and never["exception"][0]["type"] == "ValueError"
    assert any("in handler_that_fails" in f for f in never["exception"][0]["frames"])
    for event in ("handler failed", "internal_error"):
        assert [e["type"] for e in by_event[event]["exception"]] == ["RuntimeError", "KeyError"]
    assert any("a warning, as JSON" in d["event"] and d["logger"] == "py.warnings" for d in lines)


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name}


async def test_first_token_and_tpot_histograms_count_a_streamed_request() -> None:
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.1)
    body = {"model": "qwen3-1.7b", "max_tokens": 8, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with serve_router(fast_only_policy(), {"fast": [("x", sim.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {DEMO_KEY}"}, timeout=60) as c:
            async with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                await r.aread()
            r = await c.post("/v1/chat/completions", json=body)    # not streamed: a first token, no TPOT
            assert r.status_code == 200
            text = (await c.get("/metrics")).text
    finally:
        await sim.close()
    labels = (("slo_class", "interactive"), ("tier", "fast"))   # the demo tenant's default class
    assert _samples(text, "tiergate_first_token_seconds_count") == {labels: 2.0}
    assert _samples(text, "tiergate_tpot_seconds_count") == {labels: 1.0}
    tpot = _samples(text, "tiergate_tpot_seconds_sum")[labels]
    whole = sum(_samples(text, "tiergate_request_seconds_sum").values())
    assert 0 < tpot * 7 < whole     # 7 tokens after the first, inside the requests' time


async def test_served_router_writes_only_json_lines(tmp_path: Path) -> None:
    """`tiergate serve` (embedded valkey, a simulated tier): requests, errors, a malformed HTTP request, then
    SIGTERM; every line it wrote is a JSON object, and neither the prompt nor the key is among them."""
    tag = uuid.uuid4().hex[:6]
    key, marker = f"sk-free-{tag}", f"PROMPT-{uuid.uuid4().hex}"
    router = Router(tmp_path, slow_policy(tag, 0.1), grace_s=0.1, timeout_s=5)
    msgs = [{"role": "user", "content": f"say {marker}"}]
    try:
        async with httpx.AsyncClient(base_url=router.url, timeout=60,
                                     headers={"authorization": f"Bearer {key}"}) as c:
            await router.ready(c)
            async with c.stream("POST", "/v1/chat/completions", headers={"x-request-id": f"rid-{tag}"},
                                json={"model": "chat", "max_tokens": 4, "stream": True, "messages": msgs}) as r:
                assert r.status_code == 200
                await r.aread()
            assert (await c.post("/v1/chat/completions",
                                 json={"model": "chat", "max_tokens": 4, "messages": msgs})).status_code == 200
            bad = await c.post("/v1/chat/completions", content=f'{{"model": "chat", "messages": "{marker}'.encode())
            assert bad.status_code == 400
            assert (await c.post("/v1/chat/completions", json={"model": "chat", "messages": msgs},
                                 headers={"authorization": f"Bearer sk-wrong-{marker}"})).status_code == 401
            with socket.create_connection(("127.0.0.1", router.port), timeout=10) as s:
                s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                assert s.recv(1024).startswith(b"HTTP/1.1 400")
        router.proc.send_signal(signal.SIGTERM)
        assert await router.exited() == 0, router.tail()
    finally:
        router.kill()
    text = router.log.read_text()
    assert marker not in text and key not in text
    lines = _lines(text)
    events = [(d.get("logger"), d["event"]) for d in lines]
    assert ("uvicorn.error", "Invalid HTTP request received.") in events, events
    assert events[-1] == (None, "stopped"), events
    served = [d for d in lines if d["event"] == "request" and d.get("status") == 200]
    assert len(served) == 2 and served[0]["request_id"] == f"rid-{tag}"
    assert sorted(d["status"] for d in lines if d["event"] == "request" and d["status"] != 200) == [400, 401]
