"""Schemathesis over the OpenAPI document, against a real router and simulated tiers over sockets.

One test per described operation, each with a bounded number of generated requests, valid and
invalid (schemathesis's positive and negative modes). The rule under test: no request gets a
5xx. Bad input is the client's fault (a 4xx in OpenAI's error shape), and a 502/503 because a
simulator choked on what the router forwarded would be a server error too.

The router runs on its own event loop in a thread (schemathesis calls it synchronously). Most
calls carry the demo tenant's key (admin paths the admin key); a fifth carry none (the policy's
anonymous tenant, or a 401). Most bodies name a real model, so routing, tokenizing and the
simulator are reached; the rest keep the fuzzer's model name.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from backends.sim.run import RunningSim, start_sim
from policies.schema import InstanceSpec, load_policy
from router.openapi import document
from tests.conftest import DEMO_KEY, serve_router
from tests.test_policies import DEMO

ADMIN_KEY = "sk-tiergate-admin"
MODELS = ("auto", "qwen3-1.7b", "qwen3-4b")
PROFILES = {"fast": "qwen3-1.7b-fp8", "balanced": "qwen3-4b-mixed", "long": "qwen3-4b-256k"}

SCHEMA = schemathesis.openapi.from_dict(document())
# Random examples per operation and generation mode, on top of schemathesis's deterministic coverage
# phase (boundary values, wrong types, missing fields: most of the ~1000 requests). Under a minute.
FUZZ = settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))


class RouterThread:
    """Simulators and a router on a private event loop, so the synchronous fuzzer can call them."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.url = ""
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="fuzz-router", daemon=True)

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self.stop = asyncio.Event()
        policy = load_policy(DEMO)
        sims: list[RunningSim] = []
        try:
            urls: dict[str, list[InstanceSpec]] = {}
            for tier, profile in PROFILES.items():
                sim = await start_sim(profile, time_scale=0.002, served_model_name=policy.tiers[tier].model)
                sims.append(sim)
                urls[tier] = [InstanceSpec(id=f"{tier}-0", url=sim.url)]
            async with serve_router(policy, urls, redis_url=self.redis_url) as base:
                self.url = base
                self.ready.set()
                await self.stop.wait()
        finally:
            for sim in sims:
                await sim.close()

    def __enter__(self) -> RouterThread:
        self.thread.start()
        if not self.ready.wait(120) or self.error is not None:
            raise RuntimeError(f"the fuzz router did not start: {self.error!r}")
        return self

    def __exit__(self, *_: object) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


@pytest.fixture(scope="module")
def router_url(redis_url: str) -> Iterator[str]:
    with RouterThread(redis_url) as rt:
        yield rt.url


def _headers(case: Any) -> dict[str, str]:
    if case.path.startswith("/admin/"):
        return {"Authorization": f"Bearer {ADMIN_KEY}"}
    if zlib.crc32(repr(case.body).encode()) % 5 == 0:   # a fifth go without a key
        return {"Authorization": ""}
    return {"Authorization": f"Bearer {DEMO_KEY}"}


def _steer(case: Any) -> None:
    """Most bodies name a real model; generation budgets stay small (a 32k-token answer takes the
    simulator seconds). Values a tier must refuse (negative, huge, wrong types) are left alone."""
    headers = case.headers or {}
    if isinstance(headers.get("x-tiergate-slo-class"), str) and zlib.crc32(repr(headers).encode()) % 4:
        headers["x-tiergate-slo-class"] = "relaxed"     # a class the policy has (else it is a 400 first)
    body = case.body
    if not isinstance(body, dict):
        return
    if isinstance(body.get("model"), str) and len(body["model"]) % 4 != 3:
        body["model"] = MODELS[len(body["model"]) % len(MODELS)]
    limits = [k for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    if not limits:
        body["max_tokens"] = 16
    for k in limits:
        v = body[k]
        if isinstance(v, int) and not isinstance(v, bool) and 16 < v < 1_000_000:
            body[k] = 16


@SCHEMA.parametrize()
@FUZZ
def test_no_request_gets_a_server_error(case: Any, router_url: str) -> None:
    _steer(case)
    response = case.call(base_url=router_url, headers=_headers(case), timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
