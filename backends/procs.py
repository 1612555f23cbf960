"""Child processes that die with their parent: the embedded valkey and simulators of `tiergate serve`.

Each child is started through a few lines of Python that ask Linux for a parent-death signal
(`prctl(PR_SET_PDEATHSIG, SIGTERM)`), check that the parent is still the one that started it (it may
have died before the prctl), and then exec the real program in the same process. So even a SIGKILL of
the router takes its children down, without a `preexec_fn` (unsafe once threads exist) and without
passing file descriptors. Each child also gets its own process group, so a Ctrl-C in the terminal
reaches only the router, which drains first and then stops its children itself.

The signal follows the *thread* that started the child: start children from the main thread.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

PR_SET_PDEATHSIG = 1
_LAUNCHER = (
    "import ctypes,os,sys\n"
    "libc=ctypes.CDLL(None,use_errno=True)\n"
    f"if libc.prctl({PR_SET_PDEATHSIG},{int(signal.SIGTERM)},0,0,0)!=0:\n"
    "    raise OSError(ctypes.get_errno(),'prctl(PR_SET_PDEATHSIG)')\n"
    "if os.getppid()!=int(sys.argv[1]):\n"
    "    sys.exit(0)\n"
    "os.execv(sys.argv[2],sys.argv[2:])\n"
)


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv`, run so that the process gets SIGTERM when this one dies (Linux; elsewhere `argv` unchanged)."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *argv]


def start_child(argv: Sequence[str], *, stdout: IO[Any] | int | None = subprocess.DEVNULL,
                stderr: IO[Any] | int | None = subprocess.DEVNULL, env: dict[str, str] | None = None,
                pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start a child that dies with this process, in its own process group (see the module doc).
    `pass_fds`: descriptors the child inherits (a router worker's listening socket)."""
    program = argv[0]
    if os.sep not in program:  # execv takes no PATH search
        program = shutil.which(program) or program
    return subprocess.Popen(die_with_parent([program, *argv[1:]]), stdout=stdout, stderr=stderr,
                            process_group=0, env=env, pass_fds=tuple(pass_fds))


def stop_children(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 5.0) -> None:
    """SIGTERM every child at once, wait for them together (bounded), SIGKILL the ones still running."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
