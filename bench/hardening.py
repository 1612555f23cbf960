"""Hostile clients against a real `tiergate serve`: memory, CPU and connections stay bounded.

Starts `tiergate serve` (the demo policy: embedded valkey, three simulated tiers) on a free
loopback port, runs each figure, prints it, and stops the router. Figures:

* `rss_large_bodies`: router RSS before, at its peak during, and 3 s after 8 concurrent request
  bodies of the maximum size (the body limit less 1 KiB; prompts that can't fit any context);
* `cpu_unfit_prompt`: router CPU seconds (all its threads) for one 10 MB prompt that can't fit;
* `header_abuse_rss`: router RSS growth from 100 connections each sending 2 MB of unfinished header;
* `slowloris`: 500 connections that send a header line a second: how many the router still holds
  after the header timeout (target 0);
* `reload_health`: /health latency while a 1 MB policy reloads (bench/hardening_reload.py);
* `hung_backend`, `garbage_backend`: the longest client wait behind a hung backend, and the share of
  requests failed with one of two instances answering garbage (bench/hardening_backends.py).

Each figure is a function `(Router) -> dict[str, object]` registered in `FIGURES`; add more
(backend faults, reloads) the same way, starting their own routers with `Router(env=...)` where
they need other settings. Everything is bounded: fixed counts, per-step timeouts, loopback only.

Usage: python bench/hardening.py [--only NAME,...] [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import free_port  # noqa: E402
from bench.hardening_backends import garbage_backend_figure, hung_backend_figure  # noqa: E402
from bench.hardening_reload import reload_health_figure  # noqa: E402

KEY = "sk-tiergate-demo"
HEADER_TIMEOUT_S = 3.0
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


class Router:
    """`tiergate serve` in a subprocess with `env` on top of the defaults, on a free loopback port."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="tg-hardening-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "TIERGATE_DATA_DIR": str(self.data), "TIERGATE_DRAIN_GRACE_S": "0",
                    "TIERGATE_HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), **(env or {})}
        self.env.pop("TIERGATE_REDIS_URL", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Router:
        with open(self.data / "router.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--port", str(self.port)],
                                         cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if not wait_http_ok(self.url + "/ready", 120, alive=lambda: self.proc is not None and self.proc.poll() is None):
            self.__exit__()
            raise RuntimeError("router did not start: " + (self.data / "router.log").read_text()[-2000:])
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20

    def cpu_s(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS   # utime + stime of every thread

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@contextmanager
def sampling(router: Router, every_s: float = 0.02) -> Iterator[list[float]]:
    """RSS samples (MB) taken on a thread while the block runs."""
    samples: list[float] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            samples.append(router.rss_mb())
            stop.wait(every_s)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join()


def chat_body(chars: int, model: str = "auto") -> bytes:
    head = json.dumps({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": ""}]})
    cut = head.index('""') + 1
    words = "hello router, this prompt is far too long. "
    text = (words * (chars // len(words) + 1))[:chars]
    return (head[:cut] + text + head[cut:]).encode()


def body_limit(router: Router) -> int:
    """The body limit the router enforces: the size its 413 names for an oversized Content-Length."""
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % 2**40)
        reply = ""
        while "bytes" not in reply.split("limit of")[-1] and len(reply) < 65536:
            got = sock.recv(65536).decode()
            if not got:
                break
            reply += got
    assert " 413 " in reply.split("\r\n")[0], reply
    return int(reply.split("limit of ")[1].split(" ")[0])


async def _post_all(url: str, bodies: list[bytes]) -> list[int]:
    async with httpx.AsyncClient(timeout=120, headers={"authorization": f"Bearer {KEY}",
                                                       "content-type": "application/json"}) as c:
        rs = await asyncio.gather(*(c.post(url + "/v1/chat/completions", content=b) for b in bodies))
    return [r.status_code for r in rs]


def rss_large_bodies(router: Router) -> dict[str, object]:
    size = body_limit(router) - 1024
    bodies = [chat_body(size - 80) for _ in range(8)]
    time.sleep(1)
    before = router.rss_mb()
    with sampling(router) as samples:
        statuses = asyncio.run(_post_all(router.url, bodies))
    del bodies
    time.sleep(3)
    return {"body_bytes": size, "concurrent": 8, "statuses": sorted(set(statuses)),
            "rss_before_mb": round(before, 1), "rss_peak_mb": round(max(samples), 1),
            "rss_after_mb": round(router.rss_mb(), 1)}


def cpu_unfit_prompt(router: Router) -> dict[str, object]:
    body = chat_body(10_000_000)
    chars0 = router.metric("tiergate_tokenized_chars_total")
    cpu0, t0 = router.cpu_s(), time.perf_counter()
    r = httpx.post(router.url + "/v1/chat/completions", content=body, timeout=120,
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    wall, cpu = time.perf_counter() - t0, router.cpu_s() - cpu0
    return {"prompt_chars": 10_000_000, "status": r.status_code, "code": r.json()["error"]["code"],
            "router_cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "chars_tokenized": int(router.metric("tiergate_tokenized_chars_total") - chars0)}


async def _open(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    conns = []
    for _ in range(n):
        conns.append(await asyncio.open_connection("127.0.0.1", port))
    return conns


async def _held(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> int:
    """Connections the server has not closed: reading them to EOF doesn't end within 0.5 s."""
    async def open_still(r: asyncio.StreamReader) -> bool:
        try:
            async with asyncio.timeout(0.5):
                while await r.read(65536):
                    pass
            return False
        except TimeoutError:
            return True
        except OSError:
            return False
    return sum(await asyncio.gather(*(open_still(r) for r, _ in conns)))


async def _slowloris(port: int, n: int) -> dict[str, object]:
    conns = await _open(port, n)
    for _, w in conns:
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    held_before = -1
    while time.monotonic() - t0 < HEADER_TIMEOUT_S + 2:
        for i, (_, w) in enumerate(conns):
            if not w.is_closing():
                w.write(b"X-%d: %d\r\n" % (i, int(time.monotonic())))
        if held_before < 0 and time.monotonic() - t0 > HEADER_TIMEOUT_S / 2:
            held_before = await _held(conns)
        await asyncio.sleep(1)
    held = await _held(conns)
    for _, w in conns:
        w.close()
    return {"connections": n, "header_timeout_s": HEADER_TIMEOUT_S, "held_mid_timeout": held_before,
            "held_after_timeout": held}


def slowloris(router: Router) -> dict[str, object]:
    return asyncio.run(_slowloris(router.port, 500))


async def _header_abuse(port: int, n: int, size: int) -> int:
    conns = await _open(port, n)
    chunk = b"a" * 65536
    for _, w in conns:
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    for _ in range(size // len(chunk)):
        for _, w in conns:
            if not w.is_closing():
                w.write(chunk)
        await asyncio.gather(*(w.drain() for _, w in conns if not w.is_closing()), return_exceptions=True)
    held = await _held(conns)
    for _, w in conns:
        w.close()
    return held


def header_abuse_rss(router: Router) -> dict[str, object]:
    before = router.rss_mb()
    with sampling(router) as samples:
        held = asyncio.run(_header_abuse(router.port, 100, 2 * 2**20))
    return {"connections": 100, "header_bytes_sent_each": 2 * 2**20, "held_after": held,
            "rss_before_mb": round(before, 1), "rss_peak_mb": round(max(samples), 1),
            "rss_growth_mb": round(max(samples) - before, 1)}


FIGURES: list[tuple[str, Callable[[Router], dict[str, object]]]] = [
    ("rss_large_bodies", rss_large_bodies),
    ("cpu_unfit_prompt", cpu_unfit_prompt),
    ("header_abuse_rss", header_abuse_rss),
    ("slowloris", slowloris),
    ("reload_health", reload_health_figure),     # bench/hardening_reload.py (#12 item 6): own router
    ("hung_backend", hung_backend_figure),       # bench/hardening_backends.py (#12 item 2): own router
    ("garbage_backend", garbage_backend_figure),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma-separated figure names")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the router (TIERGATE_*, MALLOC_*)")
    args = p.parse_args()
    only = {n for n in args.only.split(",") if n}
    env = dict(kv.split("=", 1) for kv in args.env)
    with Router(env) as router:
        print(f"router pid {router.pid} on {router.url}, env {env or '{}'}", flush=True)
        for name, fn in FIGURES:
            if only and name not in only:
                continue
            result = fn(router)
            print(f"{name}: {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
