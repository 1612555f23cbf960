"""Policy parsing for hot reload in a short-lived child process, so no file can stall the router's loop.

`python -m router.policy_worker SOURCE` reads the policy text (UTF-8) on stdin, runs
`policies.schema.parse_policy` (the strict YAML loader, msgspec conversion, semantic checks) and writes
one msgpack `Reply` on stdout: the policy, or the error (`<source>:<line>: <$.path>: <message>`).

Why a process and not a thread: a thread keeps the loop free of the parse's bytecode, not of what holds
the GIL in one piece. Measured on a 1 MB policy of 10,000 tenants (bench/hardening_reload.py): in a
thread, the cyclic GC's full collections while the YAML node tree grows stalled the loop up to ~300 ms
each, and freeing the node tree at the end ~35 ms more, in one deallocation cascade. In a child, the
parse's garbage, collections and peak memory are the child's. The router decodes the finished policy
(msgpack into the frozen Structs: ~10 ms for 10,000 tenants, one C call) on its executor.

Limits: the file size cap is checked before this runs (policies/yaml_loader.read_policy_text); the child
caps its own address space at `MEMORY_LIMIT_BYTES` (a MemoryError becomes a refusal) and the caller kills
it after `timeout_s`. A crash or a kill is a refusal too: the running policy stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from concurrent.futures import Executor
from pathlib import Path

import msgspec

from policies.schema import Policy

MEMORY_LIMIT_BYTES = 4 * 1024 ** 3      # the child's address space (RLIMIT_AS); a 4 MiB file needs far less
_ROOT = str(Path(__file__).resolve().parent.parent)     # where `router` and `policies` are, for the child


class Reply(msgspec.Struct, kw_only=True):
    policy: Policy | None = None
    error: str | None = None


_decoder = msgspec.msgpack.Decoder(Reply)


async def parse_in_child(text: str, source: str, executor: Executor, timeout_s: float = 60.0) -> Policy:
    """The parsed, validated policy; ValueError (its message names source, line and path) when refused."""
    path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router.policy_worker", source, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": path})
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(text.encode())
    except TimeoutError:
        raise ValueError(f"{source}: parsing took longer than {timeout_s:g} s; policy not reloaded") from None
    finally:
        if proc.returncode is None:     # timed out or cancelled: the child goes too
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        last = (err.decode(errors="replace").strip().splitlines() or [""])[-1][:300]
        raise ValueError(f"{source}: the policy parser exited with status {proc.returncode} ({last}); "
                         "policy not reloaded")
    try:
        reply = await asyncio.get_running_loop().run_in_executor(executor, _decoder.decode, out)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{source}: the policy parser's reply is unreadable ({exc})") from None
    if reply.error is not None or reply.policy is None:
        raise ValueError(reply.error or f"{source}: the policy parser returned nothing")
    return reply.policy


def main(argv: list[str]) -> int:
    source = argv[1] if len(argv) > 1 else "<policy>"
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    from policies.schema import parse_policy
    try:
        text = sys.stdin.buffer.read().decode("utf-8")
        reply = Reply(policy=parse_policy(text, source))
    except ValueError as exc:               # PolicyError is a ValueError; so is a decode error
        reply = Reply(error=str(exc))
    except MemoryError:
        reply = Reply(error=f"{source}: parsing needs more than {MEMORY_LIMIT_BYTES:,} bytes of memory")
    except RecursionError:
        reply = Reply(error=f"{source}: the policy is nested too deeply to parse")
    sys.stdout.buffer.write(msgspec.msgpack.encode(reply))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
