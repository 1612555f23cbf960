"""Active health probes: GET /health on every instance, on an interval. Lifespan-owned."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable

from backends.http_client import UpstreamClient, UpstreamConnectError
from backends.registry import InstanceState, Registry


async def probe_once(client: UpstreamClient, registry: Registry, timeout_s: float = 1.0) -> None:
    async def one(inst: InstanceState) -> None:
        try:
            status, _ = await client.get(inst.url + "/health", timeout_s)
            inst.healthy = status == 200
        except UpstreamConnectError:
            inst.healthy = False

    await asyncio.gather(*(one(i) for i in registry.all_instances()))


async def probe_forever(client: UpstreamClient, registry: Registry, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        await probe_once(client, registry)


def wait_http_ok(url: str, timeout_s: float, alive: Callable[[], bool] | None = None) -> bool:
    """Block until GET `url` answers 200 (True), the deadline passes or `alive()` turns False (False).

    For start-up and scripts only: it sleeps, so never call it on the event loop.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False
