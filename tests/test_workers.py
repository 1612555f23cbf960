"""`tiergate serve --workers N` (router/workers.py): each worker serves, they share Redis state, one that
dies is started again, /metrics sums them, and SIGTERM drains them all and stops every child.

The real `python -m router.cli serve --workers 2` runs with a simulated tier. Which worker accepts a
connection is the kernel's choice, so the tests steer it: a worker stopped with SIGSTOP accepts
nothing, and every new connection goes to the other one.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from tests.test_accounting import FAST, MSGS, policy_text
from tests.test_lifecycle import Router, cmdline, descendants, wait_gone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")


def _worker_pids(router: Router) -> list[int]:
    """Live workers, from the supervisor's `worker_started` log lines (latest per slot)."""
    slots: dict[int, int] = {}
    for line in router.log.read_text().splitlines():
        if '"worker_started"' in line:
            event = json.loads(line)
            slots[event["worker"]] = event["pid"]
    return [slots[k] for k in sorted(slots)]


async def _wait_workers(router: Router, n: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    for _ in range(600):
        pids = [p for p in _worker_pids(router) if p not in exclude]
        if len(pids) == n:
            return pids
        await asyncio.sleep(0.05)
    raise AssertionError("workers did not start: " + router.tail())


async def _chat(router: Router, key: str) -> int:
    """One request on a new connection (the kernel picks the worker that accepts it)."""
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(router.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                         json={"model": FAST, "messages": MSGS, "max_tokens": 4})
        return r.status_code


def _served_by(data_dir: Path, pid: int) -> float:
    """Requests a worker counted, read from its own multiprocess metrics file."""
    path = data_dir / "metrics" / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    total = 0.0
    for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
        if json.loads(key)[1] == "tiergate_requests_total":
            total += value
    return total


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_two_workers_serve_share_budgets_and_sum_their_metrics(tmp_path: Path, redis_url: str) -> None:
    """A 10-requests-per-minute tenant gets exactly 10 through two workers, each of which served some."""
    tag = uuid.uuid4().hex[:6]
    text = policy_text(tag, [], {"lim": ", limits: {rpm: 10}"})
    router = Router(tmp_path, text, grace_s=0.2, timeout_s=5, redis_url=redis_url, workers=2)
    try:
        async with httpx.AsyncClient(timeout=10) as c:
            await router.ready(c)
        a, b = await _wait_workers(router, 2)
        key = f"sk-lim-{tag}"
        os.kill(a, signal.SIGSTOP)
        try:
            first = [await _chat(router, key) for _ in range(6)]      # all to b
        finally:
            os.kill(a, signal.SIGCONT)
        os.kill(b, signal.SIGSTOP)
        try:
            second = [await _chat(router, key) for _ in range(6)]     # all to a
        finally:
            os.kill(b, signal.SIGCONT)
        assert first == [200] * 6, router.tail()
        assert second == [200] * 4 + [429] * 2, router.tail()         # the limit is shared through Redis
        data = tmp_path / "data"
        assert _served_by(data, b) == 6 and _served_by(data, a) == 6
        async with httpx.AsyncClient(timeout=10) as c:
            scraped = (await c.get(router.url + "/metrics")).text
        assert _metric_sum(scraped, "tiergate_requests_total", status="200") == 10
        assert _metric_sum(scraped, "tiergate_requests_total", status="429") == 2
        assert re.search(r'^tiergate_instance_healthy\{.*\} 1\.0$', scraped, re.M), scraped[:2000]
    finally:
        router.kill()


async def test_a_dead_worker_is_started_again_and_sigterm_stops_everything(tmp_path: Path, redis_url: str) -> None:
    tag = uuid.uuid4().hex[:6]
    router = Router(tmp_path, policy_text(tag, [], {"free": ""}), grace_s=0.2, timeout_s=5, redis_url=redis_url,
                    workers=2)
    try:
        async with httpx.AsyncClient(timeout=10) as c:
            await router.ready(c)
        a, b = await _wait_workers(router, 2)
        os.kill(a, signal.SIGKILL)
        replaced = await _wait_workers(router, 2, exclude=frozenset({a}))
        assert b in replaced and a not in replaced
        assert '"worker_exited"' in router.log.read_text()
        os.kill(b, signal.SIGSTOP)              # the new worker alone accepts: it serves
        try:
            codes = [await _chat(router, f"sk-free-{tag}") for _ in range(3)]
        finally:
            os.kill(b, signal.SIGCONT)
        assert codes == [200] * 3, router.tail()
        children = descendants(router.proc.pid)
        assert set(replaced) <= children and any("router.cli sim" in cmdline(p) for p in children)
        router.proc.send_signal(signal.SIGTERM)
        assert await router.exited() == 0, router.tail()
        await wait_gone(children)
        assert router.log.read_text().count('"drained"') == 2    # each worker drained
    finally:
        router.kill()
