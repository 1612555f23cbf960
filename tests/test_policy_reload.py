"""Policy hot reload: a router on a real socket re-reads its policy file; invalid edits change nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from backends.registry import Registry
from backends.sim.run import start_sim
from backends.valkey import EmbeddedValkey, free_port
from policies.schema import load_policy, parse_policy
from router.budget_store import price_units
from tests.conftest import serve_router
from tests.test_accounting import ADMIN, MSGS, ledger, policy_text, wait_for


def cost_of(usage: dict[str, Any], output_price: float) -> int:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return (usage["prompt_tokens"] - cached) * price_units(0.05) + cached * price_units(0.01) \
        + usage["completion_tokens"] * price_units(output_price)


def auth(name: str, tag: str) -> dict[str, str]:
    return {"authorization": f"Bearer sk-{name}-{tag}"}


ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}
BODY = {"model": "chat", "max_tokens": 8, "messages": MSGS}


async def reload(c: httpx.AsyncClient, base: str) -> httpx.Response:
    return await c.post(base + "/admin/policy/reload", headers=ADMIN_AUTH)


async def test_keys_budgets_and_prices_change_without_a_restart(redis_url: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.2)
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(tag, [sim.url], {"a": "", "b": ", budgets: {daily_usd: 0.0000001}"}))
    try:
        async with serve_router(load_policy(path), policy_path=str(path), redis_url=redis_url, watch_policy=True,
                                policy_reload_interval_s=0) as base, \
                httpx.AsyncClient(base_url=base, timeout=30) as c:
            assert (await c.post("/v1/chat/completions", headers=auth("a", tag), json=BODY)).status_code == 200
            assert (await c.post("/v1/chat/completions", headers=auth("c", tag), json=BODY)).status_code == 401
            r = await c.post("/v1/chat/completions", headers=auth("b", tag), json=BODY)
            assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
            r = await reload(c, base)
            assert r.status_code == 200 and r.json()["result"] == "unchanged"
            version = (await c.get("/ready")).json()["policy_version"]

            # the edit: a new tenant c, b's budget raised, a removed, output price doubled
            path.write_text(policy_text(tag, [sim.url], {"b": ", budgets: {daily_usd: 1.0}", "c": ""},
                                        prices="{input: 0.05, cached_input: 0.01, output: 0.40}"))
            r = await reload(c, base)
            assert r.status_code == 200 and r.json()["result"] == "reloaded", r.text
            new = r.json()["version"]
            assert new != version and (await c.get("/ready")).json()["policy_version"] == new
            assert (await c.post("/v1/chat/completions", headers=auth("c", tag), json=BODY)).status_code == 200
            assert (await c.post("/v1/chat/completions", headers=auth("a", tag), json=BODY)).status_code == 401
            r = await c.post("/v1/chat/completions", headers=auth("b", tag), json=BODY)
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]

            async def settled() -> bool:
                return bool((await ledger(c, base, f"b-{tag}"))["requests"] == 1)
            await wait_for(settled)
            cost = round((await ledger(c, base, f"b-{tag}"))["cost_usd"] * 1e10)
            assert cost == cost_of(usage, 0.40)                             # billed at the new price
            metrics = (await c.get("/metrics")).text
            assert 'tiergate_policy_reloads_total{result="reloaded"} 1.0' in metrics
    finally:
        await sim.close()


async def test_an_invalid_edit_changes_nothing_and_says_where(redis_url: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.2)
    path = tmp_path / "policy.yaml"
    good = policy_text(tag, [sim.url], {"a": ""})
    path.write_text(good)
    try:
        async with serve_router(load_policy(path), policy_path=str(path), redis_url=redis_url, watch_policy=True,
                                policy_reload_interval_s=0) as base, \
                httpx.AsyncClient(base_url=base, timeout=30) as c:
            version = (await c.get("/ready")).json()["policy_version"]
            bad_edits = {
                good.replace("max_model_len: 40960", "max_model_len: lots"): "tiers.fast.max_model_len",
                good.replace("{type: load}", "{type: no_such_scorer}"): "no_such_scorer",
                good.replace("routes:", "routes:\n  [unclosed"): "invalid YAML",
                good.replace(f"instances: [{{id: i0-{tag}, url: \"{sim.url}\"}}]", ""): "$.tiers.fast.instances",
            }
            for text, named in bad_edits.items():
                path.write_text(text)
                r = await reload(c, base)
                assert r.status_code == 422, r.text
                err = r.json()["error"]
                assert err["code"] == "invalid_policy" and named in err["message"], err
                assert (await c.get("/ready")).json()["policy_version"] == version
                assert (await c.post("/v1/chat/completions", headers=auth("a", tag), json=BODY)).status_code == 200
            assert 'tiergate_policy_reloads_total{result="invalid"} 4.0' in (await c.get("/metrics")).text
            tenant_key = await c.post("/admin/policy/reload", headers=auth("a", tag))
            assert tenant_key.status_code == 403
            assert (await c.post("/admin/policy/reload")).status_code == 401
    finally:
        await sim.close()


async def test_the_watcher_picks_up_endpoints_and_a_running_stream_keeps_its_policy(
        redis_url: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    one, two = await start_sim("qwen3-1.7b-fp8", time_scale=5.0), await start_sim("qwen3-1.7b-fp8", time_scale=0.2)
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(tag, [one.url], {"a": ""}))
    try:
        async with serve_router(load_policy(path), policy_path=str(path), redis_url=redis_url, watch_policy=True,
                                policy_reload_interval_s=0.1, expose_decision_header=True) as base, \
                httpx.AsyncClient(base_url=base, timeout=30) as c:
            body = {**BODY, "max_tokens": 60, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            async with c.stream("POST", "/v1/chat/completions", headers=auth("a", tag), json=body) as r:
                assert r.status_code == 200 and r.headers["x-tiergate-instance"] == f"i0-{tag}"
                lines = r.aiter_lines()
                while not (await anext(lines)).startswith("data: {"):
                    pass
                assert f'instance="i0-{tag}"' in (await c.get("/metrics")).text   # its series exist
                # mid-stream: instance one is replaced by two, and the output price doubles
                path.write_text(policy_text(tag, [two.url], {"a": ""}, first=1,
                                            prices="{input: 0.05, cached_input: 0.01, output: 0.40}"))
                probes: list[tuple[str, dict[str, Any]]] = []

                async def moved() -> bool:
                    d = await c.post("/v1/chat/completions", headers=auth("a", tag), json=BODY)
                    assert d.status_code == 200, d.text
                    probes.append((d.headers["x-tiergate-instance"], d.json()["usage"]))
                    return bool(probes[-1][0] == f"i1-{tag}"
                                and list(json.loads(d.headers["x-tiergate-decision"])["totals"]) == [f"fast/i1-{tag}"])
                await wait_for(moved, 15)
                rest = [line async for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"                   # the running stream finished on instance one
            final: dict[str, Any] = json.loads(rest[-2][6:])["usage"]
            assert final["completion_tokens"] == 60
            assert (await c.get("/ready")).json()["reachable_instances"] == {"fast": 1}
            gauges = [line for line in (await c.get("/metrics")).text.splitlines()
                      if line.startswith(("tiergate_instance_healthy{", "tiergate_instance_in_flight{"))]
            assert f'tiergate_instance_healthy{{instance="i1-{tag}",tier="fast"}} 1.0' in gauges
            assert not [g for g in gauges if f'"i0-{tag}"' in g], gauges      # the removed one left no series

            async def settled() -> bool:
                return bool((await ledger(c, base, f"a-{tag}"))["requests"] == 1 + len(probes))
            await wait_for(settled)
            # each request billed under the policy it started with: the stream and any probe on one at the
            # old output price, probes on two at the new one
            want = cost_of(final, 0.20) + sum(cost_of(u, 0.40 if inst == f"i1-{tag}" else 0.20) for inst, u in probes)
            # the last probe (the first served by two) may have started just before the swap: it then keeps the
            # old policy, prices included, though the swapped registry already routed it to two
            raced = want - cost_of(probes[-1][1], 0.40) + cost_of(probes[-1][1], 0.20)
            assert round((await ledger(c, base, f"a-{tag}"))["cost_usd"] * 1e10) in (want, raced)
    finally:
        await one.close()
        await two.close()


async def test_sighup_reloads_the_policy_file(redis_url: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.2)
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(tag, [sim.url], {"a": ""}))
    try:
        async with serve_router(load_policy(path), policy_path=str(path), redis_url=redis_url, watch_policy=True,
                                policy_reload_interval_s=0) as base, \
                httpx.AsyncClient(base_url=base, timeout=30) as c:
            path.write_text(policy_text(tag, [sim.url], {"a": "", "h": ""}))
            await asyncio.sleep(0.3)                         # no watcher: nothing changes by itself
            assert (await c.post("/v1/chat/completions", headers=auth("h", tag), json=BODY)).status_code == 401
            # the router installed a handler (else SIGHUP's default would end this test process)
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            os.kill(os.getpid(), signal.SIGHUP)              # the router runs on this process's event loop

            async def reloaded() -> bool:
                r = await c.post("/v1/chat/completions", headers=auth("h", tag), json=BODY)
                return r.status_code == 200
            await wait_for(reloaded, 10)
    finally:
        await sim.close()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL       # shutdown removed the handler


async def test_a_request_whose_instance_a_reload_removed_during_its_admission_is_routed_again(
        tmp_path: Path) -> None:
    """Admission is the one wait between deciding and sending; a reload there must not turn into a 503."""
    tag = uuid.uuid4().hex[:6]
    valkey = EmbeddedValkey(tmp_path / "v", port=free_port())   # private: it gets paused
    valkey.start()
    one, two = await start_sim("qwen3-1.7b-fp8", time_scale=0.2), await start_sim("qwen3-1.7b-fp8", time_scale=0.2)
    path = tmp_path / "policy.yaml"
    budget = ", budgets: {daily_usd: 1.0}"                         # a budget: the request awaits admission
    path.write_text(policy_text(tag, [one.url], {"a": budget}))
    admin = aioredis.Redis.from_url(valkey.url)
    try:
        async with serve_router(load_policy(path), policy_path=str(path), redis_url=valkey.url, watch_policy=True,
                                policy_reload_interval_s=0, redis_timeout_s=5.0, accounting_timeout_s=5.0,
                                load_sync_interval_s=0) as base, \
                httpx.AsyncClient(base_url=base, timeout=30) as c:
            assert (await c.post("/v1/chat/completions", headers=auth("a", tag), json=BODY)).status_code == 200
            await admin.execute_command("CLIENT", "PAUSE", "1500", "WRITE")   # admission's script now waits
            request = asyncio.create_task(c.post("/v1/chat/completions", headers=auth("a", tag), json=BODY))
            await asyncio.sleep(0.3)                                   # decided for i0, waiting to be admitted
            assert not request.done()
            path.write_text(policy_text(tag, [two.url], {"a": budget}, first=1))
            assert (await reload(c, base)).json()["result"] == "reloaded"
            r = await request
            assert r.status_code == 200, r.text
            assert r.headers["x-tiergate-instance"] == f"i1-{tag}"    # decided again, on the new instance
    finally:
        await admin.aclose()
        await one.close()
        await two.close()
        valkey.stop()


def test_registry_apply_keeps_the_state_of_kept_instances() -> None:
    urls = ["http://127.0.0.1:9201", "http://127.0.0.1:9202"]
    reg = Registry(parse_policy(policy_text("t", urls, {"a": ""})))
    kept, dropped = reg.tiers["fast"].instances
    kept.times_ejected, kept.in_flight, kept.kv_capacity_blocks = 2, 3, 4096   # the last one as if scraped
    reg.tiers["fast"].ttft_s.add(0.5)
    reg.apply(parse_policy(policy_text("t", [urls[0], "http://127.0.0.1:9303"], {"a": ""})))
    now = reg.tiers["fast"].instances
    assert now[0] is kept and kept.times_ejected == 2 and kept.in_flight == 3   # same id and URL: same state
    assert reg.capacity_blocks(kept) == 4096                                     # learned KV capacity too
    assert now[1] is not dropped and now[1].url.endswith(":9303") and now[1].times_ejected == 0
    assert reg.tiers["fast"].ttft_s.value == 0.5                                 # the tier's learning stays
    reg.apply(parse_policy(policy_text("t", ["http://127.0.0.1:9999"], {"a": ""})))
    assert reg.tiers["fast"].instances[0] is not kept                            # a new URL is a new instance
    assert [c.key for c in reg.candidates(("fast",))] == ["fast/i0-t"]


def test_a_request_decided_just_before_a_swap_goes_to_the_tiers_current_instances() -> None:
    """The decision named an instance the reload then removed: the forwarder sends to the tier's instances
    as they are now (least loaded first) instead of answering 503, and says why in the outcome."""
    from router.proxy import Forwarder
    from router.relay import Outcome

    tag = uuid.uuid4().hex[:6]
    reg = Registry(parse_policy(policy_text(tag, ["http://127.0.0.1:9"], {"a": ""}), "p.yaml"))
    ranked = reg.candidates(("fast",))
    fw = Forwarder(None, reg, 3, lambda tier, why: None)  # type: ignore[arg-type]
    out = Outcome()
    assert fw._present(ranked, out) is ranked and out.failed == []          # nothing moved: as decided
    reg.apply(parse_policy(policy_text(tag, ["http://127.0.0.1:10", "http://127.0.0.1:11"], {"a": ""}, first=1),
                           "p.yaml"))
    reg.find("fast", f"i1-{tag}").in_flight = 5                             # type: ignore[union-attr]
    now = fw._present(ranked, out)
    assert [c.instance_id for c in now] == [f"i2-{tag}", f"i1-{tag}"]
    assert out.failed == [f"fast/i0-{tag}: removed (a policy reload or DNS discovery)"]
