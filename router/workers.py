"""`tiergate serve --workers N`: N router processes serving one port, as replicas of one another.

The supervisor (the process the operator started) validates the policy, binds and listens on the port,
starts the embedded stack once (one valkey and one set of simulators, not N), and then starts N
worker processes. Each worker inherits the listening socket (the kernel hands each new connection
to one of the workers blocked in accept, as under gunicorn or uvicorn's own `--workers`) and runs the
whole app: its own event loop, upstream pools, load sync, KV-event subscribers, probes and policy
watcher. The workers share Redis, so budgets, affinity, windows and load agree exactly as separate
router replicas do (load sync, router/load_sync.py). Per worker:

- `TIERGATE_DATA_DIR` is `<data_dir>/worker-<i>`, so each has its own usage journal; a worker that
  is started again in the same slot replays what its predecessor left there.
- Prometheus runs in multiprocess mode (`PROMETHEUS_MULTIPROC_DIR=<data_dir>/metrics`, emptied at
  start): whichever worker answers /metrics reports the sum over all of them (router/metrics.py).

Signals: SIGTERM (or SIGINT) to the supervisor is passed on to every worker, each drains as a lone
router does (router/drain.py), and the supervisor waits `drain_grace_s + drain_timeout_s + 10` s for
them before it kills what is left and stops the stack. A second signal is passed on too, which makes
the workers exit at once. A worker that exits on its own is started again in its slot, after a pause
that doubles (0.5 s up to 30 s) while workers keep dying within 10 s of their start. Workers die with
the supervisor, however it ends (backends/procs.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import msgspec

from backends.procs import start_child
from policies.schema import InstanceSpec
from router.logs import get_logger
from router.settings import Settings

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
HEALTHY_AFTER_S = 10.0   # a worker that ran this long resets the restart pause


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.pause_s = RESTART_MIN_S
        self.restart_at: float | None = None


class WorkerPool:
    """N worker processes on one listening socket (module doc). Call from the main thread."""

    def __init__(self, n: int, sock: socket.socket, settings: Settings,
                 instances: dict[str, list[InstanceSpec]]) -> None:
        self.sock = sock
        self.settings = settings
        self.dir = Path(settings.data_dir)
        self.metrics_dir = self.dir / "metrics"
        self.slots = [_Slot(i) for i in range(n)]
        self.log = get_logger("tiergate")
        self.stopping = False
        self._signals = 0
        self._wake = threading.Event()
        self._instances_file = self.dir / "instances.json"
        self._instances_file.write_bytes(msgspec.json.encode(instances))

    def env(self, index: int) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update({"TIERGATE_POLICY_PATH": str(Path(s.policy_path).resolve()), "TIERGATE_HOST": s.host,
                    "TIERGATE_PORT": str(s.port), "TIERGATE_HTTP_CLIENT": s.http_client,
                    "TIERGATE_DATA_DIR": str((self.dir / f"worker-{index}").resolve()),
                    "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir.resolve())})
        if s.redis_url:
            env["TIERGATE_REDIS_URL"] = s.redis_url
        return env

    def start(self) -> None:
        if self.metrics_dir.exists():
            shutil.rmtree(self.metrics_dir)   # counters of an earlier run must not add to this one's
        self.metrics_dir.mkdir(parents=True)
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        fd = self.sock.fileno()
        argv = [sys.executable, "-m", "router.cli", "serve", "--worker-fd", str(fd),
                "--worker-instances", str(self._instances_file.resolve())]
        slot.proc = start_child(argv, stdout=None, stderr=None, env=self.env(slot.index), pass_fds=(fd,))
        slot.started, slot.restart_at = time.monotonic(), None
        self.log.info("worker_started", worker=slot.index, pid=slot.proc.pid)

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.slots if s.proc is not None and s.proc.poll() is None]

    def handle_signal(self, sig: int, _frame: FrameType | None) -> None:
        """Pass the signal on (module doc); runs in the main thread between `supervise` steps."""
        self.stopping = True
        self._signals += 1
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(sig if self._signals == 1 else signal.SIGTERM)
        self._wake.set()

    def supervise(self) -> None:
        """Restart workers that exit on their own until a signal arrives, then wait for the drain."""
        while not self.stopping:
            self.reap()
            self._wake.wait(0.25)
        self.wait_all(self.settings.drain_grace_s + self.settings.drain_timeout_s + 10)

    def reap(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                code = slot.proc.returncode
                self._mark_dead(slot.proc.pid)
                slot.proc = None
                slot.pause_s = RESTART_MIN_S if now - slot.started >= HEALTHY_AFTER_S \
                    else min(slot.pause_s * 2, RESTART_MAX_S)
                slot.restart_at = now + slot.pause_s
                self.log.warning("worker_exited", worker=slot.index, exit_code=code, restart_in_s=slot.pause_s)
            if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at and not self.stopping:
                self._spawn(slot)

    def wait_all(self, timeout_s: float) -> None:
        """Wait for every worker to exit (bounded); SIGKILL those still running after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        for slot in self.slots:
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                self.log.warning("worker_killed", worker=slot.index, pid=slot.proc.pid)
                slot.proc.kill()
                slot.proc.wait()
            self._mark_dead(slot.proc.pid)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        # its live gauges leave the sums


def load_instances(path: str) -> dict[str, list[InstanceSpec]]:
    """The simulated instances the supervisor started, as a worker reads them."""
    return msgspec.json.decode(Path(path).read_bytes(), type=dict[str, list[InstanceSpec]])


def worker_socket(fd: int) -> socket.socket:
    """The listening socket inherited from the supervisor."""
    return socket.socket(fileno=fd)
