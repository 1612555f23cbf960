"""Shadow policy: a second policy file decided on live traffic, which never changes what serves it.

Per request, right after the live decision, the shadow's profile for the request's route decides on the
same RoutingRequest and the same candidate snapshot (`Pending.candidates`). Only what the shadow policy
itself states changes: its route's profile (filters, scorers, picker, their parameters), its route's
tiers (the candidates are the live route's; a tier only the shadow route names has no candidates, as its
prompt was never tokenized), and its SLO class's `miss_cost_usd`. Instances, load and prices are the
live ones (the registry's).

Results:
  * the canonical log line and the decision record get `shadow_chosen` (a candidate key, or null where
    the shadow would refuse) and `shadow_cost_delta_usd` (the shadow choice's estimated USD minus the
    live one's, 0 when they agree, null where the shadow would refuse);
  * metrics: `tiergate_shadow_decisions_total{agree}`, `tiergate_shadow_cost_delta_usd` (a running sum),
    `tiergate_shadow_estimated_cost_usd_total{policy}` and `tiergate_shadow_failures_total{reason}`.
The estimated USD of both choices comes from one source so the delta compares like with like: the live
decision's estimates where it priced both, else the shadow decision's, else `expected_money` with its
default parameters over the whole snapshot.

Cost and isolation: one profile run over candidates already gathered (no I/O, no tokenizing), on the
request path, before dispatch; measured in bench figures in the report. Any exception in it is caught,
counted (`reason="error"`) and logged with its type, and the request goes on as if there were no shadow.

Hot reload: the file is checked every `interval_s` (Settings.policy_reload_interval_s), and parsed in a
child process (router/policy_worker.py) like the main policy; an invalid file keeps the last good shadow
(counted `policy_invalid`, logged once per distinct error). A file invalid at start leaves shadowing off
until it becomes valid; the router serves regardless.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import msgspec

from policies.engine import Profile, build_profiles
from policies.plugins.expected_money import ExpectedMoney
from policies.schema import Policy, PolicyError, load_policy
from policies.types import Candidate, RoutingDecision, RoutingRequest
from policies.yaml_loader import read_policy_text
from router.lifecycle.core import Pending
from router.live_policy import policy_version
from router.logs import get_logger
from router.metrics import RouterMetrics
from router.policy_worker import parse_in_child

__all__ = ["Shadow"]

_reference = ExpectedMoney()


class Shadow:
    def __init__(self, path: str | Path, metrics: RouterMetrics, executor: Executor, *,
                 interval_s: float = 2.0) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.executor = executor
        self.interval_s = interval_s
        self.policy: Policy | None = None
        self.profiles: dict[str, Profile] = {}
        self.version = ""
        self.seen: str | None = None        # the file's text last checked
        self.error: str | None = None
        self.log = get_logger("tiergate.shadow")

    # --- loading ------------------------------------------------------------------------------
    def load_now(self) -> None:
        """At start (blocking, like the main policy's first load); an invalid file leaves shadowing off."""
        try:
            self.seen = read_policy_text(self.path)
            self._use(load_policy(self.path))
        except (PolicyError, ValueError, OSError) as exc:
            self._refused(str(exc))

    async def check(self) -> str:
        """-> reloaded | unchanged | invalid. Reading and building on the executor, parsing in a child."""
        loop = asyncio.get_running_loop()
        try:
            text = await loop.run_in_executor(self.executor, read_policy_text, self.path)
        except (PolicyError, OSError) as exc:
            return self._refused(str(exc))
        if text == self.seen:
            return "invalid" if self.error else "unchanged"
        self.seen = text
        try:
            policy = await parse_in_child(text, str(self.path), self.executor)
            profiles = await loop.run_in_executor(self.executor, build_profiles, policy)
        except (PolicyError, ValueError, OSError) as exc:
            return self._refused(str(exc))
        self._use(policy, profiles)
        self.log.info("shadow_policy_loaded", path=str(self.path), shadow_version=self.version)
        return "reloaded"

    def _use(self, policy: Policy, profiles: dict[str, Profile] | None = None) -> None:
        self.profiles = profiles if profiles is not None else build_profiles(policy)
        self.policy = policy
        self.version = policy_version(policy)
        self.error = None

    def _refused(self, error: str) -> str:
        if error != self.error:
            self.metrics.child(self.metrics.shadow_failures, "policy_invalid").inc()
            self.log.warning("shadow_policy_rejected", path=str(self.path), error=error,
                             running=self.version or None)
        self.error = error
        return "invalid"

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception as exc:   # the watcher outlives whatever the file does
                self._refused(f"{type(exc).__name__}: {exc}")

    # --- deciding -----------------------------------------------------------------------------
    def observe(self, p: Pending, live: RoutingDecision) -> None:
        """Decide `p` with the shadow policy and report the difference; never raises."""
        if self.policy is None:
            return
        try:
            self._observe(self.policy, p, live)
        except Exception as exc:
            self.metrics.child(self.metrics.shadow_failures, "error").inc()
            self.log.warning("shadow_failed", request_id=p.rid, error=type(exc).__name__)

    def decide(self, policy: Policy, p: Pending) -> RoutingDecision | None:
        """The shadow's decision for `p` (None: the shadow policy has no such route)."""
        route = policy.routes.get(p.route)
        if route is None:
            return None
        rreq = p.rreq
        tiers = tuple(t for t in route.tiers if t in rreq.prompt_tokens)
        cls = policy.slo_classes.get(rreq.slo_class)
        miss = cls.miss_cost_usd if cls is not None else rreq.miss_cost_usd
        if tiers != rreq.route_tiers or miss != rreq.miss_cost_usd:
            rreq = msgspec.structs.replace(rreq, route_tiers=tiers, miss_cost_usd=miss)
        return self.profiles[route.profile].decide(rreq, [c for c in p.candidates if c.tier in tiers])

    def _observe(self, policy: Policy, p: Pending, live: RoutingDecision) -> None:
        m = self.metrics
        shadow = self.decide(policy, p)
        if shadow is None:
            m.child(m.shadow_failures, "no_route").inc()
            p.notes["shadow_chosen"] = None
            return
        live_key = live.chosen.key if live.chosen is not None else None
        shadow_key = shadow.chosen.key if shadow.chosen is not None else None
        agree = live_key == shadow_key
        m.child(m.shadow_decisions, "true" if agree else "false").inc()
        delta: float | None = 0.0
        if not agree:
            delta = None
            if live_key is not None and shadow_key is not None:
                usd = _priced(live_key, shadow_key, live, shadow, p.rreq, p.candidates)
                if usd is not None:
                    delta = usd[1] - usd[0]
                    m.child(m.shadow_cost, "live").inc(usd[0])
                    m.child(m.shadow_cost, "shadow").inc(usd[1])
                    m.shadow_cost_delta.inc(delta)
        elif live_key is not None and "usd" in live.estimates.get(live_key, {}):
            both = live.estimates[live_key]["usd"]
            m.child(m.shadow_cost, "live").inc(both)
            m.child(m.shadow_cost, "shadow").inc(both)
        p.notes["shadow_chosen"] = shadow_key
        p.notes["shadow_cost_delta_usd"] = None if delta is None else round(delta, 10)


def _priced(a: str, b: str, live: RoutingDecision, shadow: RoutingDecision, rreq: RoutingRequest,
            cands: list[Candidate]) -> tuple[float, float] | None:
    """(estimated USD of `a`, of `b`) from one source (the module header)."""
    for ests in (live.estimates, shadow.estimates):
        ea: dict[str, Any] = ests.get(a, {})
        eb: dict[str, Any] = ests.get(b, {})
        if "usd" in ea and "usd" in eb:
            return float(ea["usd"]), float(eb["usd"])
    by_key = {c.key: e for c, e in zip(cands, _reference.estimates(rreq, cands), strict=True)}
    if a in by_key and b in by_key:
        return by_key[a]["usd"], by_key[b]["usd"]
    return None
