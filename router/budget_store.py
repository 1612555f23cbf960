"""Per-tenant admission, settlement and the usage ledger in Redis: one atomic script per step.

* `admit`: checks the tenant's RPM and TPM sliding windows (one minute, on Redis time),
  reserves the request's worst-case cost against the UTC day and month budgets, and
  records the request id; admitting the same id again is a no-op (`dup`).
* `settle`: releases the reservation, adds the real cost to the periods it was reserved
  in, corrects the TPM window to the real tokens, appends one ledger record to the
  tenant's stream and adds it to the hourly aggregates. Settling an id twice is a no-op.
  `settle_many`: many settlements in one pipelined round trip (router/redis_batch.py).
  Settling an id that was never admitted (Redis was away, or the tenant has no limits)
  bills it at the request's own time ("orphan"); settling after the sweeper released
  the reservation ("expired") bills it without releasing anything twice.
* `sweep`: releases reservations past their TTL (a router that died mid-request).
* `release`: undoes an admission whose outcome the router never learned (a timeout) for a request
  it refused: the reservation is released if the script ran, and the id blocked if it had not, so
  a late run reserves nothing. No phantom reservation waits for its TTL.

Durability (`wait_replicas`, Redis Cluster or Sentinel with replicas): replication is asynchronous, so a
master that crashes can lose writes it already answered. With `wait_replicas` > 0 each admission and
settlement is followed by `WAIT wait_replicas wait_timeout_ms` on the same connection (router/redis_batch.py
`pipelined`); one that no replica confirmed in time raises `ReplicationError`, and the caller takes its
failure path: the admission is refused or admitted per `on_store_failure` (its reservation released when
Redis answers), the settlement goes to the journal and replays (idempotent by id). 0 (the default): no WAIT.

Money is integer units of 1e-10 USD (`COST_SCALE`), so sums are exact. Scripts live in
`router.budget_lua`. Callers set the timeouts: this class never retries. router/replay/budget_twin.py is
the in-memory twin (same replies, parsed by the same functions; tests/test_store_contract.py runs both).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from router import budget_lua
from router.redis_batch import Call, Wait, pipelined
from router.redis_pool import RedisClient, register

COST_SCALE = 10**10          # units per USD
PRICE_SCALE = COST_SCALE // 10**6  # units per token for a price of 1 USD per 1M tokens


def price_units(usd_per_1m: float) -> int:
    """A price in USD per 1M tokens as integer units per token (exact to 1e-4 USD per 1M)."""
    return round(usd_per_1m * PRICE_SCALE)


def usd(units: int | float) -> float:
    return units / COST_SCALE


def tag(tenant: str) -> str:
    return "{tg:" + tenant.replace("}", "_") + "}"


def q_prefix(tenant: str) -> str:
    """The prefix of the tenant's per-request keys; scripts that release expired reservations get it."""
    return f"{tag(tenant)}:q:"


@dataclass(frozen=True)
class FlexBudget:
    """A completion budget the admission script may shrink: reserve = prompt_units + n * units_per_token
    for the largest n <= wanted that fits the budget left, refused below `least`."""

    prompt_units: int
    units_per_token: int
    wanted: int
    least: int


@dataclass(frozen=True)
class Admission:
    ok: bool
    kind: str                        # ok | dup | rate | budget
    detail: str = ""                 # rpm | tpm | daily | monthly | the dup's state
    left_units: int | None = None    # budget left (the limiting period when rejected)
    retry_after_s: float = 0.0
    used_fraction: float = 0.0       # of the tightest budget, after this reservation
    granted: int | None = None       # a flexible completion budget shrunk to fit what is left (else None)
    window_requests: int = 0         # requests in the tenant's sliding minute, this one included
    window_tokens: int = 0           # tokens reserved in it, this request's included


@dataclass(frozen=True)
class Usage:
    """One request's usage, as it is settled and written to the ledger.

    Counterfactuals are honest (router/counterfactual.py): `base` is the cost on the baseline tier only
    where that tier could have served the request (`base_ok` True); `base_ok` False is "no alternative"
    (`base` 0), None: nothing to compare (an unbilled request). `gpu_us`/`gpu_src`: the GPU time charged
    (router/chargeback.py) and its input (engine | sim | throughput; "" none)."""

    tier: str
    instance: str
    route: str
    status: int
    prompt: int
    cached: int
    completion: int
    cost: int            # units
    base: int            # what it would have cost on the baseline tier (units), where the baseline could serve it
    nocache: int         # what it would have cost with no cache hits (units)
    latency_ms: float
    ttft_ms: float | None
    slo_met: bool | None
    at_ms: int           # wall-clock time of the request (bills orphans in the right period)
    source: str = "backend"   # backend usage, or "counted" from the stream
    base_ok: bool | None = None   # the baseline tier could have served it (None: not billed, nothing to compare)
    gpu_us: int = 0               # GPU-microseconds charged
    gpu_src: str = ""             # engine | sim | throughput ("" none)
    slo_class: str = ""           # the SLO class (per-class attainment)

    def fields(self) -> list[str]:
        slo = "" if self.slo_met is None else ("1" if self.slo_met else "0")
        ok = self.base_ok
        out = ["tier", self.tier, "instance", self.instance, "route", self.route, "status", str(self.status),
               "prompt", str(self.prompt), "cached", str(self.cached), "completion", str(self.completion),
               "base", str(self.base), "nocache", str(self.nocache),
               "latency_ms", f"{self.latency_ms:.1f}",
               "ttft_ms", "" if self.ttft_ms is None else f"{self.ttft_ms:.1f}", "slo", slo,
               "slo_met", "1" if self.slo_met else "0", "slo_n", "0" if self.slo_met is None else "1",
               "source", self.source, "base_n", "1" if ok else "0", "base_na", "1" if ok is False else "0",
               "base_cost", str(self.cost) if ok else "0", "gpu_us", str(self.gpu_us), "gpu_src", self.gpu_src]
        if self.slo_met is not None and self.slo_class:
            cls = slo_label(self.slo_class)
            out += [f"slo_met@{cls}", "1" if self.slo_met else "0", f"slo_n@{cls}", "1"]
        return out


GPU_SOURCES = ("engine", "sim", "throughput")
# ledger fields the hourly aggregates sum (router/budget_lua.py SETTLE, router/replay/budget_twin.py), besides
# requests and cost; plus gpu_src -> gpu_src_<source> += 1, and slo_met@<class> / slo_n@<class>
AGG_FIELDS = ("prompt", "cached", "completion", "base", "nocache", "slo_met", "slo_n", "base_n", "base_na",
              "base_cost", "gpu_us")
_LABEL = re.compile(r"[^A-Za-z0-9._:-]")


def slo_label(name: str) -> str:
    """An SLO class name as it may appear in an aggregate key (no '|', bounded)."""
    return _LABEL.sub("_", name)[:64]


class BudgetStore:
    def __init__(self, redis: RedisClient, *, clock_ms: Callable[[], int] | None = None,
                 keep_s: float = 7 * 86400, ledger_maxlen: int = 1_000_000, retention_days: int = 400,
                 wait_replicas: int = 0, wait_timeout_ms: int = 100) -> None:
        self.redis = redis
        self.clock_ms = clock_ms          # None: Redis TIME
        self.keep_ms = int(keep_s * 1000)  # how long a settled id stays known (idempotent replays)
        self.ledger_maxlen = ledger_maxlen
        self.retention_days = retention_days  # the daily aggregate keys expire this long after their last write
        self.wait: Wait | None = (wait_replicas, wait_timeout_ms) if wait_replicas > 0 else None
        self._admit: Any = register(redis, budget_lua.ADMIT)
        self._settle: Any = register(redis, budget_lua.SETTLE)
        self._sweep: Any = register(redis, budget_lua.SWEEP)
        self._release: Any = register(redis, budget_lua.RELEASE)
        self._status: Any = register(redis, budget_lua.STATUS)

    def _now(self) -> str:
        return "" if self.clock_ms is None else str(self.clock_ms())

    @staticmethod
    def _keys(tenant: str, rid: str, *names: str) -> list[str]:
        t = tag(tenant)
        return [q_prefix(tenant) + rid if n == "q" else f"{t}:{n}" for n in names]

    async def admit(self, tenant: str, rid: str, *, rpm: int | None, tpm: int | None, tokens: int,
                    reserve: int, daily: int | None, monthly: int | None, ttl_s: float,
                    flex: FlexBudget | None = None) -> Admission:
        """`flex`: the request named no max_tokens, so its completion budget may shrink to fit the budget left."""
        f = flex or FlexBudget(0, 0, 0, 0)
        res = await self._run((self._admit, self._keys(tenant, rid, "q", "w", "b", "open"), [
            self._now(), rid, rpm or 0, tpm or 0, tokens, reserve, -1 if daily is None else daily,
            -1 if monthly is None else monthly, int(ttl_s * 1000), self.keep_ms, q_prefix(tenant),
            f.prompt_units, f.units_per_token, f.wanted, f.least]))
        return parse_admission(res, daily, monthly)

    async def _run(self, call: Call) -> Any:
        """One script; with `wait`, in one pipeline with its WAIT (raises ReplicationError unconfirmed)."""
        script, keys, args = call
        if self.wait is None:
            return await script(keys=keys, args=args)
        (res,) = await pipelined(self.redis, [call], self.wait)
        if isinstance(res, Exception):
            raise res
        return res

    async def settle(self, tenant: str, rid: str, usage: Usage) -> str:
        """-> open | expired | orphan (how it was settled), or dup when it already was."""
        return parse_settled(await self._run(self._settle_call(tenant, rid, usage)))

    async def settle_many(self, items: Sequence[tuple[str, str, Usage]]) -> list[str | Exception]:
        """Settle (tenant, id, usage) items in one round trip (router/redis_batch.py `pipelined`): each item's
        `settle` answer, or its own error. Raises when the round trip fails as a whole."""
        replies = await pipelined(self.redis, [self._settle_call(*item) for item in items], self.wait)
        return [r if isinstance(r, Exception) else parse_settled(r) for r in replies]

    def _settle_call(self, tenant: str, rid: str, usage: Usage) -> Call:
        return (self._settle, self._keys(tenant, rid, "q", "w", "b", "open", "usage", "agg"), [
            self._now(), rid, usage.cost, usage.prompt + usage.completion, self.keep_ms, self.ledger_maxlen,
            usage.at_ms, self.retention_days * 86_400_000, *usage.fields()])

    async def release(self, tenant: str, rid: str) -> str:
        """Undo an admission whose outcome is unknown: -> released | blocked (it had not run) | its state."""
        return _s(await self._release(keys=self._keys(tenant, rid, "q", "b", "open"),
                                      args=[self._now(), rid, self.keep_ms]))

    async def sweep(self, tenant: str, limit: int = 500) -> int:
        return int(await self._sweep(keys=self._keys(tenant, "", "b", "open"),
                                     args=[self._now(), q_prefix(tenant), limit]))

    async def status(self, tenant: str) -> dict[str, Any]:
        return parse_status(await self._status(keys=self._keys(tenant, "", "b", "open"),
                                               args=[self._now(), q_prefix(tenant)]))

    async def aggregates(self, tenant: str, days: int = 400, today: dt.date | None = None) -> dict[str, int]:
        """The hourly sums of the last `days` UTC days up to `today` (one extra day for clock skew)."""
        end = today or dt.datetime.now(dt.UTC).date()
        keys = [f"{tag(tenant)}:agg:{end + dt.timedelta(days=1 - k):%Y%m%d}" for k in range(days + 1)]
        keys.append(f"{tag(tenant)}:agg")  # the single hash of releases before per-day keys (reports filter by day)
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        out: dict[str, int] = {}
        for raw in await pipe.execute():
            for k, v in raw.items():
                out[_s(k)] = out.get(_s(k), 0) + int(v)
        return out

    async def ledger(self, tenant: str, count: int = 1000, after: str = "-") -> list[tuple[str, dict[str, str]]]:
        rows: Any = await self.redis.xrange(f"{tag(tenant)}:usage", min=after, max="+", count=count)
        return [(_s(i), {_s(k): _s(v) for k, v in f.items()}) for i, f in rows]


def parse_admission(res: list[Any], daily: int | None, monthly: int | None) -> Admission:
    """The ADMIT script's reply (router/budget_lua.py) as an Admission (shared with the in-memory twin)."""
    kind = _s(res[0])
    if kind == "ok":
        dl, ml, du, mu, granted, wr, wt = (int(_s(x)) for x in res[1:8])
        fr = max([du / daily if daily else (1.0 if daily == 0 else 0.0),
                  mu / monthly if monthly else (1.0 if monthly == 0 else 0.0)])
        left = min([x for x, lim in ((dl, daily), (ml, monthly)) if lim is not None], default=None)
        return Admission(True, "ok", left_units=left, used_fraction=fr,
                         granted=granted if granted >= 0 else None, window_requests=wr, window_tokens=wt)
    if kind == "dup":
        g = int(_s(res[2])) if len(res) > 2 else -1
        return Admission(True, "dup", _s(res[1]), granted=g if g >= 0 else None)
    if kind == "rate":
        return Admission(False, "rate", _s(res[1]), retry_after_s=int(res[2]) / 1000)
    return Admission(False, "budget", _s(res[1]), left_units=max(0, int(_s(res[2]))),
                     retry_after_s=float(res[3]))


def parse_settled(res: list[Any]) -> str:
    return _s(res[1]) if _s(res[0]) == "settled" else "dup"


def parse_status(r: list[Any]) -> dict[str, Any]:
    return {"day": _s(r[0]), "month": _s(r[1]), "spent_day": int(_s(r[2])), "reserved_day": int(_s(r[3])),
            "spent_month": int(_s(r[4])), "reserved_month": int(_s(r[5]))}


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)
