"""Router overhead: tiergate vs the same backend called directly, in one run.

Setup (2 cores): the router is pinned to CPU 0 with taskset; the fast loopback fake
backend (bench/fake_backend.py) and this load generator share CPU 1. For each HTTP
client transport it starts `tiergate serve` against the fake and measures:

* router CPU ms per request (utime+stime of the router process / requests), short
  non-streaming chat;
* added latency p50/p99 at concurrency 1, 16 and 64 (router minus direct);
* added TTFT p50/p99 for streaming at concurrency 16;
* added time for one 256K-token prompt (tokenization included), and the p99 of
  short requests (c=16) while 256K-token prompts keep arriving.

With `--windows off,on` each client runs twice, without and with the admission windows (issue #14:
`admission: {windows: true}` and a known prefill rate on both tiers, so every request takes its
instance's window in Redis: one round trip more), and the table says which.

Usage: python bench/overhead.py [--seconds 5] [--clients aiohttp,httpx] [--windows off|on|off,on]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
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
SHORT = b'{"model":"%s","max_tokens":16,"messages":[{"role":"user","content":"Write a haiku about routers."}]}'
STREAM = (
    b'{"model":"%s","max_tokens":16,"stream":true,'
    b'"messages":[{"role":"user","content":"Write a haiku about routers."}]}'
)

POLICY = """
version: 1
tiers:
  fast:
    model: m
    max_model_len: 40960
    prices: {{input: 0.05, cached_input: 0.01, output: 0.2}}
    instances: [{{id: fake-0, url: "{url}"}}]
  long:
    model: m
    max_model_len: 300000
    prices: {{input: 0.3, cached_input: 0.06, output: 1.2}}
    instances: [{{id: fake-1, url: "{url}"}}]
tenants:
  demo: {{key_sha256: [{hash}]}}
routes:
  short: {{tiers: [fast], profile: p}}
  long: {{tiers: [long], profile: p}}
profiles:
  p:
    filters: [{{type: tier_allowed}}, {{type: context_fits}}, {{type: healthy}}]
    scorers: [{{type: expected_cost, weight: 10}}, {{type: load, weight: 1}}]
    picker: {{type: max_score}}
"""


def wait_http(url: str, timeout: float = 60) -> None:
    if not wait_http_ok(url, timeout):
        raise RuntimeError(f"{url} did not come up")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else float("nan")


async def load(url: str, body: bytes, conc: int, seconds: float, stream: bool, headers: dict[str, str]) -> list[float]:
    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=conc * 2)
    async with aiohttp.ClientSession(connector=conn, headers=headers) as s:
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                async with s.post(url, data=body, headers={"content-type": "application/json"}) as r:
                    if stream:
                        await r.content.readany()  # first bytes = TTFT
                        lat.append(time.perf_counter() - t)
                        await r.read()
                    else:
                        await r.read()
                        lat.append(time.perf_counter() - t)
                    if r.status != 200:
                        raise RuntimeError(f"status {r.status}")

        await asyncio.gather(*(worker() for _ in range(conc)))
    return lat


async def one(url: str, body: bytes, headers: dict[str, str]) -> float:
    async with aiohttp.ClientSession(headers=headers) as s:
        t = time.perf_counter()
        async with s.post(url, data=body, headers={"content-type": "application/json"}) as r:
            await r.read()
            assert r.status == 200, r.status
        return time.perf_counter() - t


def long_body(tokens: int) -> bytes:
    text = "hello" + " hello" * (tokens - 20)
    return b'{"model":"%s","max_tokens":1,"messages":[{"role":"user","content":"' + text.encode() + b'"}]}'


WINDOWS = "admission: {windows: true}\n"


def policy_text(fake_url: str, windows: bool) -> str:
    text = POLICY.format(url=fake_url, hash=KEY_HASH)
    if windows:   # a known prefill rate: each request takes its instance's window (one Redis round trip)
        text = text.replace("    prices:", "    prefill_tokens_per_s: 100000\n    prices:") + WINDOWS
    return text


async def bench_client(kind: str, fake_url: str, seconds: float, windows: bool = False, tracing: str = "off",
                       skip_long: bool = False) -> dict[str, object]:
    """`tracing`: off; otlp (TIERGATE_TRACING=otlp, exported to the fake backend, which answers 200); or
    base (tracing off, the router from the checkout at BENCH_BASE_TREE: an earlier commit, for A/B)."""
    port = free_port()
    tmp = Path(tempfile.mkdtemp())
    pol = tmp / "policy.yaml"
    pol.write_text(policy_text(fake_url, windows))
    env = {
        **os.environ,
        "TIERGATE_POLICY_PATH": str(pol),
        "TIERGATE_HTTP_CLIENT": kind,
        "TIERGATE_LOG_LEVEL": "warning",
        "TIERGATE_DRAIN_GRACE_S": "0",
        "TIERGATE_REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        "TIERGATE_DATA_DIR": str(tmp),
    }
    tree = ROOT
    if tracing == "otlp":
        env.update({"TIERGATE_TRACING": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": fake_url + "/v1/traces"})
    elif tracing == "base":
        tree = Path(os.environ.get("BENCH_BASE_TREE", ""))
        if not (tree / "router" / "cli.py").exists():
            raise SystemExit("--tracing base needs BENCH_BASE_TREE=<a checkout of an earlier commit>")
        env["PYTHONPATH"] = str(tree)
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before measuring
        ["taskset", "-c", "0", sys.executable, "-m", "router.cli", "serve", "--port", str(port)],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        router = f"http://127.0.0.1:{port}/v1/chat/completions"
        direct = fake_url + "/v1/chat/completions"
        auth = {"authorization": f"Bearer {KEY}"}
        await load(router, SHORT % b"short", 8, 1.0, False, auth)  # warm up
        res: dict[str, object] = {"client": kind + (" windows on" if windows else "")
                                  + ("" if tracing == "off" else f" tracing {tracing}")}
        for conc in (1, 16, 64):
            d = await load(direct, SHORT % b"m", conc, seconds, False, {})
            c0 = cpu_seconds(proc.pid)
            r = await load(router, SHORT % b"short", conc, seconds, False, auth)
            cpu = (cpu_seconds(proc.pid) - c0) / len(r) * 1000
            res[f"c{conc}"] = {
                "cpu_ms": cpu,
                "rps": len(r) / seconds,
                "added_p50": pct(r, 50) - pct(d, 50),
                "added_p99": pct(r, 99) - pct(d, 99),
                "router_p50": pct(r, 50),
                "router_p99": pct(r, 99),
            }
        d = await load(direct, STREAM % b"m", 16, seconds, True, {})
        r = await load(router, STREAM % b"short", 16, seconds, True, auth)
        res["stream_c16"] = {"added_ttft_p50": pct(r, 50) - pct(d, 50), "added_ttft_p99": pct(r, 99) - pct(d, 99)}
        if skip_long:
            res.update(long_256k_added_ms=float("nan"), short_p99_alone=float("nan"),
                       short_p99_with_256k=float("nan"), long_prompts_during=0)
            return res
        big_r = long_body(256_000) % b"long"
        big_d = long_body(256_000) % b"m"
        dl = [await one(direct, big_d, {}) for _ in range(3)]
        rl = [await one(router, big_r, auth) for _ in range(3)]
        res["long_256k_added_ms"] = (statistics.median(rl) - statistics.median(dl)) * 1000

        async def long_stream(stop: float) -> int:
            n = 0
            while time.perf_counter() < stop:
                await one(router, big_r, auth)
                n += 1
            return n

        base = await load(router, SHORT % b"short", 16, seconds, False, auth)
        stop = time.perf_counter() + seconds
        mixed, n_long = await asyncio.gather(
            load(router, SHORT % b"short", 16, seconds, False, auth), long_stream(stop)
        )
        res["short_p99_alone"] = pct(base, 99)
        res["short_p99_with_256k"] = pct(mixed, 99)
        res["long_prompts_during"] = n_long
        return res
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", default="aiohttp,httpx")
    ap.add_argument("--windows", default="off", help="off, on, or off,on (both, in one run)")
    ap.add_argument("--tracing", default="off", help="comma list of off, otlp, base (BENCH_BASE_TREE's router, "
                    "tracing off): each a router of its own in this run, for A/B")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole variant list, interleaved")
    ap.add_argument("--skip-long", action="store_true", help="skip the 256K-token prompt measurements")
    args = ap.parse_args()
    modes = [m == "on" for m in args.windows.split(",")]
    os.sched_setaffinity(0, {1})
    fport = free_port()
    fake = subprocess.Popen(["taskset", "-c", "1", sys.executable, str(ROOT / "bench" / "fake_backend.py"), str(fport)])
    try:
        wait_http(f"http://127.0.0.1:{fport}/health")
        results = [
            asyncio.run(bench_client(k, f"http://127.0.0.1:{fport}", args.seconds, w, t, args.skip_long))
            for _ in range(args.rounds) for k in args.clients.split(",") for w in modes
            for t in args.tracing.split(",")
        ]
    finally:
        fake.terminate()
    print("\n## Router overhead (short non-streaming chat; added = via tiergate minus direct)\n")
    print("| client | conc | router CPU ms/req | req/s | added p50 ms | added p99 ms | router p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for conc in (1, 16, 64):
            x = r[f"c{conc}"]
            assert isinstance(x, dict)
            print(
                f"| {r['client']} | {conc} | {x['cpu_ms']:.3f} | {x['rps']:.0f} | {x['added_p50']:.2f} | "
                f"{x['added_p99']:.2f} | {x['router_p99']:.2f} |"
            )
    print(
        "\n| client | stream c=16 added TTFT p50 ms | p99 ms | 256K-token prompt added ms | short p99 alone ms |"
        " short p99 while 256K prompts arrive ms | 256K prompts sent |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        s = r["stream_c16"]
        assert isinstance(s, dict)
        print(
            f"| {r['client']} | {s['added_ttft_p50']:.2f} | {s['added_ttft_p99']:.2f} | "
            f"{r['long_256k_added_ms']:.1f} | {r['short_p99_alone']:.2f} | {r['short_p99_with_256k']:.2f} | "
            f"{r['long_prompts_during']} |"
        )


if __name__ == "__main__":
    main()
