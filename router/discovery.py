"""Service discovery by DNS: a tier's instances from a name, re-resolved every few seconds.

A tier with `discover:` (policies/schema.DiscoverSpec) gets one lifespan-owned task that resolves `dns`
every `interval_s` (backends/dns.py: record A, every A/AAAA address at `port`; record SRV, every target
at its record's port; asked of `nameserver` when set, else of the system resolver; 1 s per query).
Each endpoint is an instance with the id `<tier>@<address>:<port>` (`<tier>@[<v6>]:<port>`), the URL
`<scheme>://<address>:<port>` and, with `kv_events_port`, KV events at `tcp://<address>:<kv_events_port>`
(`kv_events_dp_ranks` ranks). Ids derive from addresses only, so they are stable across re-resolutions
and the same on every router replica (LoadSync shares load by id).

A changed set goes to `Registry.set_discovered`, one synchronous step: new instances join (serving until
a probe says otherwise, as listed ones), gone ones leave (no new request picks them; requests already
there finish; their affinity entries age out), and kept ones keep their InstanceState (health,
ejections, load, in flight). Then `on_change` (the app's `sync_kv_subscribers`) starts and stops KV-event
subscribers. Listed `instances:` of the tier stay beside the discovered ones (the union); a discovered
endpoint with a listed instance's id or URL is left out.

A failed resolution (timeout, network error, SERVFAIL, a malformed reply) and an answer with no records
both keep the last set: a DNS outage, or a Service briefly without endpoints, never empties the tier
(the health probes take dead instances out). Every resolution is counted in
`tiergate_discovery_resolutions_total{tier,result}` (ok, empty, error); a change of result is logged
once, not every interval. `tiergate_discovered_instances{tier}` is the size of the last set.

Start-up: `start()` resolves every discovering tier once before the router serves, then starts the
tasks (a tier whose first resolution fails has no discovered instance until one succeeds).
Policy reload: `sync()` (after `Registry.apply`, which keeps the discovered instances of tiers
that still discover) restarts the task of a tier whose `discover` changed (it resolves at once; until
then the old set stays), starts those of new tiers and stops those of tiers that no longer discover.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from backends.dns import DnsError, Endpoint, resolve
from backends.registry import Registry
from policies.schema import DiscoverSpec, InstanceSpec, Policy
from router.logs import get_logger
from router.metrics import RouterMetrics

Resolver = Callable[[str, str, int | None, str | None, float], Awaitable[list[Endpoint]]]


def instance_spec(tier: str, spec: DiscoverSpec, ep: Endpoint) -> InstanceSpec:
    host = ep.hostport.rsplit(":", 1)[0]
    kv = None if spec.kv_events_port is None else f"tcp://{host}:{spec.kv_events_port}"
    return InstanceSpec(id=f"{tier}@{ep.hostport}", url=f"{spec.scheme}://{ep.hostport}", kv_events=kv,
                        kv_events_dp_ranks=spec.kv_events_dp_ranks)


class Discovery:
    def __init__(self, registry: Registry, metrics: RouterMetrics, on_change: Callable[[], None], *,
                 resolver: Resolver = resolve, timeout_s: float = 1.0) -> None:
        self.registry = registry
        self.metrics = metrics
        self.on_change = on_change
        self.resolver = resolver
        self.timeout_s = timeout_s
        self.running: dict[str, tuple[DiscoverSpec, asyncio.Task[None]]] = {}
        self.results: dict[str, str] = {}     # tier -> the last resolution's result, to log changes once
        self.log = get_logger("tiergate.discovery")

    async def start(self, policy: Policy) -> None:
        """Resolve every discovering tier once (concurrently), then start their tasks."""
        await asyncio.gather(*(self.resolve_once(t, s.discover) for t, s in policy.tiers.items()
                               if s.discover is not None))
        self.sync(policy, resolved=True)

    def sync(self, policy: Policy, resolved: bool = False) -> None:
        """One task per discovering tier of `policy`, for its current `discover` (synchronous)."""
        want = {t: s.discover for t, s in policy.tiers.items() if s.discover is not None}
        for tier in [t for t, (spec, _) in self.running.items() if want.get(t) != spec]:
            self.running.pop(tier)[1].cancel()
            if tier not in want:
                self.results.pop(tier, None)
                with contextlib.suppress(KeyError):
                    self.metrics.discovered.remove(tier)
        for tier, spec in want.items():
            if tier not in self.running:
                task = asyncio.create_task(self._run(tier, spec, not resolved), name=f"discovery-{tier}")
                self.running[tier] = (spec, task)

    def tasks(self) -> list[asyncio.Task[None]]:
        return [task for _, task in self.running.values()]

    async def _run(self, tier: str, spec: DiscoverSpec, now: bool) -> None:
        if not now:
            await asyncio.sleep(spec.interval_s)
        while True:
            await self.resolve_once(tier, spec)
            await asyncio.sleep(spec.interval_s)

    async def resolve_once(self, tier: str, spec: DiscoverSpec) -> None:
        """Resolve and, when the set changed, apply it; a failure or an empty answer keeps the last set."""
        try:
            found = await self.resolver(spec.dns, spec.record, spec.port, spec.nameserver, self.timeout_s)
        except DnsError as exc:
            self._note(tier, spec, "error", str(exc))
            return
        except Exception as exc:   # whatever the resolver does, the task goes on and the last set stays
            self._note(tier, spec, "error", f"{type(exc).__name__}: {exc}")
            return
        if not found:
            self._note(tier, spec, "empty", "no records")
            return
        self._note(tier, spec, "ok", None)
        self._apply(tier, [instance_spec(tier, spec, ep) for ep in found])

    def _apply(self, tier: str, specs: list[InstanceSpec]) -> None:
        before = {i.id for i in self.registry.discovered.get(tier, [])}
        if not self.registry.set_discovered(tier, specs):
            return
        after = {i.id for i in specs}
        self.metrics.discovered.labels(tier).set(len(specs))
        self.log.info("discovery_changed", tier=tier, instances=len(specs), joined=sorted(after - before),
                      left=sorted(before - after))
        self.on_change()

    def _note(self, tier: str, spec: DiscoverSpec, result: str, error: str | None) -> None:
        self.metrics.child(self.metrics.discovery, tier, result).inc()
        before = self.results.get(tier)
        self.results[tier] = result
        if result == before:
            return
        if result == "ok":
            if before is not None:
                self.log.info("discovery_recovered", tier=tier, dns=spec.dns, was=before)
        else:
            self.log.warning("discovery_failed", tier=tier, dns=spec.dns, record=spec.record, result=result,
                             error=error, kept=len(self.registry.discovered.get(tier, [])))
