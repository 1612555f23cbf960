"""Broken backends beside healthy ones (#12 item 2): how long clients wait, and how many requests fail.

Each run starts two simulated `fast` instances on loopback, one with a fault and one healthy, and an
in-process router with the demo policy's default deadlines (router/deadlines.py), then sends a
bounded number of requests through it:

* `hung_backend`: the bad instance hangs 30 s before its headers; 24 requests, 8 at a time, half of
  them streamed. Reported: requests failed, and the longest client wait (target: the first-byte
  deadline plus one failover, instead of the 30 s hang);
* `garbage_backend`: the bad instance answers malformed JSON bodies, or malformed SSE events (chat and
  completions); 40 requests, 4 at a time. Reported: the share of requests failed (target: 0 once the
  instance is ejected, at most the requests in flight before the ejection), and its ejections.

Usage: python bench/hardening_backends.py   (or as figures of bench/hardening.py)
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.sim.faults import Faults  # noqa: E402
from backends.sim.run import start_sim  # noqa: E402
from policies.schema import load_policy  # noqa: E402
from router.logs import configure_logging  # noqa: E402
from router.settings import DEMO_POLICY  # noqa: E402
from tests.conftest import DEMO_KEY, serve_router  # noqa: E402

AUTH = {"authorization": f"Bearer {DEMO_KEY}"}


async def _one(c: httpx.AsyncClient, i: int, stream: bool, completions: bool) -> tuple[bool, float]:
    t0 = time.perf_counter()
    if completions:
        path: str = "/v1/completions"
        body: dict[str, object] = {"model": "qwen3-1.7b", "prompt": f"text {i}", "max_tokens": 16, "stream": stream}
    else:
        path = "/v1/chat/completions"
        body = {"model": "qwen3-1.7b", "max_tokens": 16, "stream": stream,
                "messages": [{"role": "user", "content": f"question {i}"}]}
    async with c.stream("POST", path, json=body) as r:
        text = (await r.aread()).decode()
    ok = r.status_code == 200 and (not stream or (text.rstrip().endswith("data: [DONE]") and '"error"' not in text))
    return ok, time.perf_counter() - t0


async def _run(faults: Faults, n: int, conc: int, stream: bool | None, completions: bool = False
               ) -> dict[str, float]:
    configure_logging("warning")   # the in-process router's request lines would bury the figures
    bad = await start_sim("qwen3-1.7b-fp8", time_scale=0.05, faults=faults)
    good = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    sem = asyncio.Semaphore(conc)
    try:
        async with serve_router(load_policy(DEMO_POLICY), {"fast": [("bad", bad.url), ("good", good.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as c:
            async def go(i: int) -> tuple[bool, float]:
                async with sem:
                    return await _one(c, i, stream if stream is not None else i % 2 == 0, completions)
            res = await asyncio.gather(*(go(i) for i in range(n)))
            metrics = (await c.get("/metrics")).text
    finally:
        await bad.close()
        await good.close()
    ejections = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("tiergate_instance_ejections_total") and 'instance="bad"' in line)
    failed = sum(not ok for ok, _ in res)
    return {"requests": n, "concurrency": conc, "failed": failed, "failed_pct": round(100 * failed / n, 1),
            "longest_wait_s": round(max(t for _, t in res), 2), "bad_instance_ejections": ejections}


def hung_backend_figure(_router: object = None) -> dict[str, object]:
    return {"fault": "hang 30 s before headers", "streamed": "half",
            **asyncio.run(_run(Faults(hang_before_headers_s=30), 24, 8, None))}


def garbage_backend_figure(_router: object = None) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, faults, stream, comp in [("json_bodies", Faults(malformed="json"), False, False),
                                       ("sse_chat", Faults(malformed="sse"), True, False),
                                       ("sse_completions", Faults(malformed="sse"), True, True)]:
        out[name] = asyncio.run(_run(faults, 40, 4, stream, comp))
    return out


if __name__ == "__main__":
    print("hung_backend:", hung_backend_figure(), flush=True)
    print("garbage_backend:", garbage_backend_figure(), flush=True)
