"""Policy reload can't hurt serving (#12 item 6): parsing runs outside the event loop, the reload endpoint
reports the file's real state, and instance URLs are exactly http(s)://host[:port][/path]."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from policies.schema import PolicyError, load_policy, parse_policy
from policies.urls import http_url_error, zmq_endpoint_error
from policies.yaml_loader import MAX_POLICY_BYTES
from tests.conftest import serve_router
from tests.test_accounting import ADMIN, policy_text, wait_for

ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}
DEAD = "http://127.0.0.1:9"     # no backend is needed: these tests never route a completion


def parser_children() -> set[int]:
    """Live `router.policy_worker` children of this process (the router runs on the test's loop)."""
    me, found = str(os.getpid()), set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == me and b"router.policy_worker" in cmd:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def reload(c: httpx.AsyncClient) -> httpx.Response:
    return await c.post("/admin/policy/reload", headers=ADMIN_AUTH)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc (Linux)")
async def test_health_answers_while_a_10000_tenant_policy_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text("s", [DEAD], {"a": ""}))
    big = policy_text("s", [DEAD], {f"t{i:05d}": "" for i in range(10_000)})
    assert len(big.encode()) > 900_000
    async with serve_router(load_policy(path), policy_path=str(path), watch_policy=True,
                            policy_reload_interval_s=0) as base, \
            httpx.AsyncClient(base_url=base, timeout=60) as admin, httpx.AsyncClient(base_url=base) as probe:
        assert (await probe.get("/health")).status_code == 200          # a warm connection for the probe
        path.write_text(big)
        pending = asyncio.create_task(reload(admin))
        answered_during_parse = 0
        while not pending.done() and not answered_during_parse:
            for pid in parser_children():
                r = await probe.get("/health")
                assert r.status_code == 200
                if alive(pid):          # the parser was running before this request and still is after it
                    answered_during_parse += 1
            await asyncio.sleep(0.005)
        r = await pending
        assert r.status_code == 200 and r.json()["result"] == "reloaded", r.text
        assert answered_during_parse, "no /health answer while the policy parser ran"
        assert (await probe.get("/v1/models", headers={"authorization": "Bearer sk-t09999-s"})).status_code == 200
    assert not parser_children()


async def test_reload_answers_422_while_the_file_the_watcher_saw_stays_invalid(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    good = policy_text("w", [DEAD], {"a": ""})
    path.write_text(good)
    bad = good.replace(f'url: "{DEAD}"', 'url: "http://127.0.0.1:9\\r\\nX-Injected: 1"')
    assert bad != good
    async with serve_router(load_policy(path), policy_path=str(path), watch_policy=True,
                            policy_reload_interval_s=0.05) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as c:
        version = (await c.get("/ready")).json()["policy_version"]
        path.write_text(bad)

        async def watcher_saw_it() -> bool:
            return 'tiergate_policy_reloads_total{result="invalid"} 1.0' in (await c.get("/metrics")).text
        await wait_for(watcher_saw_it)
        where = f"{path}:{line_of(bad, 'X-Injected')}: $.tiers.fast.instances[0].url:"
        for _ in range(2):                                      # the endpoint, after the watcher, and again
            r = await reload(c)
            assert r.status_code == 422, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_policy" and where in err["message"], err
            assert "control characters" in err["message"] and "X-Injected" not in err["message"]
        metrics = (await c.get("/metrics")).text
        assert 'tiergate_policy_reloads_total{result="invalid"} 1.0' in metrics     # one refusal, counted once
        assert (await c.get("/ready")).json()["policy_version"] == version
        path.write_text(good.replace("{key_sha256", "{budgets: {daily_usd: 2.0}, key_sha256", 1))

        async def fixed() -> bool:
            return bool((await c.get("/ready")).json()["policy_version"] != version)
        await wait_for(fixed)
        r = await reload(c)
        assert r.status_code == 200 and r.json()["result"] == "unchanged", r.text


async def test_reload_refuses_aliases_and_oversized_files_before_parsing_them(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    good = policy_text("b", [DEAD], {"a": ""})
    path.write_text(good)
    bomb = good.replace("scorers: [{type: load}]", "scorers: [{type: load, params: {\n      x0: &a [lol, lol],\n"
                        "      x1: &b [*a, *a, *a, *a, *a, *a, *a, *a], x2: [*b, *b, *b, *b, *b, *b, *b, *b]}}]")
    assert bomb != good
    async with serve_router(load_policy(path), policy_path=str(path), watch_policy=True,
                            policy_reload_interval_s=0) as base, \
            httpx.AsyncClient(base_url=base, timeout=30) as c:
        path.write_text(bomb)
        r = await reload(c)
        message = r.json()["error"]["message"]
        assert r.status_code == 422 and f"{path}:{line_of(bomb, 'x0:')}:" in message and "anchors" in message, r.text
        path.write_bytes(good.encode() + b"#" * MAX_POLICY_BYTES)
        r = await reload(c)
        assert r.status_code == 422 and f"the limit is {MAX_POLICY_BYTES:,}" in r.json()["error"]["message"]
        assert not parser_children()
        path.write_text(good)
        assert (await reload(c)).json()["result"] == "unchanged"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9\r\nX-Injected: 1", "http://127.0.0.1:9/\x00", "http://host\x7f", "http://h st",
    "http://user:pass@127.0.0.1:9", "http://127.0.0.1:9?x=1", "http://127.0.0.1:9#f", "ftp://127.0.0.1",
    "HTTP://127.0.0.1", "http://", "http://127.0.0.1:0", "http://127.0.0.1:65536", "http://127.0.0.1:8o",
    "http://[::1", "http://[::g]:80", "http://1.2.3.256", "http://-bad.example", "http://ex\u00e4mple.com",
    "http://h/%zz", "http://h/a b", "127.0.0.1:8000",
])
def test_instance_urls_outside_the_form_are_refused_with_path_and_line(url: str) -> None:
    good = policy_text("u", [DEAD], {"a": ""})
    bad = good.replace(f'url: "{DEAD}"', "url: " + repr(url).replace("'", '"'))
    with pytest.raises(PolicyError) as err:
        parse_policy(bad, "p.yaml")
    assert err.value.path == "$.tiers.fast.instances[0].url" and err.value.line == line_of(bad, "instances:")
    assert url not in str(err.value)                 # a URL may carry a secret: messages never echo it


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "https://vllm-0.vllm.default.svc.cluster.local:8000/",
                                 "http://[::1]:8000/prefix/v1", "http://gpu_box.lan", "http://h/a%2Fb/~x"])
def test_instance_urls_in_the_form_are_accepted(url: str) -> None:
    assert http_url_error(url) is None
    parse_policy(policy_text("u", [url], {"a": ""}))


@pytest.mark.parametrize("endpoint,ok", [
    ("tcp://127.0.0.1:5557", True), ("tcp://[::1]:5557", True), ("ipc:///tmp/kv.sock", True),
    ("tcp://127.0.0.1:5557\r\n", False), ("tcp://*:5557", False), ("tcp://h", False), ("tcp://h:5557/x", False),
    ("udp://h:1", False), ("ipc://", False), ("tcp://u@h:1", False),
])
def test_kv_event_endpoints_are_checked_as_strictly(endpoint: str, ok: bool) -> None:
    assert (zmq_endpoint_error(endpoint) is None) is ok
    good = policy_text("k", [DEAD], {"a": ""})
    text = good.replace(f'url: "{DEAD}"', f'url: "{DEAD}", kv_events: ' + repr(endpoint).replace("'", '"'))
    if ok:
        parse_policy(text)
    else:
        with pytest.raises(PolicyError, match=r"\$\.tiers\.fast\.instances\[0\]\.kv_events"):
            parse_policy(text)


def test_data_parallel_ranks_must_keep_the_port_in_range() -> None:
    good = policy_text("k", [DEAD], {"a": ""})
    text = good.replace(f'url: "{DEAD}"', f'url: "{DEAD}", kv_events: "tcp://127.0.0.1:65534", kv_events_dp_ranks: 4')
    with pytest.raises(PolicyError, match=r"kv_events_dp_ranks: .*<= 65535"):
        parse_policy(text)
    parse_policy(text.replace("kv_events_dp_ranks: 4", "kv_events_dp_ranks: 2"))


async def test_a_parser_that_runs_too_long_is_killed_and_refused() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from router.policy_worker import parse_in_child
    text = policy_text("t", [DEAD], {f"t{i}": "" for i in range(2000)})
    with ThreadPoolExecutor(1) as ex:
        with pytest.raises(ValueError, match="parsing took longer than"):
            await parse_in_child(text, "slow.yaml", ex, timeout_s=0.001)   # less than the child's own start-up
        assert not parser_children()
        assert len((await parse_in_child(text, "slow.yaml", ex)).tenants) == 2000


@pytest.mark.parametrize("bad_id", ["fast\r\nx-evil: 1", "a b", "", "é", "x" * 129])
def test_instance_ids_are_header_and_label_safe(bad_id: str) -> None:
    text = policy_text("ids", ["http://127.0.0.1:9"], {"free": ""}).replace("id: i0-ids", f"id: {bad_id!r}")
    with pytest.raises(PolicyError, match=r"instances\[0\]\.id: must be 1-128 characters"):
        parse_policy(text, "t.yaml")
