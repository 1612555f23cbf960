"""`/health` latency while a 1 MB policy (10,000 tenants) is reloaded (#12 item 6; target p99 <= 20 ms).

One `tiergate sim` behind one `tiergate serve` (Redis at 127.0.0.1:6379 db 10). The policy file is
rewritten `--reloads` times, alternating two versions (every tenant's daily budget differs), and each
time `POST /admin/policy/reload` applies it: read, parse and validate, build the view (profiles, key
index, tokenizers) off the event loop, then swap on it. A probe sends `GET /health` one after another
for the whole time and records each latency. Reported: /health p50/p99/max during reloads (the window
from each reload request to its answer), the reload endpoint's own latency, and the file size.

Before item 6 moved parsing off the loop, one such reload held /health for ~3.5 s.

Usage: python bench/hardening_reload.py [--reloads 6] [--tenants 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import free_port  # noqa: E402
from bench.failover import MODEL, start_router, start_sim  # noqa: E402
from bench.policy_reload import ADMIN, pct  # noqa: E402


def big_policy(port: int, tenants: int, daily_usd: float) -> str:
    from router.auth import hash_key
    rows = "".join(f"  t{i:05d}: {{key_sha256: [{hashlib.sha256(f'sk-bench-{i}'.encode()).hexdigest()}], "
                   f"budgets: {{daily_usd: {daily_usd}}}}}\n" for i in range(tenants))
    return f"""version: 1
tiers:
  fast:
    model: {MODEL}
    max_model_len: 40960
    prices: {{input: 0.05, cached_input: 0.01, output: 0.2}}
    instances: [{{id: a, url: "http://127.0.0.1:{port}"}}]
tenants:
{rows}admin: {{key_sha256: [{hash_key(ADMIN)}]}}
routes:
  m: {{tiers: [fast], profile: p}}
profiles:
  p:
    filters: [{{type: healthy}}]
    scorers: [{{type: load, weight: 1}}]
    picker: {{type: max_score}}
"""


async def _measure(router: str, pol: Path, texts: list[str], reloads: int) -> dict[str, float]:
    health: list[tuple[float, float]] = []       # (start, latency)
    windows: list[tuple[float, float]] = []      # reload request sent .. answered
    done = asyncio.Event()
    async with aiohttp.ClientSession() as probe_s, aiohttp.ClientSession() as admin_s:
        async def probe() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                async with probe_s.get(router + "/health") as r:
                    await r.read()
                    assert r.status == 200
                health.append((t0, time.perf_counter() - t0))
        task = asyncio.create_task(probe())
        for k in range(reloads):
            await asyncio.to_thread(pol.write_text, texts[(k + 1) % 2])
            t0 = time.perf_counter()
            async with admin_s.post(router + "/admin/policy/reload",
                                    headers={"authorization": f"Bearer {ADMIN}"}) as r:
                body = await r.json()
                assert r.status == 200 and body["result"] == "reloaded", body
            windows.append((t0, time.perf_counter()))
            await asyncio.sleep(0.2)
        done.set()
        await task
    during = [lat * 1000 for t, lat in health if any(a <= t <= b for a, b in windows)]
    reload_ms = [(b - a) * 1000 for a, b in windows]
    return {"health_n": len(during), "health_p50_ms": pct(during, 50), "health_p99_ms": pct(during, 99),
            "health_max_ms": max(during), "reload_p50_ms": pct(reload_ms, 50), "reload_max_ms": max(reload_ms)}


async def reload_health(reloads: int = 6, tenants: int = 10_000) -> dict[str, float]:
    """The figures for bench/hardening.py: /health latency during reloads of a large policy."""
    tmp = Path(tempfile.mkdtemp(prefix="tg-hreload-"))
    ps, pr = free_port(), free_port()
    sim = start_sim(ps, tmp / "sim.log")
    texts = [big_policy(ps, tenants, 5.0), big_policy(ps, tenants, 6.0)]
    pol = tmp / "policy.yaml"
    pol.write_text(texts[0])
    env = {**os.environ, "TIERGATE_LOG_LEVEL": "warning", "TIERGATE_DRAIN_GRACE_S": "0",
           "TIERGATE_DATA_DIR": str(tmp / "r"), "TIERGATE_POLICY_RELOAD_INTERVAL_S": "0"}
    router_proc = start_router(pol, pr, env, tmp / "router.log")
    router = f"http://127.0.0.1:{pr}"
    try:
        for url in (f"http://127.0.0.1:{ps}/health", router + "/ready"):
            if not wait_http_ok(url, 120):
                raise RuntimeError(f"{url} did not come up; logs in {tmp}")
        figures = await _measure(router, pol, texts, reloads)
        figures["policy_mb"] = len(texts[0].encode()) / 1e6
        return figures
    finally:
        for p in (router_proc, sim):
            p.terminate()
            p.wait(timeout=30)


def reload_health_figure(_router: object = None, reloads: int = 6, tenants: int = 10_000) -> dict[str, object]:
    """bench/hardening.py's figure `reload_health` (it starts its own router and simulator)."""
    f = asyncio.run(reload_health(reloads, tenants))
    return {"reloads": reloads, "tenants": tenants, **{k: round(v, 2) for k, v in f.items()}}


def main(reloads: int, tenants: int) -> None:
    f = asyncio.run(reload_health(reloads, tenants))
    print(f"/health during {reloads} reloads of a {f['policy_mb']:.2f} MB policy ({tenants:,} tenants): "
          f"p50 {f['health_p50_ms']:.1f} ms, p99 {f['health_p99_ms']:.1f} ms, max {f['health_max_ms']:.1f} ms "
          f"over {f['health_n']:.0f} probes (target p99 <= 20 ms); reload endpoint p50 {f['reload_p50_ms']:.0f} ms, "
          f"max {f['reload_max_ms']:.0f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reloads", type=int, default=6)
    ap.add_argument("--tenants", type=int, default=10_000)
    a = ap.parse_args()
    main(a.reloads, a.tenants)
