"""Active health probes: GET /health on every instance, on an interval. Lifespan-owned."""

from __future__ import annotations

import asyncio

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
