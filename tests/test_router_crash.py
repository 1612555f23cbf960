"""A router process killed mid-request: its reservations expire, nothing is billed twice, the other replica goes on.

Replica A is a real `tiergate serve` process; replica B runs in-process. Both share one Redis and one
simulated backend. A holds the capped tenant's whole daily budget in two open streams and is killed
with SIGKILL, so nothing of it settles or says goodbye.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx

from backends.sim.run import start_sim
from backends.valkey import free_port
from policies.schema import parse_policy
from router.budget_store import price_units
from tests.conftest import serve_router
from tests.test_accounting import MSGS, ledger, policy_text, wait_for, worst_case_units

TTL_S = 2.0


def crash_policy(tag: str, sim_url: str, daily_usd: float) -> str:
    return policy_text(tag, [sim_url], {"capped": f", budgets: {{daily_usd: {daily_usd!r}}}",
                                        "free": ", budgets: {daily_usd: 100.0}"},
                       extra=f"accounting: {{reservation_ttl_s: {TTL_S}}}")


def tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def wait_healthy(c: httpx.AsyncClient, base: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    for _ in range(600):
        assert proc.returncode is None, tail(log)
        try:
            if (await c.get(base + "/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("router A did not start: " + tail(log))


async def test_killed_router_reservations_expire_and_the_other_replica_is_unaffected(
        redis_url: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    capped = {"authorization": f"Bearer sk-capped-{tag}"}
    free = {"authorization": f"Bearer sk-free-{tag}"}
    long_body = {"model": "chat", "max_tokens": 400, "stream": True, "ignore_eos": True, "messages": MSGS}
    worst = worst_case_units(400)
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=20.0)     # slow: A's streams outlive A
    text = crash_policy(tag, sim.url, daily_usd=(2 * worst + worst // 2) / 1e10)  # fits two of A's streams
    (tmp_path / "policy.yaml").write_text(text)
    port_a = free_port()
    log = tmp_path / "router-a.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "router.cli", "serve", "--policy", str(tmp_path / "policy.yaml"),
            "--port", str(port_a), "--redis-url", redis_url,
            env={**os.environ, "TIERGATE_DATA_DIR": str(tmp_path / "a")}, stdout=out, stderr=subprocess.STDOUT)
    a = f"http://127.0.0.1:{port_a}"
    try:
        async with httpx.AsyncClient(timeout=60) as c, \
                serve_router(parse_policy(text, "crash.yaml"), redis_url=redis_url) as b:
            await wait_healthy(c, a, proc, log)

            # B serves the free tenant throughout: streams that start before the kill and end after it.
            async def b_stream() -> int:
                body = {**long_body, "max_tokens": 40}
                async with c.stream("POST", b + "/v1/chat/completions", headers=free,
                                    json={**body, "stream_options": {"include_usage": True}}) as r:
                    assert r.status_code == 200
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                assert lines[-1] == "data: [DONE]"
                usage: dict[str, Any] = httpx.Response(200, content=lines[-2][6:]).json()["usage"]
                return int(usage["completion_tokens"])
            b_work = [asyncio.create_task(b_stream()) for _ in range(4)]

            # A takes the capped tenant's whole budget in two streams, which get their first tokens.
            held: list[Any] = []
            for _ in range(2):
                cm = c.stream("POST", a + "/v1/chat/completions", headers=capped, json=long_body)
                r = await cm.__aenter__()
                assert r.status_code == 200
                lines = r.aiter_lines()
                while not (await anext(lines)).startswith("data: {"):
                    pass
                held.append((cm, lines))
            r = await c.post(b + "/v1/chat/completions", headers=capped, json={**long_body, "stream": False})
            assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"   # A holds it all

            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            for cm, _ in held:                        # the client sees A's streams cut
                try:
                    await cm.__aexit__(None, None, None)
                except httpx.TransportError:
                    pass

            # Once their TTL is past, A's reservations are released (B's next admission or its sweeper).
            async def admitted_again() -> bool:  # a full worst case fits again; the client leaves early
                async with c.stream("POST", b + "/v1/chat/completions", headers=capped, json=long_body) as r:
                    assert r.status_code in (200, 429), await r.aread()
                    if r.status_code == 429:
                        return False
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            break
                return True
            await wait_for(admitted_again, 30)

            served_b = await asyncio.gather(*b_work)   # B's own streams were never disturbed
            assert all(n == 40 for n in served_b)

            async def settled() -> bool:
                return bool((await ledger(c, b, f"capped-{tag}"))["requests"] == 1
                            and (await ledger(c, b, f"free-{tag}"))["requests"] == 4)
            await wait_for(settled)
            await asyncio.sleep(0.3)
            cap, fr = await ledger(c, b, f"capped-{tag}"), await ledger(c, b, f"free-{tag}")
            assert cap["requests"] == 1 and 1 <= cap["completion_tokens"] < 400  # A's killed streams bill nothing
            assert fr["completion_tokens"] == sum(served_b)                     # B's exactly, once
            status = (await c.get(b + "/v1/usage", headers=capped)).json()["budget"]
            assert status["reserved_today_usd"] == 0                            # nothing left held
            one = ((cap["prompt_tokens"] - cap["cached_tokens"]) * price_units(0.05)
                   + cap["cached_tokens"] * price_units(0.01) + cap["completion_tokens"] * price_units(0.20))
            assert round(cap["cost_usd"] * 1e10) == one                          # the one bill is B's request
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await sim.close()
