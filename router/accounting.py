"""Tenant admission and exact billing: the request-side face of `BudgetStore` and `Journal`.

* `admit`: tenants with no limits and no budgets are not checked (their usage is still
  billed). Others run one atomic admission (RPM, TPM, worst-case reservation per day and
  month, idempotent id) with a short timeout. Over a limit: 429 `rate_limit_exceeded` or
  `insufficient_quota` with the budget left, Retry-After and `x-should-retry: false`.
* Redis away (timeout or error), per the tenant's `on_store_failure`:
    - `reject`: 503 `accounting_unavailable` with Retry-After;
    - `allow_share`: this replica may spend `store_failure_share` of the budget left as
      last seen (of the whole budget if never seen), and of each rate limit, counted
      locally until Redis answers again. Both outcomes are counted in metrics; limits
      never silently become per-replica.
* `settle`: every request that was admitted settles exactly once, at completion,
  cancellation, client disconnect or backend failure, off the request path: queued on a
  micro-batcher (router/redis_batch.py: at once when idle, a 1 ms window under load), whose
  flush settles up to 64 requests in one pipelined round trip under one `settle_timeout_s`
  deadline. If Redis fails (the flush, or one item's script), those records go to the
  fsync'd local journal (one write) and are replayed (idempotently, by request id) when
  Redis answers again; while Redis is down with records pending, a flush goes straight to
  the journal. A full queue settles the request unbatched (never dropped).
* Background (lifespan-owned): the settlement flusher (`batch.run`), the journal replayer
  and the reservation sweeper.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from policies.schema import Policy, TenantSpec, TierSpec
from router.budget_store import COST_SCALE, Admission, FlexBudget, Usage, price_units, usd
from router.errors import ApiError
from router.journal import Journal
from router.lifecycle.ports import BudgetLedger
from router.logs import get_logger
from router.metrics import RouterMetrics
from router.redis_batch import MicroBatcher

Settlement = tuple[str, str, Usage]   # (tenant, request id, usage)


def cost_units(tier: TierSpec, prompt: int, cached: int, completion: int, factor: float = 1.0) -> int:
    """The cost of the tokens at the tier's prices, times the SLO class's `price_factor` (a batch discount):
    the prompt's cost discounted and rounded up, plus the completion tokens at the discounted output price
    per token (rounded up), so a reservation made with the same formula covers what is billed exactly
    as the undiscounted one does (the budget's flex reservation prices completion tokens one by one)."""
    p = tier.prices
    prompt_units = max(prompt - cached, 0) * price_units(p.input) + cached * price_units(p.cached_input)
    if factor == 1.0:
        return prompt_units + completion * price_units(p.output)
    return discounted(prompt_units, factor) + completion * discounted(price_units(p.output), factor)


def discounted(units: int, factor: float) -> int:
    """`units` x `factor`, rounded up (a float product a hair above a whole number stays that number)."""
    return units if factor == 1.0 else max(0, math.ceil(units * factor - 1e-6))


@dataclass(frozen=True)
class Admitted:
    """What admission granted: a shrunk completion budget (None: as asked) and x-ratelimit-* headers."""

    granted: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _reset(seconds: float) -> str:
    """A duration as OpenAI writes its x-ratelimit-reset-* headers: 6m0s, 1.5s, 20ms."""
    if seconds < 1:
        return f"{max(seconds, 0.0) * 1000:.0f}ms"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:.0f}s" if minutes >= 1 else f"{secs:.3g}s"


def ratelimit_headers(spec: TenantSpec, requests: int, tokens: int, now: float, full: str = "") -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for a tenant with RPM/TPM limits (a sliding minute, so the reset is when
    the current minute's share of the window rolls off). `full`: the limit just hit (rpm or tpm)."""
    out: dict[str, str] = {}
    reset = _reset(60 - now % 60)
    for kind, limit, used in (("requests", spec.limits.rpm, requests), ("tokens", spec.limits.tpm, tokens)):
        if limit is None:
            continue
        hit = full == ("rpm" if kind == "requests" else "tpm")
        out[f"x-ratelimit-limit-{kind}"] = str(limit)
        out[f"x-ratelimit-remaining-{kind}"] = "0" if hit else str(max(limit - used, 0))
        out[f"x-ratelimit-reset-{kind}"] = reset
    return out


def baseline_tier(policy: Policy) -> str:
    if policy.accounting.baseline_tier:
        return policy.accounting.baseline_tier
    return "balanced" if "balanced" in policy.tiers else next(iter(policy.tiers))


@dataclass
class _Share:
    """allow_share mode: what this replica may still admit on its own while Redis is away."""

    units_left: float | None
    admitted: deque[float] = field(default_factory=deque)          # times (rpm window)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens)


class Accountant:
    def __init__(self, policy: Policy, store: BudgetLedger | None, journal: Journal, metrics: RouterMetrics, *,
                 timeout_s: float = 0.1, settle_timeout_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.store = store
        self.journal = journal
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.settle_timeout_s = settle_timeout_s
        self.clock = clock
        self.log = get_logger("tiergate.accounting")
        self.used: dict[str, float] = {}          # tenant -> tightest budget's used fraction, last seen
        self.left: dict[str, int] = {}            # tenant -> budget units left, last seen
        self.shares: dict[str, _Share] = {}       # tenants admitted locally while Redis is away
        self.tasks: set[asyncio.Task[None]] = set()
        self.unknown: dict[str, str] = {}         # refused requests whose admission outcome is unknown -> tenant
        self.store_ok = store is not None
        self.batch: MicroBatcher[Settlement] = MicroBatcher("settle", self._settle_batch, metrics=metrics)
        metrics.journal_pending.set(journal.pending)

    @staticmethod
    def limited(spec: TenantSpec) -> bool:
        return any(v is not None for v in (spec.limits.rpm, spec.limits.tpm, spec.budgets.daily_usd,
                                            spec.budgets.monthly_usd))

    async def admit(self, tenant: str, rid: str, tokens: int, reserve: int, policy: Policy | None = None,
                    flex: FlexBudget | None = None) -> Admitted:
        """`policy`: the one the request started under (a reload may have swapped `self.policy` since).
        `flex`: the request named no max_tokens; its completion budget may shrink to the budget left."""
        pol = policy or self.policy
        spec = pol.tenants[tenant]
        if not self.limited(spec):
            return Admitted()
        b = spec.budgets
        daily = None if b.daily_usd is None else round(b.daily_usd * COST_SCALE)
        monthly = None if b.monthly_usd is None else round(b.monthly_usd * COST_SCALE)
        try:
            if self.store is None:
                raise ConnectionError("no Redis configured")
            store = self.store

            async def call() -> Admission:
                return await store.admit(
                    tenant, rid, rpm=spec.limits.rpm, tpm=spec.limits.tpm, tokens=tokens, reserve=reserve,
                    daily=daily, monthly=monthly, ttl_s=pol.accounting.reservation_ttl_s, flex=flex)
            adm = await self._admit_call(call)
        except Exception as exc:
            self._store_failed(exc)
            try:
                self._admit_without_store(tenant, spec, tokens, reserve, daily, monthly)
            except ApiError:
                if self.store is not None:   # the script may still run late: `background` undoes it within a
                    self.unknown[rid] = tenant  # second of Redis answering (an admitted one settles by its id)
                raise
            return Admitted()
        self.store_ok = True
        self.shares.pop(tenant, None)
        return self._admitted(tenant, spec, adm, daily, monthly)

    async def _admit_call(self, call: Callable[[], Awaitable[Admission]]) -> Admission:
        """The admission script with a short timeout; when that expires while the store was answering (its
        last call succeeded), asked once more with the settle timeout. A timeout on a healthy store is
        most often the event loop, busy with other requests, not Redis: it must not refuse a request that
        Redis would admit. Safe to ask again: the script keys on the request id, and an id admitted by a
        first run that outlived its timeout answers `dup` with what it granted. A store that is really
        away fails the second wait too, and the next requests then wait only the short timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await call()
        except TimeoutError:
            if not self.store_ok:
                raise
        try:
            async with asyncio.timeout(self.settle_timeout_s):
                adm = await call()
        except BaseException:
            self.metrics.child(self.metrics.admission_retries, "failed").inc()
            raise
        if adm.kind == "dup" and adm.detail != "open":   # released or settled meanwhile: not an admission
            self.metrics.child(self.metrics.admission_retries, "failed").inc()
            raise TimeoutError("admission answered dup for an id that is no longer open")
        self.metrics.child(self.metrics.admission_retries, "ok").inc()
        return adm

    def _admitted(self, tenant: str, spec: TenantSpec, adm: Admission, daily: int | None,
                  monthly: int | None) -> Admitted:
        if adm.ok:
            if adm.kind == "ok":
                self.used[tenant] = adm.used_fraction
                if adm.left_units is not None:
                    self.left[tenant] = adm.left_units
                    period = "daily" if daily is not None and (monthly is None or daily <= monthly) else "monthly"
                    cap = daily if period == "daily" else monthly
                    self.metrics.budget_left(tenant, period, usd(adm.left_units), None if cap is None else usd(cap))
            self.metrics.child(self.metrics.admissions, tenant, "admitted").inc()
            return Admitted(adm.granted, ratelimit_headers(spec, adm.window_requests, adm.window_tokens,
                                                           self.clock()))
        retry = max(1, int(adm.retry_after_s + 0.999))
        if adm.kind == "rate":
            self.metrics.child(self.metrics.admissions, tenant, "rate_limited").inc()
            limit = spec.limits
            value = limit.rpm if adm.detail == "rpm" else limit.tpm
            what = "requests" if adm.detail == "rpm" else "tokens"
            full = {"rpm": limit.rpm or 0, "tpm": limit.tpm or 0}
            headers = ratelimit_headers(spec, full["rpm"] if adm.detail == "rpm" else 0,
                                        full["tpm"] if adm.detail == "tpm" else 0, self.clock(), adm.detail)
            raise ApiError(429, f"rate limit exceeded: {value} {what} per minute for this key ({adm.detail})",
                           code="rate_limit_exceeded", type=what,
                           headers={"Retry-After": str(retry), **headers})
        self.metrics.child(self.metrics.admissions, tenant, "budget_exceeded").inc()
        left = usd(adm.left_units or 0)
        cap = daily if adm.detail == "daily" else monthly
        self.metrics.budget_left(tenant, adm.detail, left, None if cap is None else usd(cap))
        raise ApiError(429, f"{adm.detail} budget exceeded: ${left:.6f} left, less than this request's worst-case "
                            "cost (prompt + max_tokens at the tier's prices); lower max_tokens or wait for the "
                            "next period", code="insufficient_quota", type="insufficient_quota",
                       headers={"Retry-After": str(retry), "x-tiergate-budget-remaining-usd": f"{left:.6f}",
                                "x-should-retry": "false"})

    def _store_failed(self, exc: BaseException) -> None:
        if self.store_ok:
            self.log.warning("accounting_store_unavailable", error=type(exc).__name__)
        self.store_ok = False

    def _admit_without_store(self, tenant: str, spec: TenantSpec, tokens: int, reserve: int, daily: int | None,
                             monthly: int | None) -> None:
        if spec.on_store_failure == "reject":
            self.metrics.child(self.metrics.admissions, tenant, "store_unavailable_rejected").inc()
            raise ApiError(503, "the budget store is unavailable and this tenant's policy is to reject "
                                "(on_store_failure: reject); retry shortly", code="accounting_unavailable",
                           headers={"Retry-After": "1"})
        share = spec.store_failure_share
        st = self.shares.get(tenant)
        if st is None:
            base = self.left.get(tenant)
            if base is None:
                limits = [x for x in (daily, monthly) if x is not None]
                base = min(limits) if limits else None
            st = self.shares[tenant] = _Share(None if base is None else base * share)
        now = self.clock()
        while st.admitted and now - st.admitted[0] >= 60:
            st.admitted.popleft()
        while st.tokens and now - st.tokens[0][0] >= 60:
            st.tokens.popleft()
        why = None
        if spec.limits.rpm is not None and len(st.admitted) + 1 > spec.limits.rpm * share:
            why = "rpm"
        elif spec.limits.tpm is not None and sum(t for _, t in st.tokens) + tokens > spec.limits.tpm * share:
            why = "tpm"
        elif st.units_left is not None and reserve > st.units_left:
            why = "budget"
        if why is not None:
            self.metrics.child(self.metrics.admissions, tenant, "store_unavailable_rejected").inc()
            raise ApiError(429, f"the budget store is unavailable; this replica's share ({share:.0%}) of the "
                                f"tenant's {'budget' if why == 'budget' else why + ' limit'} is used up",
                           code="insufficient_quota" if why == "budget" else "rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        st.admitted.append(now)
        st.tokens.append((now, tokens))
        if st.units_left is not None:
            st.units_left -= reserve
        self.metrics.child(self.metrics.admissions, tenant, "store_unavailable_allowed").inc()

    def settle(self, tenant: str, rid: str, usage: Usage) -> None:
        """Bill one request, exactly once, off the request path (never raises): queued for the next flush;
        settled on its own (a task, its own round trip) only when the queue is full."""
        if not self.batch.put((tenant, rid, usage)):
            self._spawn(self._settle(tenant, rid, usage))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _release_unknown(self) -> None:
        """Release the admissions that timed out for refused requests (retried by `background` until Redis
        answers; each release is idempotent by id)."""
        if self.store is None:
            return
        for rid, tenant in list(self.unknown.items()):
            try:
                async with asyncio.timeout(self.settle_timeout_s):
                    how = await self.store.release(tenant, rid)
            except Exception:
                return
            self.unknown.pop(rid, None)
            self.metrics.child(self.metrics.settlements, "unknown_admission_" + how).inc()

    async def _settle(self, tenant: str, rid: str, usage: Usage) -> None:
        """One settlement on its own (a full batch queue; the replay driver settles each at once)."""
        if self.store is not None and (self.store_ok or self.journal.pending == 0):
            try:
                async with asyncio.timeout(self.settle_timeout_s):
                    how = await self.store.settle(tenant, rid, usage)
                self.metrics.child(self.metrics.settlements, how).inc()
                return
            except Exception as exc:
                self._store_failed(exc)
        await self._journal([(tenant, rid, usage)])

    async def _settle_batch(self, items: list[Settlement]) -> None:
        """One flush of the settlement batcher: one round trip for all, under one deadline. The items of a
        failed round trip, and any item whose own script failed, go to the journal, as `_settle` does with
        one; an item that did land before the failure is a `dup` when the journal replays it (SETTLE keys
        on the request id, router/budget_lua.py)."""
        if self.store is not None and (self.store_ok or self.journal.pending == 0):
            try:
                async with asyncio.timeout(self.settle_timeout_s):
                    answers = await self.store.settle_many(items)
            except Exception as exc:
                self._store_failed(exc)
            else:
                failed: list[Settlement] = []
                for item, how in zip(items, answers, strict=True):
                    if isinstance(how, Exception):
                        self._store_failed(how)
                        failed.append(item)
                    else:
                        self.metrics.child(self.metrics.settlements, how).inc()
                items = failed
        if items:
            await self._journal(items)

    async def _journal(self, items: list[Settlement]) -> None:
        await self.journal.append_many(items)
        self.metrics.child(self.metrics.settlements, "journaled").inc(len(items))
        self.metrics.journal_pending.set(self.journal.pending)

    async def replay_once(self) -> int:
        if self.store is None or self.journal.pending == 0:
            return 0
        store = self.store

        async def one(tenant: str, rid: str, usage: Usage) -> None:
            async with asyncio.timeout(self.settle_timeout_s):
                how = await store.settle(tenant, rid, usage)
            self.metrics.child(self.metrics.settlements, "replayed_" + how).inc()

        try:
            n = await self.journal.replay(one)
        except Exception as exc:
            self._store_failed(exc)
            return 0
        finally:
            self.metrics.journal_pending.set(self.journal.pending)
        self.store_ok = True
        self.log.info("usage_journal_replayed", records=n)
        return n

    async def sweep_once(self) -> int:
        if self.store is None:
            return 0
        total = 0
        for tenant, spec in self.policy.tenants.items():
            if not self.limited(spec):
                continue
            try:
                async with asyncio.timeout(1.0):
                    n = await self.store.sweep(tenant)
            except Exception:
                return total
            if n:
                self.metrics.child(self.metrics.swept, tenant).inc(n)
                total += n
        return total

    async def background(self, replay_interval_s: float = 1.0, sweep_interval_s: float = 5.0) -> None:
        last_sweep = 0.0
        while True:
            await self.replay_once()
            if self.unknown:
                await self._release_unknown()
            if time.monotonic() - last_sweep >= sweep_interval_s:
                last_sweep = time.monotonic()
                await self.sweep_once()
            await asyncio.sleep(replay_interval_s)

    async def drain(self) -> None:
        """Settle everything queued (a flush in flight included) and wait for unbatched settlements."""
        if self.unknown:
            await self._release_unknown()
        await self.batch.drain()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=10)
