"""Health state transitions on an injected clock, Retry-After cool-downs and the retry budget."""

from __future__ import annotations

import httpx
import pytest

from backends.registry import Registry
from backends.resilience import OutlierConfig, RetryBudget, parse_retry_after
from backends.sim.faults import Faults
from backends.sim.run import start_sim
from policies.schema import InstanceSpec, load_policy
from tests.conftest import DEMO_KEY, serve_router
from tests.test_policies import DEMO


def registry(n: int, now: list[float], **cfg: float) -> Registry:
    urls = {"fast": [InstanceSpec(id=f"i{k}", url=f"http://127.0.0.1:{9000 + k}") for k in range(n)]}
    return Registry(load_policy(DEMO), urls, clock=lambda: now[0],
                    outlier=OutlierConfig(**cfg))  # type: ignore[arg-type]


def test_consecutive_failures_eject_then_half_open_then_longer() -> None:
    now = [0.0]
    reg = registry(4, now, consecutive_failures=3, base_ejection_s=5.0)
    a = reg.tiers["fast"].instances[0]
    assert not reg.record_failure(a) and not reg.record_failure(a) and a.serving(now[0])
    assert reg.record_failure(a) and not a.serving(now[0]) and a.ejected_until == 5.0     # 3rd in a row: out 5 s
    now[0] = 5.0
    assert a.serving(now[0])                                                              # readmitted, half-open
    assert reg.record_failure(a) and a.ejected_until == 15.0                              # one failure: out 2 x 5 s
    now[0] = 15.0
    reg.record_success(a)                                                                 # closes it
    assert a.serving(now[0]) and a.consecutive_failures == 0 and a.times_ejected == 2
    now[0] = 15.0 + 50.0
    reg.record_success(a)                                                                 # 10 x base healthy
    assert a.times_ejected == 1
    assert not reg.record_failure(a)                                                      # closed: needs 3 again


def test_a_success_between_failures_resets_the_count() -> None:
    now = [0.0]
    reg = registry(2, now, consecutive_failures=3)
    a = reg.tiers["fast"].instances[0]
    reg.record_failure(a)
    reg.record_failure(a)
    reg.record_success(a)
    assert not reg.record_failure(a) and a.serving(now[0])


def test_max_ejection_percent_keeps_half_the_tier_in() -> None:
    now = [0.0]
    reg = registry(2, now, consecutive_failures=1, max_ejection_percent=50.0)
    a, b = reg.tiers["fast"].instances
    assert reg.record_failure(a) and not a.serving(now[0])
    assert not reg.record_failure(b) and b.serving(now[0])       # ejecting b would take 100% out
    now[0] = 6.0
    assert reg.record_failure(b) and not b.serving(now[0])       # a is back: now b may go


def test_ejection_time_is_capped_and_a_lone_instance_can_still_be_ejected() -> None:
    now = [0.0]
    reg = registry(1, now, consecutive_failures=1, base_ejection_s=100.0, max_ejection_s=150.0)
    a = reg.tiers["fast"].instances[0]
    assert reg.record_failure(a) and a.ejected_until == 100.0
    now[0] = 100.0
    assert reg.record_failure(a) and a.ejected_until == 250.0    # 2 x 100 capped at 150


def test_retry_after_cools_down_capped() -> None:
    now = [10.0]
    reg = registry(2, now, max_cooldown_s=60.0)
    a = reg.tiers["fast"].instances[0]
    reg.cool_down(a, 3.0)
    assert not a.serving(12.9) and a.serving(13.0)
    reg.cool_down(a, 3600.0)
    assert a.ejected_until == 70.0 and a.consecutive_failures == 0


@pytest.mark.parametrize(("value", "want"), [("3", 3.0), (" 1.5 ", 1.5), ("-1", None), ("soon", None),
                                            ("Wed, 21 Oct 2015 07:28:00 GMT", None), (None, None), ("inf", None)])
def test_parse_retry_after(value: str | None, want: float | None) -> None:
    assert parse_retry_after(value) == want


def test_retry_budget_is_20_percent_of_in_flight_with_a_floor_of_3() -> None:
    active = [0]
    b = RetryBudget(lambda: active[0])
    assert [b.try_acquire() for _ in range(4)] == [True, True, True, False]
    active[0] = 50                                  # 20% of 50 = 10
    assert sum(b.try_acquire() for _ in range(10)) == 7 and b.active_retries == 10
    b.release()
    assert b.try_acquire() and not b.try_acquire() and b.denied == 1 + 3 + 1


async def test_429_with_retry_after_cools_the_instance_and_the_next_requests_skip_it() -> None:
    limited = await start_sim("qwen3-1.7b-fp8", time_scale=0.05, faults=Faults(rate_limit_rate=1.0, retry_after_s=30))
    good = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    urls = {"fast": [("limited", limited.url), ("good", good.url)]}
    try:
        async with serve_router(load_policy(DEMO), urls) as url, \
                httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {DEMO_KEY}"}) as c:
            for i in range(8):
                r = await c.post("/v1/chat/completions", json={
                    "model": "qwen3-1.7b", "max_tokens": 2, "messages": [{"role": "user", "content": f"q{i}"}]})
                assert r.status_code == 200 and r.headers["x-tiergate-instance"] == "good"
            metrics = (await c.get("/metrics")).text
            retries_429 = [ln for ln in metrics.splitlines()
                           if ln.startswith("tiergate_upstream_retries_total") and 'reason="429"' in ln]
            assert len(retries_429) <= 1 and all(ln.endswith(" 1.0") for ln in retries_429)  # at most one try
    finally:
        await limited.close()
        await good.close()


async def test_every_instance_rate_limited_answers_429_with_their_retry_after() -> None:
    limited = await start_sim("qwen3-1.7b-fp8", time_scale=0.05, faults=Faults(rate_limit_rate=1.0, retry_after_s=7))
    try:
        async with serve_router(load_policy(DEMO), {"fast": [("only", limited.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {DEMO_KEY}"}) as c:
            r = await c.post("/v1/chat/completions", json={
                "model": "qwen3-1.7b", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 429 and r.headers["retry-after"] == "7"
    finally:
        await limited.close()


def test_half_open_instance_takes_one_trial_request_at_a_time() -> None:
    now = [0.0]
    reg = registry(2, now, consecutive_failures=1, base_ejection_s=5.0)
    a = reg.tiers["fast"].instances[0]
    assert reg.record_failure(a) and not a.serving(now[0])                      # open
    now[0] = 5.0
    assert a.serving(now[0]) and a.half_open                                    # half-open: a trial may go
    a.in_flight = 1                                                             # the trial is in flight
    assert not a.serving(now[0])
    assert [c.healthy for c in reg.candidates(("fast",))] == [False, True]
    a.in_flight = 0
    reg.record_success(a)                                                       # the trial succeeded: closed
    a.in_flight = 5
    assert a.serving(now[0]) and not a.half_open
