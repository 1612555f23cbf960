"""`tiergate serve` as a process: its children die with it, SIGTERM drains, a busy port fails at once.

Every test runs the real `python -m router.cli serve` with an embedded valkey and/or a simulated tier
(child processes), signals only the router's pid and watches /proc for its children.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from backends.sim.run import running_sim
from backends.valkey import free_port
from policies.schema import InstanceSpec, parse_policy
from router.app import create_app
from router.drain import DrainController
from router.settings import Settings
from tests.conftest import ROOT, serve_router
from tests.test_accounting import MSGS, ledger, policy_text, wait_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")


def slow_policy(tag: str, time_scale: float) -> str:
    """One simulated `fast` tier, slowed down `time_scale` times, and tenant `free-<tag>` (no budget)."""
    text = policy_text(tag, [], {"free": ""})
    return text.replace("simulate: {profile: qwen3-1.7b-fp8}",
                        f"simulate: {{profile: qwen3-1.7b-fp8, time_scale: {time_scale}}}")


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) ": state ppid ...
    return int(fields[1]), fields[0]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _ppid_and_state(int(entry))) is not None and info[1] != "Z":
            parent[int(entry)] = info[0]
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    info = _ppid_and_state(pid)
    return info is not None and info[1] != "Z"   # a zombie has exited; only its parent's wait is missing


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def wait_gone(pids: set[int], limit_s: float = 30.0) -> None:
    for _ in range(int(limit_s / 0.05)):
        if not any(alive(p) for p in pids):
            return
        await asyncio.sleep(0.05)
    left = {p: cmdline(p) for p in pids if alive(p)}
    raise AssertionError(f"children still running: {left}")


class Router:
    """One `tiergate serve` process with its own data dir and log."""

    def __init__(self, tmp: Path, policy: str, *, grace_s: float, timeout_s: float,
                 redis_url: str | None = None, workers: int = 1) -> None:
        (tmp / "policy.yaml").write_text(policy)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "router.log"
        env = {**os.environ, "TIERGATE_DATA_DIR": str(tmp / "data"), "TIERGATE_DRAIN_GRACE_S": str(grace_s),
               "TIERGATE_DRAIN_TIMEOUT_S": str(timeout_s)}
        env.pop("TIERGATE_REDIS_URL", None)
        argv = [sys.executable, "-m", "router.cli", "serve", "--policy", str(tmp / "policy.yaml"),
                "--port", str(self.port), *(["--redis-url", redis_url] if redis_url else []),
                *(["--workers", str(workers)] if workers > 1 else [])]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    async def ready(self, c: httpx.AsyncClient) -> None:
        for _ in range(1200):
            assert self.proc.poll() is None, self.tail()
            try:
                if (await c.get(self.url + "/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("router did not become ready: " + self.tail())

    async def exited(self, limit_s: float = 60.0) -> int:
        for _ in range(int(limit_s / 0.05)):
            if (rc := self.proc.poll()) is not None:
                return rc
            await asyncio.sleep(0.05)
        raise AssertionError("router did not exit: " + self.tail())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
async def test_children_die_with_the_router(tmp_path: Path, sig: signal.Signals) -> None:
    """Embedded valkey and the simulator go whichever way the router ends, SIGKILL included."""
    router = Router(tmp_path, slow_policy(uuid.uuid4().hex[:6], 1.0), grace_s=0.2, timeout_s=5)
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            await router.ready(c)
        kids = descendants(router.proc.pid)
        names = sorted(cmdline(p) for p in kids)
        assert len(kids) == 2, names
        assert any("valkey-server" in n for n in names) and any("router.cli sim" in n for n in names), names
        router.proc.send_signal(sig)
        rc = await router.exited()
        assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 0), router.tail()
        await wait_gone(kids)
    finally:
        router.kill()


async def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    """SIGTERM starts a long drain; SIGINT then ends the router without waiting, children included."""
    tag = uuid.uuid4().hex[:6]
    router = Router(tmp_path, slow_policy(tag, 40.0), grace_s=300, timeout_s=600)
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            await router.ready(c)
            kids = descendants(router.proc.pid)
            started, waiting = asyncio.Event(), [2]
            streams = [asyncio.create_task(_stream(c, router.url, f"sk-free-{tag}", 2000, started, waiting))
                       for _ in range(2)]
            await asyncio.wait_for(started.wait(), 60)
            router.proc.send_signal(signal.SIGTERM)
            assert (await c.get(router.url + "/ready")).status_code == 503
            router.proc.send_signal(signal.SIGINT)
            assert await router.exited(60) == 1, router.tail()    # far inside the 300 s grace
            await wait_gone(kids)
            for result in await asyncio.gather(*streams, return_exceptions=True):
                assert isinstance(result, BaseException) or "[DONE]" not in result   # cut, not finished
    finally:
        router.kill()


async def test_busy_port_fails_before_any_child_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "policy.yaml").write_text(slow_policy("busy", 1.0))
        env = {**os.environ, "TIERGATE_DATA_DIR": str(tmp_path / "data")}
        env.pop("TIERGATE_REDIS_URL", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.cli", "serve", "--policy", str(tmp_path / "policy.yaml"),
            "--port", str(port), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, (out, err)
    assert f"port {port} is in use" in err.decode()
    data = tmp_path / "data"
    assert not (data / "valkey").exists() and not list(data.glob("sim-*.log"))  # no child was started


def _events(body: str) -> list[str]:
    return [line[6:] for line in body.splitlines() if line.startswith("data: ")]


async def _stream(c: httpx.AsyncClient, url: str, key: str, max_tokens: int, started: asyncio.Event,
                  waiting: list[int]) -> list[str]:
    """One stream with per-chunk usage; sets `started` once every stream got its first token."""
    body = {"model": "chat", "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "messages": MSGS,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events: list[str] = []
    async with c.stream("POST", url + "/v1/chat/completions", json=body,
                        headers={"authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 2:
                waiting[0] -= 1
                if waiting[0] == 0:
                    started.set()
    return events


def _completion_tokens(events: list[str]) -> int:
    """The last usage the client saw (continuous usage stats): what it was sent."""
    seen = [json.loads(e)["usage"] for e in events if e.startswith("{") and '"usage"' in e]
    return int(seen[-1]["completion_tokens"]) if seen else 0


async def test_sigterm_drains_32_streams_to_done(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    router = Router(tmp_path, slow_policy(tag, 40.0), grace_s=2.0, timeout_s=60)
    n, max_tokens = 32, 60
    try:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            await router.ready(c)
            kids = descendants(router.proc.pid)
            started, waiting = asyncio.Event(), [n]
            streams = [asyncio.create_task(_stream(c, router.url, f"sk-free-{tag}", max_tokens, started, waiting))
                       for _ in range(n)]
            await asyncio.wait_for(started.wait(), 60)          # every stream is under way
            router.proc.send_signal(signal.SIGTERM)
            r = await c.get(router.url + "/ready")
            assert r.status_code == 503 and r.json()["status"] == "draining", r.text
            assert (await c.get(router.url + "/health")).status_code == 200   # alive: no restart mid-drain

            async def refused() -> bool:  # after the grace, new requests are turned away
                r = await c.post(router.url + "/v1/chat/completions", json={"model": "chat", "max_tokens": 1,
                                                                            "messages": MSGS},
                                 headers={"authorization": f"Bearer sk-free-{tag}"})
                if r.status_code == 200:
                    return False
                assert r.status_code == 503 and r.json()["error"]["code"] == "draining", r.text
                assert r.headers["connection"] == "close"
                return True
            await wait_for(refused, 30)
            done = await asyncio.gather(*streams)
        for events in done:                                     # none was cut
            assert events[-1] == "[DONE]", events[-3:]
            assert _completion_tokens(events) == max_tokens
        assert await router.exited() == 0, router.tail()
        await wait_gone(kids)
    finally:
        router.kill()


async def test_streams_past_the_drain_timeout_end_with_an_error_and_are_billed_once(
        tmp_path: Path, redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    text = slow_policy(tag, 40.0)
    router = Router(tmp_path, text, grace_s=0.2, timeout_s=1.5, redis_url=redis_url)
    n = 8
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            await router.ready(c)
            started, waiting = asyncio.Event(), [n]
            streams = [asyncio.create_task(_stream(c, router.url, f"sk-free-{tag}", 2000, started, waiting))
                       for _ in range(n)]
            await asyncio.wait_for(started.wait(), 60)
            router.proc.send_signal(signal.SIGTERM)
            done = await asyncio.gather(*streams)
            assert await router.exited() == 0, router.tail()
            sent = 0
            for events in done:                                 # cut: an error event, no [DONE]
                assert "[DONE]" not in events
                error: dict[str, Any] = json.loads(events[-1])["error"]
                assert error["code"] == "draining" and error["type"] == "server_error"
                tokens = _completion_tokens(events)
                assert 1 <= tokens < 2000
                sent += tokens
            async with serve_router(parse_policy(text, "lifecycle.yaml"), redis_url=redis_url) as reader:
                async def settled() -> bool:
                    return bool((await ledger(c, reader, f"free-{tag}"))["requests"] >= n)
                await wait_for(settled)
                totals = await ledger(c, reader, f"free-{tag}")
            assert totals["requests"] == n                      # each cut stream billed once
            assert totals["completion_tokens"] == sent          # for exactly what its client was sent
    finally:
        router.kill()


async def test_ready_stays_200_with_every_backend_down() -> None:
    """Backends down must not take the router out of its Service: their health is in the body."""
    tag = uuid.uuid4().hex[:6]
    dead = f"http://127.0.0.1:{free_port()}"
    async with serve_router(parse_policy(policy_text(tag, [dead], {"free": ""}), "down.yaml")) as base, \
            httpx.AsyncClient(base_url=base) as c:
        r = await c.get("/ready")
        assert r.status_code == 200 and r.json()["reachable_instances"] == {"fast": 0}, r.text
        assert r.json()["status"] == "ready"
        metrics = (await c.get("/metrics")).text
        assert f'tiergate_instance_healthy{{instance="i0-{tag}",tier="fast"}} 0.0' in metrics


async def test_drain_states_in_process_with_an_injected_clock(tmp_path: Path) -> None:
    """/ready turns 503 at `begin`; new requests are taken during the grace, refused after it."""
    tag = uuid.uuid4().hex[:6]
    now = [100.0]
    drain = DrainController(grace_s=5.0, timeout_s=30.0, clock=lambda: now[0])
    port = free_port()
    auth = {"authorization": f"Bearer sk-free-{tag}"}
    body = {"model": "chat", "max_tokens": 2, "messages": MSGS}
    async with running_sim("qwen3-1.7b-fp8", time_scale=0.1) as sim:
        pol = parse_policy(policy_text(tag, [sim.url], {"free": ""}), "drain.yaml")
        app = create_app(Settings(port=port, probe_interval_s=3600, data_dir=str(tmp_path)), policy=pol,
                         instance_urls={"fast": [InstanceSpec(id=f"i0-{tag}", url=sim.url)]}, drain=drain)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                               lifespan="on", access_log=False))
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:
                assert not task.done()
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                assert (await c.get("/ready")).json()["status"] == "ready"
                assert drain.begin() and not drain.begin()             # once
                r = await c.get("/ready")
                assert r.status_code == 503 and r.json() | {"ready": False, "status": "draining"} == r.json()
                assert (await c.post("/v1/chat/completions", headers=auth, json=body)).status_code == 200
                now[0] += 5.0                                          # the grace is over
                r = await c.post("/v1/chat/completions", headers=auth, json=body)
                assert r.status_code == 503 and r.headers["connection"] == "close"
                assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "server_error",
                                             "param": None, "code": "draining"}
                assert (await c.get("/health")).status_code == 200    # liveness and metrics still answer
                assert (await c.get("/metrics")).status_code == 200
                assert drain.active == 0 and drain.refused == 1
        finally:
            server.should_exit = True
            await task
