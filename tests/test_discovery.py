"""Service discovery by DNS (#16 item 2): a real DNS server on loopback (dnslib) whose records the tests change,
real simulators over sockets, the router in process. Instances join and leave under load without a failed
request, one that stays keeps its InstanceState, a DNS outage keeps the last set, a policy reload keeps the
discovered instances, and malformed `discover` fields are refused with their path."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

import router.app
from backends.dns import Endpoint, resolve
from backends.registry import InstanceState, Registry
from backends.sim.run import RunningSim, running_sim
from policies.schema import InstanceSpec, PolicyError, load_policy, parse_policy
from router.affinity_store import AffinityStore
from router.discovery import instance_spec
from router.kv_events import kv_subscribers
from router.metrics import RouterMetrics
from tests.conftest import serve_router
from tests.test_accounting import ADMIN, policy_text, wait_for

NAME = "fast-vllm.tiergate.svc.cluster.local"
TARGET = "sims.tiergate.test"
CHAT = {"model": "chat", "max_tokens": 3, "messages": [{"role": "user", "content": "hello there"}]}


class _Quiet:
    def __getattr__(self, _name: str) -> Any:
        return lambda *a, **k: None


class Zone(BaseResolver):  # type: ignore[misc]
    """Answers from `records` (owner name -> RRs), replaced whole by the test; NXDOMAIN for other names."""

    def __init__(self) -> None:
        self.records: dict[str, list[RR]] = {}
        self.extra: dict[str, list[RR]] = {}    # additional section, by question name

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        records = self.records
        if name not in records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rr in records[name]:
            if rr.rtype == request.q.qtype:
                reply.add_answer(rr)
        for rr in self.extra.get(name, []):
            reply.add_ar(rr)
        return reply


class LoopbackDns:
    """dnslib's UDP server on 127.0.0.1, in its own thread; `stop()` and `start()` again on the same port."""

    def __init__(self) -> None:
        self.zone = Zone()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server: DNSServer | None = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = DNSServer(self.zone, port=self.port, address="127.0.0.1", logger=_Quiet())
        self.server.start_thread()

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await asyncio.to_thread(server.stop)     # shutdown() waits for the serving thread's poll
            server.server.server_close()

    def srv(self, ports: list[int], glue: bool = False) -> None:
        """SRV records for NAME: TARGET at each port; TARGET's A record is 127.0.0.1 (with `glue`, also in the
        additional section of the SRV answer)."""
        a = RR(TARGET, QTYPE.A, rdata=A("127.0.0.1"), ttl=5)
        self.zone.extra = {NAME: [a]} if glue else {}
        self.zone.records = {NAME: [RR(NAME, QTYPE.SRV, rdata=SRV(0, 10, p, TARGET), ttl=5) for p in ports],
                             TARGET: [a]}


@pytest.fixture
def dns() -> Iterator[LoopbackDns]:
    server = LoopbackDns()
    server.start()
    try:
        yield server
    finally:
        if server.server is not None:
            server.server.stop()
            server.server.server.server_close()


@pytest.fixture
def registries(monkeypatch: pytest.MonkeyPatch) -> list[Registry]:
    """Every Registry the app builds (the router's own, to look at its InstanceState objects)."""
    made: list[Registry] = []

    class Seen(Registry):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            made.append(self)
    monkeypatch.setattr(router.app, "Registry", Seen)
    return made


def discover_policy(tag: str, nameserver: str, interval_s: float = 0.5, extra: str = "") -> str:
    text = policy_text(tag, ["http://127.0.0.1:9"], {"free": ""})
    return text.replace('instances: [{id: i0-' + tag + ', url: "http://127.0.0.1:9"}]',
                        f"discover: {{dns: {NAME}, record: SRV, interval_s: {interval_s}, "
                        f'nameserver: "{nameserver}"{extra}}}')


def iid(port: int) -> str:
    return f"fast@127.0.0.1:{port}"


def port_of(sim: RunningSim) -> int:
    return int(sim.url.rsplit(":", 1)[1])


def instances(reg: Registry) -> dict[str, InstanceState]:
    return {i.instance_id: i for i in reg.tiers["fast"].instances}


async def test_resolver_reads_a_aaaa_and_srv_from_a_loopback_server(dns: LoopbackDns) -> None:
    dns.zone.records = {NAME: [RR(NAME, QTYPE.A, rdata=A("127.0.0.3")), RR(NAME, QTYPE.A, rdata=A("127.0.0.2")),
                               RR(NAME, QTYPE.AAAA, rdata=AAAA("fd00::5"))]}
    found = await resolve(NAME, "A", 8000, dns.nameserver)
    assert found == [Endpoint("127.0.0.2", 8000), Endpoint("127.0.0.3", 8000), Endpoint("fd00::5", 8000)]
    assert instance_spec("fast", parse_policy(discover_policy("r", dns.nameserver, extra=", kv_events_port: 5557"),
                                              "p.yaml").tiers["fast"].discover, found[2]) == InstanceSpec(  # type: ignore[arg-type]
        id="fast@[fd00::5]:8000", url="http://[fd00::5]:8000", kv_events="tcp://[fd00::5]:5557")
    for glue in (False, True):      # target addresses asked for, or taken from the additional section
        dns.srv([8101, 8102], glue=glue)
        assert await resolve(NAME, "SRV", None, dns.nameserver) == [Endpoint("127.0.0.1", 8101),
                                                                    Endpoint("127.0.0.1", 8102)]
    assert await resolve("nothing.tiergate.test", "A", 80, dns.nameserver) == []     # NXDOMAIN: no records


class _Udp512(DNSHandler):  # type: ignore[misc]
    udplen = 512                # replies over 512 bytes go out truncated (TC), as a plain UDP server's would


def _port_free_for_udp_and_tcp() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, socket.socket(socket.AF_INET,
                                                                                     socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", 0))
            try:
                u.bind(("127.0.0.1", t.getsockname()[1]))
            except OSError:
                continue
            return int(t.getsockname()[1])


async def test_a_truncated_reply_is_asked_again_over_tcp() -> None:
    dns = LoopbackDns()
    dns.port = _port_free_for_udp_and_tcp()
    ports = list(range(9000, 9040))
    dns.srv(ports)
    servers = [DNSServer(dns.zone, port=dns.port, address="127.0.0.1", logger=_Quiet(), handler=_Udp512),
               DNSServer(dns.zone, port=dns.port, address="127.0.0.1", logger=_Quiet(), tcp=True)]
    for server in servers:
        server.start_thread()
    try:
        assert await resolve(NAME, "SRV", None, dns.nameserver) == [Endpoint("127.0.0.1", p) for p in ports]
    finally:
        for server in servers:
            await asyncio.to_thread(server.stop)
            server.server.server_close()


async def drive(base: str, stop: asyncio.Event, seen: Counter[str], failures: list[str]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30,
                                 headers={"authorization": "Bearer sk-free-dd"}) as c:
        while not stop.is_set():
            try:
                r = await c.post("/v1/chat/completions", json=CHAT)
            except httpx.HTTPError as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if r.status_code != 200:
                failures.append(f"{r.status_code}: {r.text[:200]}")
            else:
                seen[r.headers["x-tiergate-instance"]] += 1


def served(sim: RunningSim) -> int:
    """The simulator's own count: prompt tokens it prefilled."""
    return int(sim.server.engine.stats.prompt_tokens)


async def test_instances_join_and_leave_under_load(dns: LoopbackDns, registries: list[Registry]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        a, b, c = [await stack.enter_async_context(running_sim("qwen3-1.7b-fp8", time_scale=0.1)) for _ in range(3)]
        ia, ib, ic = iid(port_of(a)), iid(port_of(b)), iid(port_of(c))
        dns.srv([port_of(a), port_of(b)])
        base = await stack.enter_async_context(serve_router(parse_policy(discover_policy("dd", dns.nameserver),
                                                                         "discover.yaml")))
        reg = registries[-1]
        assert set(instances(reg)) == {ia, ib}          # resolved before serving
        kept, left = instances(reg)[ia], instances(reg)[ib]
        stop, seen = asyncio.Event(), Counter[str]()
        failures: list[str] = []
        clients = [asyncio.create_task(drive(base, stop, seen, failures)) for _ in range(8)]
        try:
            await wait_for(lambda: _true(seen[ia] >= 5 and seen[ib] >= 5))
            dns.srv([port_of(a), port_of(b), port_of(c)])                            # c joins
            await wait_for(lambda: _true(seen[ic] >= 5))
            assert served(c) > 0 and instances(reg)[ia] is kept and instances(reg)[ib] is left
            dns.srv([port_of(a), port_of(c)])                                        # b leaves
            await wait_for(lambda: _true(ib not in instances(reg)))
            await wait_for(lambda: _true(left.in_flight == 0))    # what was running there finished
            b_served, b_seen, a_seen, c_seen = served(b), seen[ib], seen[ia], seen[ic]
            await wait_for(lambda: _true(seen[ia] >= a_seen + 20 and seen[ic] >= c_seen + 20))
            assert served(b) == b_served and seen[ib] == b_seen   # nothing new reached b
            dns.srv([port_of(a), port_of(b), port_of(c)])                            # b is back
            await wait_for(lambda: _true(seen[ib] >= b_seen + 5))
            assert served(b) > b_served
        finally:
            stop.set()
            await asyncio.gather(*clients)
        assert failures == []
        now = instances(reg)
        assert set(now) == {ia, ib, ic}
        assert now[ia] is kept and kept.healthy and kept.in_flight == 0     # the same object all along
        assert now[ib] is not left and left.in_flight == 0                  # it left, so it came back afresh
        async with httpx.AsyncClient(base_url=base) as client:
            metrics = (await client.get("/metrics")).text
        assert 'tiergate_discovery_resolutions_total{result="ok",tier="fast"}' in metrics
        assert 'tiergate_discovered_instances{tier="fast"} 3.0' in metrics


async def _true(value: bool) -> bool:
    return value


async def resolutions(c: httpx.AsyncClient, result: str) -> float:
    for line in (await c.get("/metrics")).text.splitlines():
        if line.startswith(f'tiergate_discovery_resolutions_total{{result="{result}",tier="fast"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_a_dns_outage_or_an_empty_answer_keeps_the_last_set(dns: LoopbackDns, registries: list[Registry]) -> None:
    dns.srv([7001, 7002])
    async with serve_router(parse_policy(discover_policy("do", dns.nameserver), "outage.yaml")) as base, \
            httpx.AsyncClient(base_url=base) as c:
        reg = registries[-1]
        before = instances(reg)
        assert set(before) == {iid(7001), iid(7002)}
        await dns.stop()                                    # the server is gone: no answer at all
        errors = await resolutions(c, "error")
        await wait_for(lambda: _more(c, "error", errors + 2))
        assert instances(reg) == before and all(instances(reg)[k] is v for k, v in before.items())
        dns.zone.records = {}                               # back, but the name has no records (NXDOMAIN)
        dns.start()
        await wait_for(lambda: _more(c, "empty", 2))
        assert all(instances(reg)[k] is v for k, v in before.items()) and len(instances(reg)) == 2
        dns.srv([7002, 7003])                               # and a real change still lands
        await wait_for(lambda: _true(set(instances(reg)) == {iid(7002), iid(7003)}))
        assert instances(reg)[iid(7002)] is before[iid(7002)]


async def _more(c: httpx.AsyncClient, result: str, at_least: float) -> bool:
    return await resolutions(c, result) >= at_least


async def test_a_policy_reload_keeps_the_discovered_instances(dns: LoopbackDns, registries: list[Registry],
                                                               tmp_path: Path) -> None:
    dns.srv([7101, 7102])
    path = tmp_path / "policy.yaml"
    text = discover_policy("dr", dns.nameserver, interval_s=30)
    path.write_text(text)
    auth = {"authorization": f"Bearer {ADMIN}"}
    async with serve_router(load_policy(path), policy_path=str(path), watch_policy=True,
                            policy_reload_interval_s=0) as base, httpx.AsyncClient(base_url=base) as c:
        reg = registries[-1]
        before = instances(reg)
        assert set(before) == {iid(7101), iid(7102)}
        path.write_text(text.replace("{key_sha256", "{budgets: {daily_usd: 2.0}, key_sha256", 1))
        r = await c.post("/admin/policy/reload", headers=auth)
        assert r.status_code == 200 and r.json()["result"] == "reloaded", r.text
        assert instances(reg) == before and all(instances(reg)[k] is v for k, v in before.items())
        dns.srv([7102, 7103])       # a changed `discover` restarts the tier's task, which resolves at once
        path.write_text(text.replace("interval_s: 30", "interval_s: 0.5"))
        r = await c.post("/admin/policy/reload", headers=auth)
        assert r.status_code == 200 and r.json()["result"] == "reloaded", r.text
        await wait_for(lambda: _true(set(instances(reg)) == {iid(7102), iid(7103)}))
        assert instances(reg)[iid(7102)] is before[iid(7102)]
        path.write_text(policy_text("dr", ["http://127.0.0.1:7109"], {"free": ""}))    # no discovery any more
        r = await c.post("/admin/policy/reload", headers=auth)
        assert r.status_code == 200 and r.json()["result"] == "reloaded", r.text
        assert set(instances(reg)) == {"i0-dr"}
        await asyncio.sleep(0.7)    # a stopped discovery task does not bring its instances back
        assert set(instances(reg)) == {"i0-dr"}


async def test_listed_and_discovered_instances_together(store: AffinityStore) -> None:
    pol = parse_policy(discover_policy("du", "127.0.0.1:53", extra=", kv_events_port: 5557, kv_events_dp_ranks: 2")
                       .replace("discover:", 'instances: [{id: static, url: "http://10.0.0.1:8000"}]\n    discover:'),
                       "union.yaml")
    reg = Registry(pol)
    assert [i.instance_id for i in reg.tiers["fast"].instances] == ["static"]
    spec = pol.tiers["fast"].discover
    assert spec is not None
    found = [instance_spec("fast", spec, Endpoint(a, 8000)) for a in ("10.0.0.1", "10.0.0.2", "10.0.0.3")]
    assert reg.set_discovered("fast", found) and not reg.set_discovered("fast", list(found))
    # 10.0.0.1:8000 is the listed instance's URL: listed once, by its listed id
    assert [i.instance_id for i in reg.tiers["fast"].instances] == ["static", "fast@10.0.0.2:8000",
                                                                     "fast@10.0.0.3:8000"]
    two = reg.tiers["fast"].instances[1]
    two.in_flight, two.healthy = 3, False
    reg.apply(pol)                                          # a reload keeps them, and their state
    assert reg.tiers["fast"].instances[1] is two and two.in_flight == 3 and not two.healthy
    assert reg.set_discovered("fast", found[2:])
    assert [i.instance_id for i in reg.tiers["fast"].instances] == ["static", "fast@10.0.0.3:8000"]
    subs = kv_subscribers(pol, reg, store, RouterMetrics())
    assert [k[1:] for k in subs] == [("fast@10.0.0.3:8000", "tcp://10.0.0.3:5557 tcp://10.0.0.3:5558")]
    reg.apply(parse_policy(policy_text("du", ["http://10.0.0.1:8000"], {"free": ""}), "static.yaml"))
    assert [i.instance_id for i in reg.tiers["fast"].instances] == ["i0-du"] and not reg.discovered


@pytest.mark.parametrize(("fields", "path", "says"), [
    ("record: A", "port", "needs the port"),
    ("record: SRV, port: 8000", "port", "leave `port` out"),
    ("record: A, port: 70000", "port", "1 to 65535"),
    ("record: MX", "record", "A (every A/AAAA"),
    ("record: SRV, scheme: ftp", "scheme", "http or https"),
    ("record: SRV, interval_s: 0.1", "interval_s", ">= 0.5"),
    ("record: SRV, kv_events_port: 0", "kv_events_port", "1 to 65535"),
    ("record: SRV, kv_events_dp_ranks: 2", "kv_events_dp_ranks", "needs kv_events_port"),
    ("record: SRV, nameserver: dns.local", "nameserver", "IP address"),
    ("record: SRV, nameserver: '10.0.0.1:99999'", "nameserver", "IP address"),
    ("record: A, port: eighty", "port", "Expected `int | null`"),
    ("record: A, port: 80, ttl: 5", "ttl", "unknown field"),
])
def test_malformed_discover_fields_are_refused_with_their_path(fields: str, path: str, says: str) -> None:
    text = policy_text("dv", ["http://127.0.0.1:9"], {"free": ""}).replace(
        'instances: [{id: i0-dv, url: "http://127.0.0.1:9"}]', f"discover: {{dns: {NAME}, {fields}}}")
    with pytest.raises(PolicyError) as err:
        parse_policy(text, "bad.yaml")
    assert err.value.path == f"$.tiers.fast.discover.{path}", str(err.value)
    assert says in str(err.value)


def test_discover_needs_a_dns_name_and_no_simulate() -> None:
    base = policy_text("dn", ["http://127.0.0.1:9"], {"free": ""})
    with pytest.raises(PolicyError) as err:
        parse_policy(base.replace('instances: [{id: i0-dn, url: "http://127.0.0.1:9"}]',
                                  "discover: {dns: 10.0.0.1, record: A, port: 80}"), "bad.yaml")
    assert err.value.path == "$.tiers.fast.discover.dns"
    with pytest.raises(PolicyError) as err:
        parse_policy(base.replace('instances: [{id: i0-dn, url: "http://127.0.0.1:9"}]',
                                  f"discover: {{dns: {NAME}, record: SRV}}\n    simulate: {{profile: x}}"), "bad.yaml")
    assert err.value.path == "$.tiers.fast.discover" and "not both" in str(err.value)
