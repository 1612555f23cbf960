"""tiergate against peer routers, in one run, as ratios (issue #15).

Every router stands in front of the same loopback fake vLLM (bench/fake_backend.py --shaped):

* direct: no router (the baseline for added TTFT, and the load generator's own ceiling);
* nginx: only when `nginx` is on PATH (the limit of one proxy hop); skipped silently otherwise;
* sglang-router (`python -m sglang_router.launch_router`, cache_aware);
* vllm-router (`python -m vllm_router.launch_router`, the `vllm-router` script; cache_aware). It asks
  the backend's POST /v1/chat/completions/render for the prompt's token ids before each request; the
  fake answers it as vLLM does (a fixed id list), so that round trip is part of vllm-router's cost;
* aiohttp-passthrough: an aiohttp server + aiohttp client that streams the upstream body through
  (bench/passthrough.py): the Python floor;
* tiergate (`tiergate serve`): the policy of bench/overhead.py (exact tokenization with the tier's
  tokenizer, prefix affinity in Redis), with the tenant given limits and budgets that never bind,
  so admission and settlement run on every request: every feature of the demo policy on.

Pinning (2 cores): the router on CPU 0 (taskset -c 0, its whole process group), the fake backend and
this load generator on CPU 1. Router CPU is utime+stime of every process in the router's process
group, read from /proc before and after each measurement (the window ends when the last request in
flight is done, so it covers exactly the requests counted; the router's idle cost is included).

Per router and repetition, each load for --seconds:

* CPU ms per short non-streamed chat at concurrency 16 (router CPU / requests);
* max req/s on one core: short chat at c=64, with the router core's busy share (a `*` marks a run the
  load generator's core limited, not the router's) and the errors (non-200 or broken) at c=64;
* added TTFT p50 at c=16 for streams of 20 chunks 5 ms apart: time to the first content token,
  router minus direct;
* µs of router CPU per relayed chunk for 512 chunks 2 ms apart (paced) and for 512 chunks in one
  write (back to back), at c=16;
* idle CPU ms per second with no traffic, over a few seconds after the loads (per-thread schedstat, ns).

The fake's streams are vLLM-shaped: role chunk, content chunks, the last with finish_reason, a usage
chunk and [DONE], each event its own HTTP chunk. Figures are medians over --reps repetitions (errors
are summed); routers run one after another in each repetition. The load average is printed at the
start and the end: run it on an otherwise idle machine.

Usage: python bench/peers.py [--seconds 8] [--reps 3] [--routers tiergate,sglang-router,...]
Needs: pip install -e ".[bench]" (sglang-router, vllm-router); Redis at BENCH_REDIS_URL
(default redis://127.0.0.1:6379/14) for tiergate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import free_port  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from overhead import KEY, KEY_HASH, SHORT  # noqa: E402  (the same demo key and short chat as overhead.py)
from overhead import cpu_seconds as pid_cpu  # noqa: E402

ROUTER_CPU, LOAD_CPU = 0, 1
ALL = ("direct", "nginx", "sglang-router", "vllm-router", "aiohttp-passthrough", "tiergate", "tiergate-base",
       "tiergate-tracing")
# tiergate-base: tiergate from the checkout at BENCH_BASE_TREE (an earlier commit, for A/B in one run);
# tiergate-tracing: tiergate with TIERGATE_TRACING=otlp, exporting to the fake backend (which answers 200)
PEERS = ("sglang-router", "vllm-router", "aiohttp-passthrough")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")

STREAM = (b'{"model":"%s","max_tokens":%d,"stream":true,'
          b'"messages":[{"role":"user","content":"peers-stream n=%d gap=%d"}]}')
JSON = {"content-type": "application/json"}
FIRST_TOKEN = b"tok0 "  # the first content chunk's text (bench/fake_backend.py vllm_event)
CHUNKS = 512

# bench/overhead.py's policy, one tier; the tenant has limits and budgets that never bind, so every
# request is admitted (one Redis round trip) and settled: accounting on, as in the demo's capped tenant.
POLICY = """
version: 1
tiers:
  fast:
    model: m
    max_model_len: 40960
    prices: {{input: 0.05, cached_input: 0.01, output: 0.2}}
    instances: [{{id: fake-0, url: "{url}"}}]
tenants:
  demo:
    key_sha256: [{hash}]
    limits: {{rpm: 1000000000, tpm: 1000000000000}}
    budgets: {{daily_usd: 1000000000.0, monthly_usd: 1000000000.0}}
routes:
  short: {{tiers: [fast], profile: p}}
profiles:
  p:
    filters: [{{type: tier_allowed}}, {{type: context_fits}}, {{type: healthy}}]
    scorers: [{{type: expected_cost, weight: 10}}, {{type: load, weight: 1}}]
    picker: {{type: max_score}}
"""

NGINX = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  upstream backend {{ server {upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""


# ---------------------------------------------------------------- CPU from /proc

def group_cpu(pgid: int) -> float:
    """utime+stime (seconds) of every live process in process group `pgid` (all their threads)."""
    total = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def group_threads_ns(pgid: int) -> dict[tuple[int, int], int]:
    """CPU time in ns of every thread of every process in group `pgid` (/proc/*/task/*/schedstat): the
    precise clock for idle CPU, where /proc/*/stat's 10 ms ticks are too coarse for a 2 ms/s target."""
    out: dict[tuple[int, int], int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for tid in os.listdir(f"/proc/{d}/task"):
                out[int(d), int(tid)] = int(Path(f"/proc/{d}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def threads_delta_s(before: dict[tuple[int, int], int], after: dict[tuple[int, int], int]) -> float:
    """CPU seconds between two readings: threads born in between count whole; threads that ended in between
    are lost (their share of the window only)."""
    return sum(ns - before.get(k, 0) for k, ns in after.items()) / 1e9


def core_times() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            out[int(name[3:])] = (sum(v) - v[3] - v[4], sum(v))
    return out


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpu: int) -> float:
    b = after[cpu][0] - before[cpu][0]
    t = after[cpu][1] - before[cpu][1]
    return b / t if t else float("nan")


def redis_pid() -> int | None:
    try:
        import redis

        r = redis.Redis.from_url(REDIS_URL, socket_timeout=1)
        try:
            pid = int(r.info("server")["process_id"])
        finally:
            r.close()
        Path(f"/proc/{pid}/stat").read_text()
        return pid
    except Exception:  # another host, a container, or no Redis: no Redis CPU column
        return None


# ---------------------------------------------------------------- processes

def start(cmd: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """A process pinned to the router core, in its own process group (stopped as a group)."""
    with log.open("wb") as f:
        return subprocess.Popen(["taskset", "-c", str(ROUTER_CPU), *cmd], cwd=cwd, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the whole group, SIGKILL to what is left after 10 s (or at once if the leader is gone)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass
class Router:
    name: str
    url: str                      # base URL the load goes to
    model: bytes
    headers: dict[str, str]
    proc: subprocess.Popen[bytes] | None
    log: Path | None


def launch(name: str, fake: str, tmp: Path) -> tuple[Router, str]:
    """Start one router in front of `fake`; returns it and the URL that says it is ready."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp / f"{name}.log"
    py = sys.executable
    if name == "direct":
        return Router(name, fake, b"m", {}, None, None), fake + "/health"
    if name == "nginx":
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX.format(tmp=tmp, upstream=fake.removeprefix("http://"), port=port))
        proc = start([shutil.which("nginx") or "nginx", "-p", str(tmp), "-c", str(conf)], log)
        return Router(name, base, b"m", {}, proc, log), base + "/health"
    if name == "sglang-router":
        proc = start([py, "-m", "sglang_router.launch_router", "--worker-urls", fake, "--policy", "cache_aware",
                      "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
                      "--log-level", "warn"], log)
        return Router(name, base, b"m", {}, proc, log), base + "/health"
    if name == "vllm-router":
        proc = start([py, "-m", "vllm_router.launch_router", "--worker-urls", fake, "--policy", "cache_aware",
                      "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
                      "--log-level", "warning"], log)
        return Router(name, base, b"m", {}, proc, log), base + "/health"
    if name == "aiohttp-passthrough":
        proc = start([py, str(ROOT / "bench" / "passthrough.py"), "--port", str(port), "--upstream", fake], log)
        return Router(name, base, b"m", {}, proc, log), base + "/health"
    if name.startswith("tiergate"):
        (tmp / name).mkdir(exist_ok=True)
        pol = tmp / name / "policy.yaml"
        pol.write_text(POLICY.format(url=fake, hash=KEY_HASH))
        env = {**os.environ, "TIERGATE_POLICY_PATH": str(pol), "TIERGATE_LOG_LEVEL": "warning",
               "TIERGATE_DRAIN_GRACE_S": "0", "TIERGATE_REDIS_URL": REDIS_URL,
               "TIERGATE_DATA_DIR": str(tmp / name)}
        tree = ROOT
        if name == "tiergate-base":
            tree = Path(os.environ.get("BENCH_BASE_TREE", ""))
            if not (tree / "router" / "cli.py").exists():
                raise RuntimeError("tiergate-base needs BENCH_BASE_TREE=<a checkout of an earlier commit>")
            env["PYTHONPATH"] = str(tree)
        if name == "tiergate-tracing":
            env.update({"TIERGATE_TRACING": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": fake + "/v1/traces"})
        proc = start([py, "-m", "router.cli", "serve", "--port", str(port)], log, env, cwd=tree)
        return Router(name, base, b"short", {"authorization": f"Bearer {KEY}"}, proc, log), base + "/ready"
    raise ValueError(name)


# ---------------------------------------------------------------- load

@dataclass
class Load:
    n: int = 0                    # requests (streams) completed well
    errors: int = 0
    first_error: str = ""
    lat: list[float] = field(default_factory=list)   # latency, or TTFT for streams
    wall: float = 0.0
    cpu: float = 0.0              # router CPU seconds over the window
    redis_cpu: float = 0.0

    def error(self, what: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = what[:300]


def p50_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000 if xs else float("nan")


async def run_load(r: Router, body: bytes, conc: int, seconds: float, stream: bool,
                   measure: Callable[[], float], redis: int | None = None) -> Load:
    """`conc` workers send `body` back to back for `seconds`; router CPU from the first send to the last answer."""
    res = Load()
    url = r.url + "/v1/chat/completions"
    conn = aiohttp.TCPConnector(limit=conc, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=conn, headers=r.headers, timeout=timeout) as s:

        async def worker(stop_at: float) -> None:
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                try:
                    async with s.post(url, data=body, headers=JSON) as resp:
                        if resp.status != 200:
                            res.error(f"{resp.status} {(await resp.read())[:200]!r}")
                            continue
                        if not stream:
                            await resp.read()
                            res.lat.append(time.perf_counter() - t)
                            res.n += 1
                            continue
                        first, tail = 0.0, b""
                        async for data in resp.content.iter_any():
                            if not first and (FIRST_TOKEN in data or FIRST_TOKEN in tail + data[:8]):
                                first = time.perf_counter() - t
                            tail = (tail + data[-32:])[-32:]
                        if not first or b"[DONE]" not in tail:
                            res.error(f"stream incomplete (first token seen: {bool(first)}, end {tail!r})")
                            continue
                        res.lat.append(first)
                        res.n += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    res.error(f"{type(exc).__name__}: {exc}")

        c0, r0 = measure(), pid_cpu(redis) if redis else 0.0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(t0 + seconds) for _ in range(conc)))
        res.wall = time.perf_counter() - t0
        res.cpu = measure() - c0
        res.redis_cpu = (pid_cpu(redis) - r0) if redis else 0.0
    return res


async def measure_router(r: Router, seconds: float, idle_s: float, redis: int | None) -> dict[str, object]:
    pgid = r.proc.pid if r.proc is not None else None
    cpu = (lambda: group_cpu(pgid)) if pgid is not None else (lambda: 0.0)
    chat = SHORT % r.model
    s20 = STREAM % (r.model, 20, 20, 5)
    paced = STREAM % (r.model, CHUNKS, CHUNKS, 2)
    b2b = STREAM % (r.model, CHUNKS, CHUNKS, 0)
    # warm up: connections, caches, JIT-less first-call costs; a router that cannot answer stops here
    for body, stream, n in ((chat, False, 8), (s20, True, 4), (paced, True, 2), (b2b, True, 2)):
        w = await run_load(r, body, n, 0.5, stream, cpu)
        if w.n == 0:
            raise RuntimeError(f"warm-up got no good answer: {w.first_error}")
    out: dict[str, object] = {}
    c16 = await run_load(r, chat, 16, seconds, False, cpu, redis)
    before = core_times()
    c64 = await run_load(r, chat, 64, seconds, False, cpu)
    after = core_times()
    t20 = await run_load(r, s20, 16, seconds, True, cpu)
    out["ttft_ms"] = p50_ms(t20.lat)
    out["rps16"] = c16.n / c16.wall
    out["rps64"] = c64.n / c64.wall
    out["err64"] = c64.errors
    out["load_core"] = busy_share(before, after, LOAD_CPU)
    out["first_error"] = c64.first_error or c16.first_error or t20.first_error
    other = c16.errors + t20.errors
    if pgid is not None:
        out["cpu_ms"] = c16.cpu / max(c16.n, 1) * 1000
        if redis:
            out["redis_ms"] = c16.redis_cpu / max(c16.n, 1) * 1000
        out["busy64"] = c64.cpu / c64.wall
        pc = await run_load(r, paced, 16, seconds, True, cpu)
        bb = await run_load(r, b2b, 16, seconds, True, cpu)
        out["paced_us"] = pc.cpu / max(pc.n * CHUNKS, 1) * 1e6
        out["b2b_us"] = bb.cpu / max(bb.n * CHUNKS, 1) * 1e6
        other += pc.errors + bb.errors
        out["first_error"] = out["first_error"] or pc.first_error or bb.first_error
        await asyncio.sleep(1.0)  # let the loads' tail (settlement, records) finish
        assert pgid is not None
        t0, i0 = time.perf_counter(), group_threads_ns(pgid)
        await asyncio.sleep(idle_s)
        i1, t1 = group_threads_ns(pgid), time.perf_counter()
        out["idle_ms_s"] = threads_delta_s(i0, i1) / (t1 - t0) * 1000
    out["err_other"] = other
    return out


def bench_one(name: str, fake: str, seconds: float, idle_s: float, tmp: Path) -> dict[str, object]:
    tmp.mkdir(parents=True, exist_ok=True)
    r, ready = launch(name, fake, tmp)
    try:
        alive = (lambda: r.proc.poll() is None) if r.proc is not None else None
        if not wait_http_ok(ready, 90, alive):
            tail = r.log.read_text(errors="replace")[-600:] if r.log is not None and r.log.exists() else ""
            raise RuntimeError(f"did not become ready at {ready}: {tail.strip()}")
        redis = redis_pid() if name.startswith("tiergate") else None
        return asyncio.run(measure_router(r, seconds, idle_s, redis))
    finally:
        if r.proc is not None:
            stop(r.proc)


# ---------------------------------------------------------------- report

def med(reps: list[dict[str, object]], key: str) -> float | None:
    xs = [float(x[key]) for x in reps if isinstance(x.get(key), int | float)]  # type: ignore[arg-type]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a != a or b != b or b <= 0:
        return "n/a"
    return f"{a / b:.2f}x"


def report(names: list[str], runs: dict[str, list[dict[str, object]]], failed: dict[str, str],
           reps: int, seconds: float) -> None:
    rows: dict[str, dict[str, float | None]] = {}
    direct = runs.get("direct", [])
    for name in names:
        rs = runs.get(name, [])
        if not rs:
            continue
        added = []
        for i, x in enumerate(rs):   # per repetition: router minus direct of the same repetition
            d = direct[i] if i < len(direct) else None
            if d is not None and isinstance(x.get("ttft_ms"), float) and isinstance(d.get("ttft_ms"), float):
                added.append(float(x["ttft_ms"]) - float(d["ttft_ms"]))  # type: ignore[arg-type]
        rows[name] = {k: med(rs, k) for k in ("cpu_ms", "redis_ms", "rps16", "rps64", "busy64", "load_core",
                                              "ttft_ms", "paced_us", "b2b_us", "idle_ms_s")}
        rows[name]["added_ttft"] = statistics.median(added) if added and name != "direct" else None
        rows[name]["err64"] = float(sum(int(x.get("err64", 0)) for x in rs))  # type: ignore[call-overload]
        rows[name]["err_other"] = float(sum(int(x.get("err_other", 0)) for x in rs))  # type: ignore[call-overload]
    print(f"\n## Routers side by side (medians of {reps} x {seconds:g} s; router on CPU {ROUTER_CPU}, "
          f"fake backend + load generator on CPU {LOAD_CPU})\n")
    print("| router | CPU ms per short chat (c=16) | req/s c=16 | max req/s on one core (c=64; router core busy) "
          "| errors c=64 | TTFT p50 ms, 20 chunks 5 ms apart (c=16) | added TTFT p50 ms | µs CPU per chunk, "
          "512 x 2 ms | µs CPU per chunk, 512 back to back | idle CPU ms/s | other errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    starred = False
    for name, x in rows.items():
        cpu = fmt(x["cpu_ms"], ".3f")
        if x["redis_ms"] is not None:
            cpu += f" (+{x['redis_ms']:.3f} Redis)"
        busy = x["busy64"]
        limited = (busy is None or busy < 0.9) and (x["load_core"] or 0) > 0.95
        starred |= limited
        maxrps = fmt(x["rps64"], ",.0f") + ("*" if limited else "")
        if busy is not None:
            maxrps += f" ({busy:.0%})"
        print(f"| {name} | {cpu} | {fmt(x['rps16'], ',.0f')} | {maxrps} | {x['err64']:.0f} | "
              f"{fmt(x['ttft_ms'], '.2f')} | {fmt(x['added_ttft'], '.2f')} | {fmt(x['paced_us'], '.1f')} | "
              f"{fmt(x['b2b_us'], '.1f')} | {fmt(x['idle_ms_s'], '.1f')} | {x['err_other']:.0f} |")
    if starred:
        print("\n\\* the load generator's core was saturated and the router's was not: the router's own ceiling "
              "is higher (about req/s ÷ its busy share).")
    for name, why in failed.items():
        print(f"\n{name}: not measured: {why}")
    for name in names:
        for x in runs.get(name, []):
            if x.get("first_error"):
                print(f"\n{name}: first error seen: {x['first_error']}")
                break

    peers = [p for p in PEERS if p in rows]
    if not peers:
        return
    print("\n## Ratios (router ÷ peer; lower is better, except max req/s)\n")
    print("| router ÷ peer | CPU per short chat | max req/s | added TTFT p50 | µs per paced chunk "
          "| µs per back-to-back chunk | idle CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, x in rows.items():
        if name == "direct":
            continue
        for p in peers:
            if p == name:
                continue
            y = rows[p]
            print(f"| {name} ÷ {p} | {ratio(x['cpu_ms'], y['cpu_ms'])} | {ratio(x['rps64'], y['rps64'])} | "
                  f"{ratio(x['added_ttft'], y['added_ttft'])} | {ratio(x['paced_us'], y['paced_us'])} | "
                  f"{ratio(x['b2b_us'], y['b2b_us'])} | {ratio(x['idle_ms_s'], y['idle_ms_s'])} |")

    t = rows.get("tiergate")
    if t is None:
        return

    def check(label: str, peer: str | None, limit: float) -> None:
        value = t[label]
        base = 1.0 if peer is None else (rows[peer][label] if peer in rows else None)
        target = f"{label_names[label]} ≤ {limit:g}" + (f"x {peer}" if peer else "")
        if value is None or base is None or base <= 0:
            print(f"- {target}: not measured")
            return
        got = value / base
        print(f"- {target}: {got:.2f}{'x ' + peer if peer else ''}: {'met' if got <= limit else 'NOT met'}")

    label_names = {"cpu_ms": "CPU per short chat (c=16)", "added_ttft": "added TTFT p50 (ms)",
                   "paced_us": "µs per paced chunk", "b2b_us": "µs per back-to-back chunk",
                   "idle_ms_s": "idle CPU (ms/s)", "err64": "errors at c=64"}
    print("\n## Issue #15 targets, for tiergate\n")
    check("cpu_ms", "sglang-router", 2.0)
    check("added_ttft", "vllm-router", 1.5)
    check("added_ttft", None, 1.0)
    check("paced_us", "aiohttp-passthrough", 1.1)
    check("b2b_us", "aiohttp-passthrough", 1.5)
    check("err64", None, 0.0)
    check("idle_ms_s", None, 2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=8.0, help="each load's length (default 8)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; medians are reported (default 3)")
    ap.add_argument("--routers", default=",".join(ALL[:6]),
                    help=f"comma list, a subset of {','.join(ALL)} (direct always runs: it is the TTFT baseline)")
    args = ap.parse_args()
    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        ap.error(f"unknown routers {unknown}; choose from {','.join(ALL)}")
    if "direct" not in names:
        names.insert(0, "direct")
    if "nginx" in names and shutil.which("nginx") is None:
        names.remove("nginx")
    names = [n for n in ALL if n in names]
    if os.cpu_count() is None or max(ROUTER_CPU, LOAD_CPU) >= (os.cpu_count() or 0):
        sys.exit("needs CPUs 0 and 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no process left behind
    idle_s = max(2.0, min(5.0, args.seconds / 2))

    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    os.sched_setaffinity(0, {LOAD_CPU})
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    tmp = Path(tempfile.mkdtemp(prefix="peers-"))
    fport = free_port()
    fake_url = f"http://127.0.0.1:{fport}"
    fake = subprocess.Popen(["taskset", "-c", str(LOAD_CPU), sys.executable, str(ROOT / "bench" / "fake_backend.py"),
                             str(fport), "--shaped"], stdout=subprocess.DEVNULL, start_new_session=True)
    runs: dict[str, list[dict[str, object]]] = {}
    failed: dict[str, str] = {}
    try:
        if not wait_http_ok(fake_url + "/health", 30):
            raise RuntimeError("the fake backend did not start")
        for rep in range(args.reps):
            for name in names:
                if name in failed:
                    continue
                t = time.perf_counter()
                try:
                    runs.setdefault(name, []).append(bench_one(name, fake_url, args.seconds, idle_s, tmp / name))
                except Exception as exc:  # one peer that does not start or answer must not stop the others
                    failed[name] = f"{type(exc).__name__}: {exc}"
                    runs.pop(name, None)
                print(f"rep {rep + 1}/{args.reps} {name}: {'failed' if name in failed else 'done'} "
                      f"in {time.perf_counter() - t:.0f} s", flush=True)
    finally:
        stop(fake)
        shutil.rmtree(tmp, ignore_errors=True)
    report(names, runs, failed, args.reps, args.seconds)
    print("\nload average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
