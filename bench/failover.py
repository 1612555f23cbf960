"""Failover: kill 1 of 2 instances of a tier under 64 concurrent clients, then bring it back.

Two `tiergate sim --profile qwen3-1.7b-fp8` processes behind one `tiergate serve`
(active probes every 0.5 s). 64 clients loop for `--seconds`: half non-streaming, half
streaming. At 1/4 of the run instance B is SIGKILLed; at 1/2 it is restarted on the
same port. Reported:

* non-streaming requests that did not answer 200 (target 0: retried before the first
  byte on the other instance);
* streams cut by the kill: how many ended with an error event, and how many wrongly
  ended with `[DONE]` (target 0) or with a bare connection drop;
* retry amplification: upstream attempts / client requests (router metrics);
* time from the kill until the router stops counting B as serving (ejection), and
  from the restart until it serves again (readmission), polled every 20 ms.

Usage: python bench/failover.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import free_port  # noqa: E402

KEY = "sk-tiergate-demo"
KEY_HASH = "a76e8169f2e4051531cdd24753d163ed3cc01d9208b14606f88055b404f4c13f"
MODEL = "Qwen/Qwen3-1.7B-FP8"


def start_sim(port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "router.cli", "sim", "--profile", "qwen3-1.7b-fp8",
                                 "--port", str(port), "--served-model-name", MODEL], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT)


def start_router(pol: Path, port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--policy", str(pol), "--port",
                                 str(port), "--redis-url", "redis://127.0.0.1:6379/10"], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)


async def serving(s: aiohttp.ClientSession, router: str, inst: str) -> bool | None:
    try:
        async with s.get(router + "/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:
        return None
    for line in text.splitlines():
        if line.startswith("tiergate_instance_healthy{") and f'instance="{inst}"' in line:
            return line.endswith(" 1.0")
    return None


async def main(seconds: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tg-failover-"))
    pa, pb, pr = free_port(), free_port(), free_port()
    a = start_sim(pa, tmp / "a.log")
    b = start_sim(pb, tmp / "b.log")
    pol = tmp / "policy.yaml"
    pol.write_text(f"""
version: 1
tiers:
  fast:
    model: {MODEL}
    max_model_len: 40960
    prices: {{input: 0.05, cached_input: 0.01, output: 0.2}}
    instances: [{{id: a, url: "http://127.0.0.1:{pa}"}}, {{id: b, url: "http://127.0.0.1:{pb}"}}]
tenants:
  bench: {{key_sha256: [{KEY_HASH}]}}
routes:
  m: {{tiers: [fast], profile: p}}
profiles:
  p:
    filters: [{{type: healthy}}]
    scorers: [{{type: load, weight: 1}}]
    picker: {{type: max_score}}
""")
    env = {**os.environ, "TIERGATE_LOG_LEVEL": "warning", "TIERGATE_DRAIN_GRACE_S": "0",
           "TIERGATE_DATA_DIR": str(tmp / "r"),
           "TIERGATE_PROBE_INTERVAL_S": "0.5"}
    router_proc = start_router(pol, pr, env, tmp / "router.log")
    router = f"http://127.0.0.1:{pr}"
    for u in (f"http://127.0.0.1:{pa}/health", f"http://127.0.0.1:{pb}/health", router + "/ready"):
        if not wait_http_ok(u, 90):
            raise RuntimeError(f"{u} did not come up (see {tmp})")
    res = {"plain_ok": 0, "plain_failed": 0, "streams_done": 0, "streams_error_event": 0,
           "streams_done_after_error": 0, "streams_dropped": 0, "requests": 0}
    headers = {"authorization": f"Bearer {KEY}"}
    stop = time.perf_counter() + seconds

    async def client(s: aiohttp.ClientSession, k: int) -> None:
        stream = k % 2 == 1
        n = 0
        while time.perf_counter() < stop:
            n += 1
            body = {"model": "m", "max_tokens": 64, "stream": stream, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"client {k} request {n}"}]}
            res["requests"] += 1
            try:
                async with s.post(router + "/v1/chat/completions", json=body, headers=headers) as r:
                    if not stream:
                        await r.read()
                        res["plain_ok" if r.status == 200 else "plain_failed"] += 1
                        continue
                    saw_error = saw_done = False
                    async for line in r.content:
                        if line.startswith(b"data: [DONE]"):
                            saw_done = True
                        elif line.startswith(b'data: {"error"'):
                            saw_error = True
                    if saw_error and saw_done:
                        res["streams_done_after_error"] += 1
                    elif saw_error:
                        res["streams_error_event"] += 1
                    elif saw_done:
                        res["streams_done"] += 1
                    else:
                        res["streams_dropped"] += 1
            except aiohttp.ClientError:
                res["plain_failed" if not stream else "streams_dropped"] += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        clients = [asyncio.create_task(client(s, k)) for k in range(64)]
        await asyncio.sleep(seconds / 4)
        b.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        eject_s = readmit_s = None
        while time.perf_counter() < killed + seconds / 4:
            if eject_s is None and await serving(s, router, "b") is False:
                eject_s = time.perf_counter() - killed
            await asyncio.sleep(0.02)
        b = start_sim(pb, tmp / "b.log")
        restarted = time.perf_counter()
        while time.perf_counter() < stop:
            if await serving(s, router, "b"):
                readmit_s = time.perf_counter() - restarted
                break
            await asyncio.sleep(0.02)
        await asyncio.gather(*clients)
        async with s.get(router + "/metrics") as r:
            text = await r.text()
    retries = sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                  if ln.startswith("tiergate_upstream_retries_total{"))
    for p in (a, b, router_proc):
        p.terminate()
    res["retries"] = int(retries)
    res["amplification"] = round((res["requests"] + retries) / max(res["requests"], 1), 4)
    res["eject_s"] = None if eject_s is None else round(eject_s, 3)
    res["readmit_s"] = None if readmit_s is None else round(readmit_s, 3)
    print(json.dumps(res))
    print("\n| client requests | non-streaming failed | streams cut with error event | streams with [DONE] after "
          "an error | streams dropped | retry amplification | eject after kill s | readmit after restart s |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {res['requests']} | {res['plain_failed']} | {res['streams_error_event']} | "
          f"{res['streams_done_after_error']} | {res['streams_dropped']} | {res['amplification']} | "
          f"{res['eject_s']} | {res['readmit_s']} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    asyncio.run(main(ap.parse_args().seconds))
