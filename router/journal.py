"""A local append-only usage journal: where settlements go while Redis is away.

Each line is one JSON record `{tenant, id, usage}`, appended (a failed settlement flush's records in one
write) and fsync'd on a single writer thread (never on the event loop), which also owns the `pending`
count and reads the files back for a replay. `replay` renames the journal aside (new
appends start a fresh file), settles every record through a callback that is
idempotent per request id, and deletes the file only when every record is in;
a crash mid-replay leaves the renamed file, which the next replay picks up.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec

from router.budget_store import Usage


class Entry(msgspec.Struct):
    tenant: str
    id: str
    usage: Usage


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(Entry)


class Journal:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "usage.jsonl"
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="tiergate-journal")
        self.pending = self._count()  # records left by an earlier run

    def _count(self) -> int:
        return sum(1 for f in self.dir.glob("usage*.jsonl") for line in f.read_bytes().splitlines() if line.strip())

    def _append_sync(self, lines: bytes, n: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            view = memoryview(lines)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.pending += n  # changed only on the writer thread

    async def append(self, tenant: str, rid: str, usage: Usage) -> None:
        await self.append_many([(tenant, rid, usage)])

    async def append_many(self, items: Sequence[tuple[str, str, Usage]]) -> None:
        """Append (tenant, id, usage) records with one write and one fsync (a failed settlement flush)."""
        lines = b"".join(_enc.encode(Entry(t, rid, u)) + b"\n" for t, rid, u in items)
        await asyncio.get_running_loop().run_in_executor(self._writer, self._append_sync, lines, len(items))

    async def replay(self, settle: Callable[[str, str, Usage], Awaitable[object]]) -> int:
        """Settle every journaled record; returns how many were replayed. Raises if the store fails."""
        if self.path.exists() and self.path.stat().st_size:
            self.path.rename(self.dir / f"usage.{time.time_ns()}.replay.jsonl")
        done = 0
        loop = asyncio.get_running_loop()
        for f in sorted(self.dir.glob("usage.*.replay.jsonl")):
            raw = await loop.run_in_executor(self._writer, f.read_bytes)
            for line in raw.splitlines():
                if not line.strip():
                    continue
                try:
                    e = _dec.decode(line)
                except msgspec.DecodeError:
                    continue  # a torn last line from a crash mid-append: nothing was acknowledged for it
                await settle(e.tenant, e.id, e.usage)
                done += 1
            f.unlink()
        self.pending = await loop.run_in_executor(self._writer, self._count)  # what arrived meanwhile
        return done

    def close(self) -> None:
        self._writer.shutdown(wait=True)
