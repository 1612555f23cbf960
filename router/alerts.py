"""Budget alerts (issue #17): each threshold fires once per tenant and period, across every replica.

* What: a tenant's thresholds (policies/alerts_spec.py) are fractions of each of its budgets. A threshold
  is crossed when the amount SPENT in the current UTC day or month (settled cost; reservations do not
  count: an alert says "you have used 80%", and a reservation is a worst case the request may not use)
  reaches threshold x budget. Admission reserves the worst case, so spend stays within the budget and a
  threshold of 1.0 is reached only when the requests use all they reserved; one above 1.0 only fires on
  overspend (`on_store_failure: allow_share`, settlements of requests admitted without Redis).
* When: after a tenant's settlement lands in Redis (the accountant's `on_settled` hook, batched
  settlements and journal replays alike) its periods are checked, off the request path; every `sweep_s`
  (and at start) every alerting tenant is checked too (a replica that stopped between settling and
  checking, a reload that lowered a budget).
* Once: one Lua script in the tenant's slot reads the spend and marks each threshold it reached with
  HSETNX on `{tg:<tenant>}:alerts:<daily|monthly>:<period id>`, which expires two days after the period
  ends. However many replicas and settlements race on a crossing, exactly one script run claims it.
  Redis away: checks are kept and retried every `retry_s`; no alert is decided without Redis, so none
  twice. The claim is at most once: a replica that dies (or whose reply is lost) after the claim and
  before its webhook is sent loses that alert's delivery.
* Then, on the replica that claimed it: a log line `budget_alert` (tenant, period, period_id, threshold,
  spent and budget; no secrets), `tiergate_budget_alerts_total{result="fired"}`, and the webhook
  (router/alert_webhook.py), counted `delivered`, `failed` or `dropped`; `no_webhook` when no
  TIERGATE_ALERT_WEBHOOK_URL is set (the alert is still logged and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
from collections.abc import Callable
from typing import Any

from policies.alerts_spec import thresholds_for
from policies.schema import Policy
from router.alert_webhook import Alert, WebhookSender, check_webhook
from router.budget_lua import _COMMON
from router.budget_store import COST_SCALE, tag, usd
from router.logs import get_logger
from router.metrics import RouterMetrics
from router.redis_batch import Call, pipelined
from router.redis_pool import RedisClient, register
from router.settings import Settings

# KEYS: b (the budget counters, router/budget_lua.py), alerts prefix ('{tg:<tenant>}:alerts').
# ARGV: now, then (period 'daily'|'monthly', threshold label, threshold in units) for each threshold.
# -> {period, period id, label, spent units} for each threshold this run claimed (reached, and not claimed before)
ALERT = _COMMON + """
local now = now_ms(ARGV[1])
local day, mon, _, day_left_s, mon_left_s = periods(now)
local out = {}
for i = 2, #ARGV - 2, 3 do
  local period, label, units = ARGV[i], ARGV[i + 1], num(ARGV[i + 2])
  local id, left, field = day, day_left_s, 'sd:'
  if period == 'monthly' then id, left, field = mon, mon_left_s, 'sm:' end
  local spent = num(redis.call('HGET', KEYS[1], field .. id))
  if spent >= units then
    local key = KEYS[2] .. ':' .. period .. ':' .. id
    if redis.call('HSETNX', key, label, fmt(spent)) == 1 then
      redis.call('EXPIRE', key, math.floor(left) + 172800)
      out[#out + 1] = period; out[#out + 1] = id; out[#out + 1] = label; out[#out + 1] = fmt(spent)
    end
  end
end
return out
"""

Target = tuple[str, str, float, float, int]   # (period, label, threshold, budget USD, threshold in units)
MAX_CHECK = 256                                 # tenants checked in one round trip


def label(threshold: float) -> str:
    """A threshold as its claim's field and metric label: 0.8 -> '0.8', 1.0 -> '1' (distinct for distinct values)."""
    return repr(float(threshold)).removesuffix(".0")


def targets(policy: Policy) -> dict[str, list[Target]]:
    """Every alerting tenant's thresholds, per budget it has (a zero budget has none)."""
    out: dict[str, list[Target]] = {}
    for name, spec in policy.tenants.items():
        ts = thresholds_for(policy, spec)
        got = [(period, label(t), t, budget, math.ceil(t * round(budget * COST_SCALE) - 1e-6))
               for period, budget in (("daily", spec.budgets.daily_usd), ("monthly", spec.budgets.monthly_usd))
               if budget for t in ts]
        if got:
            out[name] = got
    return out


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class BudgetAlerts:
    def __init__(self, redis: RedisClient, metrics: RouterMetrics, policy: Callable[[], Policy], *,
                 sender: WebhookSender | None = None, clock_ms: Callable[[], int] | None = None,
                 sweep_s: float = 60.0, retry_s: float = 1.0, timeout_s: float = 1.0) -> None:
        self.redis = redis
        self.metrics = metrics
        self.policy = policy
        self.sender = sender
        self.clock_ms = clock_ms       # None: Redis TIME (as router/budget_store.py)
        self.sweep_s = sweep_s
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.dirty: set[str] = set()   # tenants to check
        self.wake = asyncio.Event()
        self.store_ok = True
        self._script: Any = register(redis, ALERT)   # either client type (router/redis_pool.py)
        self._for: tuple[Policy | None, dict[str, list[Target]]] = (None, {})
        self.log = get_logger("tiergate.alerts")

    @classmethod
    def from_settings(cls, settings: Settings, redis: RedisClient, metrics: RouterMetrics,
                      policy: Callable[[], Policy]) -> BudgetAlerts:
        """ValueError for a webhook URL that is not http(s), or one without its signing secret."""
        check_webhook(settings.alert_webhook_url, settings.alert_webhook_secret)
        alerts = cls(redis, metrics, policy)
        if settings.alert_webhook_url and settings.alert_webhook_secret:
            alerts.sender = WebhookSender(
                settings.alert_webhook_url, settings.alert_webhook_secret, alerts.count,
                attempts=settings.alert_webhook_attempts, backoff_s=settings.alert_webhook_backoff_s,
                timeout_s=settings.alert_webhook_timeout_s)
        return alerts

    def targets(self) -> dict[str, list[Target]]:
        policy = self.policy()
        if self._for[0] is not policy:
            self._for = (policy, targets(policy))
        return self._for[1]

    def settled(self, tenant: str) -> None:
        """The accountant's hook: a settlement of `tenant` landed in Redis."""
        if tenant in self.targets():
            self.dirty.add(tenant)
            self.wake.set()

    def count(self, alert: Alert, result: str) -> None:
        self.metrics.child(self.metrics.budget_alerts, alert.tenant, alert.period, label(alert.threshold),
                           result).inc()

    async def run(self) -> None:
        """The checker (lifespan-owned), with the webhook sender's own loop."""
        sending = asyncio.create_task(self.sender.run(), name="budget-alert-sender") if self.sender else None
        next_sweep = time.monotonic()
        try:
            while True:
                if not self.dirty:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, next_sweep - time.monotonic())):
                            await self.wake.wait()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_s
                    self.dirty.update(self.targets())
                if not await self.check():
                    await asyncio.sleep(self.retry_s)
        finally:
            if sending is not None:
                sending.cancel()
                await asyncio.wait([sending], timeout=1)

    async def check(self) -> bool:
        """Check up to MAX_CHECK dirty tenants in one round trip and fire what they crossed. False (the
        tenants stay dirty) when Redis failed."""
        want = self.targets()
        batch = [self.dirty.pop() for _ in range(min(len(self.dirty), MAX_CHECK))]
        batch = [t for t in batch if t in want]
        if not batch:
            return True
        now = "" if self.clock_ms is None else str(self.clock_ms())
        calls: list[Call] = [(self._script, [f"{tag(t)}:b", f"{tag(t)}:alerts"],
                              [now, *(str(x) for target in want[t] for x in (target[0], target[1], target[4]))])
                             for t in batch]
        try:
            async with asyncio.timeout(self.timeout_s):
                replies = await pipelined(self.redis, calls)
        except Exception as exc:
            self._failed(batch, exc)
            return False
        ok = True
        for tenant, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                self._failed([tenant], reply)
                ok = False
                continue
            vals = [_s(x) for x in reply]
            for i in range(0, len(vals) - 3, 4):
                self._fire(tenant, vals[i], vals[i + 1], vals[i + 2], int(vals[i + 3]), want[tenant])
        if ok:
            self.store_ok = True
        return ok

    def _failed(self, tenants: list[str], exc: BaseException) -> None:
        self.dirty.update(tenants)
        if self.store_ok:
            self.log.warning("budget_alerts_store_unavailable", error=type(exc).__name__, waiting=len(self.dirty))
        self.store_ok = False

    def _fire(self, tenant: str, period: str, period_id: str, lab: str, spent: int, want: list[Target]) -> None:
        threshold, budget = float(lab), 0.0
        for p, lb, t, b, _ in want:
            if p == period and lb == lab:
                threshold, budget = t, b
        at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        alert = Alert(tenant, period, period_id, threshold, usd(spent), budget, at)
        self.log.info("budget_alert", tenant=tenant, period=period, period_id=period_id, threshold=threshold,
                      spent_usd=alert.spent_usd, budget_usd=budget, alert_id=alert.alert_id)
        self.count(alert, "fired")
        if self.sender is None:
            self.count(alert, "no_webhook")
        else:
            self.sender.put(alert)

    async def aclose(self) -> None:
        """Shutdown, after the last settlements: one last check, then the webhook's grace (alert_webhook.py)."""
        if self.dirty:
            await self.check()
        if self.sender is not None:
            await self.sender.aclose()
