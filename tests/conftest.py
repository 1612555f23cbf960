"""Shared fixtures: a real Redis-protocol server, simulators over sockets, and the `make run` stack."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import uvicorn

from backends.health import wait_http_ok
from backends.valkey import EmbeddedValkey, free_port
from policies.schema import InstanceSpec, Policy
from router.affinity_store import AffinityStore
from router.app import create_app
from router.settings import Settings
from tests.redis_servers import redis_up

ROOT = Path(__file__).resolve().parent.parent
DEMO_KEY = "sk-tiergate-demo"
FAST_ONLY_KEY = "sk-tiergate-fastonly"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis when it runs, else a private valkey-server. Never a fake."""
    if redis_up(6379):
        yield "redis://127.0.0.1:6379/15"
        return
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis Cluster (3 masters, 3 replicas) on loopback, for the session; its URL as the router
    takes it (`redis+cluster://`). Started only by the tests that ask for it."""
    from tests.redis_servers import private_cluster
    with private_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster.url


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[AffinityStore]:
    """The shared prefix-affinity index (router/affinity_store.py) on the test Redis."""
    r = aioredis.Redis.from_url(redis_url)
    try:
        yield AffinityStore(r, timeout_s=1.0)
    finally:
        await r.aclose()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis (the stores' contract tests build their stores on it)."""
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    """A store twin contract test runs once on the in-memory twin and once on the Redis store."""
    return str(request.param)


class Stack:
    def __init__(self, url: str, log_path: Path) -> None:
        self.url = url
        self.log_path = log_path

    def log_text(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`tiergate serve` as `make run` starts it: embedded valkey and three simulated tiers."""
    data = tmp_path_factory.mktemp("stack")
    port = free_port()
    log_path = data / "router.log"
    env = {**os.environ, "TIERGATE_DATA_DIR": str(data), "TIERGATE_MAX_BODY_BYTES": str(4 * 1024 * 1024),
           "TIERGATE_DRAIN_GRACE_S": "0", "TIERGATE_DRAIN_TIMEOUT_S": "5"}  # teardown: no traffic to wait for
    env.pop("TIERGATE_REDIS_URL", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if not wait_http_ok(url + "/ready", 90, alive=lambda: proc.poll() is None):
        proc.kill()
        raise RuntimeError("stack did not start:\n" + log_path.read_text()[-3000:])
    try:
        yield Stack(url, log_path)
    finally:
        proc.terminate()   # drains, then stops its valkey and simulators (which die with it regardless)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def serve_router(policy: Policy, urls: Mapping[str, Sequence[tuple[str, str] | InstanceSpec]] | None = None,
                       **settings: object) -> AsyncIterator[str]:
    """An in-process router on a real socket, on the test's event loop."""
    port = free_port()
    settings.setdefault("data_dir", tempfile.mkdtemp(prefix="tg-router-"))  # its own usage journal
    watch = bool(settings.pop("watch_policy", False))
    tracing = settings.pop("tracer", None)   # a router/tracing.py Tracing with a test exporter
    s = Settings(port=port, probe_interval_s=3600, **settings)  # type: ignore[arg-type]
    specs = {t: [i if isinstance(i, InstanceSpec) else InstanceSpec(id=i[0], url=i[1]) for i in lst]
             for t, lst in (urls or {}).items()}
    app = create_app(s, policy=policy, instance_urls=specs, watch_policy=watch, tracing=tracing)  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           lifespan="on", access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
