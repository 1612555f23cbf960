"""Idle CPU of `tiergate serve` on its embedded default (simulated Qwen3 tiers, embedded valkey): the
router process's own CPU milliseconds per second with no traffic, and of each child (simulators, valkey).

Issue #15's target: the router's background loops (load sync, scrapes, probes, KV-event flush, reload
checks) cost <= 2 ms of CPU per second when idle.

Usage: python bench/idle_cpu.py [--seconds 20] [--warmup 5] [--policy policies/examples/demo.yaml]
Prints: CPU ms/s of the router process and of each child over the window, and the load average.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.health import wait_http_ok  # noqa: E402
from backends.valkey import free_port  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from overhead import cpu_seconds  # noqa: E402


def children(pid: int) -> dict[int, str]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except OSError:
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--policy", default=str(ROOT / "policies" / "examples" / "demo.yaml"))
    args = ap.parse_args()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--port", str(port),
                             "--policy", args.policy], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_http_ok(f"http://127.0.0.1:{port}/ready", 120):
            raise SystemExit("tiergate serve did not become ready")
        time.sleep(args.warmup)
        kids = children(proc.pid)
        load0 = os.getloadavg()[0]
        t0 = time.monotonic()
        c0 = {pid: cpu_seconds(pid) for pid in [proc.pid, *kids]}
        time.sleep(args.seconds)
        dt = time.monotonic() - t0
        c1 = {pid: cpu_seconds(pid) for pid in c0}
        print(f"idle window {dt:.1f} s, load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")
        print(f"  router (tiergate serve)  {1000 * (c1[proc.pid] - c0[proc.pid]) / dt:7.2f} ms CPU per second")
        for pid, cmd in kids.items():
            print(f"  child {cmd[:60]:<60} {1000 * (c1[pid] - c0[pid]) / dt:7.2f} ms/s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
