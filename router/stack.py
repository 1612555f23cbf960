"""The embedded default: a private valkey-server and simulated tiers, as child processes.

Every child dies with the router, however the router ends (see backends/procs.py); `stop` ends them
in an orderly way first when the router shuts down normally.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from backends.health import wait_http_ok
from backends.procs import start_child, stop_children
from backends.valkey import EmbeddedValkey, free_port
from policies.schema import InstanceSpec, Policy


class EmbeddedStack:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.valkey: EmbeddedValkey | None = None
        self.sims: list[subprocess.Popen[bytes]] = []

    def pids(self) -> list[int]:
        """Every child process started so far (valkey and simulators)."""
        procs = [*self.sims, *([self.valkey.proc] if self.valkey and self.valkey.proc else [])]
        return [p.pid for p in procs]

    def start_valkey(self) -> str:
        self.valkey = EmbeddedValkey(self.data_dir / "valkey")
        self.valkey.start()
        return self.valkey.url

    def start_sims(self, policy: Policy, host: str = "127.0.0.1") -> dict[str, list[InstanceSpec]]:
        """Start every simulated tier's replicas, each publishing vLLM KV events over ZMQ."""
        urls: dict[str, list[InstanceSpec]] = {}
        pending: list[str] = []
        for name, tier in policy.tiers.items():
            if tier.instances or tier.simulate is None:
                continue
            for i in range(tier.simulate.replicas):
                port, kv_port = free_port(), free_port()
                kv = f"tcp://{host}:{kv_port}"
                with open(self.data_dir / f"sim-{name}-{i}.log", "ab") as log:
                    self.sims.append(start_child(
                        [sys.executable, "-m", "router.cli", "sim", "--profile", tier.simulate.profile,
                         "--host", host, "--port", str(port), "--served-model-name", tier.model,
                         "--time-scale", str(tier.simulate.time_scale),
                         "--kv-events-config", f'{{"enable_kv_cache_events": true, "publisher": "zmq", '
                                               f'"endpoint": "{kv}", "topic": "kv-events"}}'],
                        stdout=log, stderr=subprocess.STDOUT))
                url = f"http://{host}:{port}"
                urls.setdefault(name, []).append(InstanceSpec(id=f"{name}-sim-{i}", url=url, kv_events=kv))
                pending.append(url)
        deadline = time.monotonic() + 60
        for url in pending:
            if not wait_http_ok(url + "/health", max(deadline - time.monotonic(), 0.1),
                                alive=lambda: all(p.poll() is None for p in self.sims)):
                raise RuntimeError(f"simulator at {url} did not become healthy; see {self.data_dir}/sim-*.log")
        return urls

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every child together, SIGKILL what still runs after `timeout_s`."""
        procs = [*self.sims, *([self.valkey.proc] if self.valkey and self.valkey.proc else [])]
        stop_children(procs, timeout_s)
        self.sims = []
        if self.valkey is not None:
            self.valkey.proc = None
