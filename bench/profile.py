"""Profile tiergate's event-loop thread under load with py-spy, and print where the time goes.

Starts the fake backend (bench/fake_backend.py --shaped, CPU 1) and `tiergate serve` with bench/peers.py's
policy (every feature on: exact tokenization, affinity, admission and settlement; router on CPU 0), drives
short non-streamed chats (or streams) at --conc for --seconds, and records the router with
`py-spy record` (raw, 500 Hz, Python frames only). Prints the top functions by own time and by time
including callees (in the router's own files and overall), as shares of the samples, and writes the
raw stacks to --out for a flame graph (e.g. `py-spy record -f speedscope`, or inferno over the raw file).

Usage: python bench/profile.py [--seconds 10] [--conc 16] [--stream-chunks 0] [--gap-ms 2] [--out profile.raw]
Needs: py-spy (pip install py-spy); Redis at BENCH_REDIS_URL (default redis://127.0.0.1:6379/14).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import peers  # noqa: E402


def summarize(raw: Path, top: int) -> None:
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        k = int(n)
        frames = stack.split(";")
        if not any("asyncio" in f or "uvicorn" in f for f in frames[:4]):
            continue                                 # other threads (the tokenizer pool, py-spy's own)
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    if not total:
        print("no samples from the event-loop thread")
        return
    print(f"{total} samples of the event-loop thread")
    print(f"\nby own time (top {top}):")
    for f, k in own.most_common(top):
        print(f"  {100 * k / total:5.1f}%  {f[:130]}")
    print(f"\nincluding callees, tiergate's own functions (top {top}):")
    mine = [(f, k) for f, k in incl.items() if "/router/" in f or "/backends/" in f or "/policies/" in f]
    for f, k in sorted(mine, key=lambda x: -x[1])[:top]:
        print(f"  {100 * k / total:5.1f}%  {f[:130]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--conc", type=int, default=16)
    ap.add_argument("--stream-chunks", type=int, default=0, help="0: short non-streamed chats; N: streams of N")
    ap.add_argument("--gap-ms", type=int, default=2, help="ms between stream chunks (0: back to back)")
    ap.add_argument("--out", default="profile.raw")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("needs py-spy: pip install py-spy")
    os.sched_setaffinity(0, {peers.LOAD_CPU})
    tmp = Path(tempfile.mkdtemp(prefix="profile-"))
    fport = peers.free_port()
    fake_url = f"http://127.0.0.1:{fport}"
    fake = subprocess.Popen(["taskset", "-c", str(peers.LOAD_CPU), sys.executable,
                             str(ROOT / "bench" / "fake_backend.py"), str(fport), "--shaped"],
                            stdout=subprocess.DEVNULL, start_new_session=True)
    r = None
    try:
        if not peers.wait_http_ok(fake_url + "/health", 30):
            raise RuntimeError("the fake backend did not start")
        r, ready = peers.launch("tiergate", fake_url, tmp)
        if not peers.wait_http_ok(ready, 90):
            raise RuntimeError("tiergate did not become ready")
        assert r.proc is not None
        if args.stream_chunks:
            body = peers.STREAM % (r.model, args.stream_chunks, args.stream_chunks, args.gap_ms)
        else:
            body = peers.SHORT % r.model
        asyncio.run(peers.run_load(r, body, args.conc, 2.0, bool(args.stream_chunks), lambda: 0.0))  # warm up
        spy_proc = subprocess.Popen([spy, "record", "-p", str(r.proc.pid), "-r", "500", "-d",
                                     str(int(args.seconds)), "-f", "raw", "-o", args.out, "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        load = asyncio.run(peers.run_load(r, body, args.conc, args.seconds, bool(args.stream_chunks),
                                          lambda: peers.group_cpu(r.proc.pid)))  # type: ignore[union-attr]
        spy_proc.wait(60)
        print(f"{load.n} requests, {load.errors} errors, {load.n / load.wall:,.0f} req/s, router CPU "
              f"{1000 * load.cpu / max(load.n, 1):.3f} ms per request (py-spy attached: inflated)")
        summarize(Path(args.out), args.top)
    finally:
        if r is not None and r.proc is not None:
            peers.stop(r.proc)
        peers.stop(fake)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
