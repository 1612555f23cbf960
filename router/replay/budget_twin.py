"""The in-memory twin of router/budget_store.py `BudgetStore`: the Lua scripts of router/budget_lua.py
written again over dicts, with the same replies, parsed by the same functions (`parse_admission`,
`parse_settled`, `parse_status`).

Per tenant: `b` (spent and reserved per UTC day and month), `w` (the sliding minute's requests and
tokens, expiring 3 minutes after the last admission), `q` (one entry per request id, expiring `keep_s`
after its last write: what makes admission and settlement idempotent), `open` (reservations by expiry,
ordered by (score, id) as the ZSET, in a heap with lazy deletion), the usage ledger (`ledger_maxlen`
records, trimmed exactly where Redis trims approximately, `MAXLEN ~`) and the hourly aggregates per UTC
day (expiring `retention_days` after their last write). Keys expire on the injected clock, which is
also the scripts' `now` (Redis expires keys on its own time; with the default clock both are the wall
clock). Arithmetic follows Lua 5.1 where it matters: windows are floats, `fmt` rounds half to even as C's
`%.0f` does, and counters are exact integers (below 2^53, as in Lua's doubles).
Not modelled: Redis' own failures and timeouts (the twin never fails), and settling a `blocked` id,
which errors in Lua and raises ValueError here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from router.budget_store import (
    AGG_FIELDS,
    GPU_SOURCES,
    Admission,
    FlexBudget,
    Usage,
    parse_admission,
    parse_settled,
    parse_status,
)


def fmt(x: float) -> str:
    """Lua's `fmt`: '%.0f', and '0' for 0."""
    return "0" if x == 0 else f"{x:.0f}"


def _civil(days: int) -> tuple[int, int, int]:
    """Days since 1970-01-01 -> (y, m, d), proleptic Gregorian (budget_lua's `civil`)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    y = yoe + era * 400
    return (y + 1 if m <= 2 else y), m, d


def _days_from_civil(y: int, m: int, d: int) -> int:
    y = y - 1 if m <= 2 else y
    era = y // 400
    yoe = y - era * 400
    mp = m - 3 if m > 2 else m + 9
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def periods(ms: int) -> tuple[str, str, str, int, int]:
    """(day id, month id, hour id, seconds to the day's end, seconds to the month's end)."""
    sec = ms // 1000
    days = sec // 86400
    y, m, d = _civil(days)
    day = f"{y:04d}{m:02d}{d:02d}"
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    return day, f"{y:04d}{m:02d}", day + f"{(sec % 86400) // 3600:02d}", 86400 - sec % 86400, \
        _days_from_civil(ny, nm, 1) * 86400 - sec


@dataclasses.dataclass
class _Expiring:
    data: dict[str, Any]
    expires_at: float = math.inf


@dataclasses.dataclass
class _Tenant:
    b: dict[str, int] = dataclasses.field(default_factory=dict)
    w: _Expiring = dataclasses.field(default_factory=lambda: _Expiring({}))
    q: dict[str, _Expiring] = dataclasses.field(default_factory=dict)
    q_expiry: deque[tuple[float, str]] = dataclasses.field(default_factory=deque)  # (expires_at, id), in order
    open: dict[str, int] = dataclasses.field(default_factory=dict)
    open_heap: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    usage: deque[tuple[str, dict[str, str]]] = dataclasses.field(default_factory=deque)
    last_id: tuple[int, int] = (0, -1)
    agg: dict[str, _Expiring] = dataclasses.field(default_factory=dict)


class MemoryBudgetStore:
    def __init__(self, *, clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 keep_s: float = 7 * 86400, ledger_maxlen: int = 1_000_000, retention_days: int = 400) -> None:
        self.clock_ms = clock_ms
        self.keep_ms = int(keep_s * 1000)
        self.ledger_maxlen = ledger_maxlen
        self.retention_days = retention_days
        self._t: dict[str, _Tenant] = {}

    # --- keys ---------------------------------------------------------------------------------
    def _tenant(self, tenant: str) -> _Tenant:
        t = self._t.get(tenant)
        if t is None:
            t = self._t[tenant] = _Tenant()
        return t

    def _q(self, t: _Tenant, rid: str, now: int) -> dict[str, Any] | None:
        while t.q_expiry and t.q_expiry[0][0] < now:   # drop expired ids (amortized)
            _at, old = t.q_expiry.popleft()
            e = t.q.get(old)
            if e is not None and e.expires_at < now:
                del t.q[old]
        e = t.q.get(rid)
        return None if e is None or e.expires_at < now else e.data

    def _q_write(self, t: _Tenant, rid: str, now: int, fields: dict[str, Any]) -> None:
        e = t.q.get(rid)
        if e is None or e.expires_at < now:
            e = t.q[rid] = _Expiring({})
        e.data.update(fields)
        e.expires_at = now + self.keep_ms    # PEXPIRE
        t.q_expiry.append((e.expires_at, rid))

    @staticmethod
    def _w(t: _Tenant, now: int) -> dict[str, Any]:
        if t.w.expires_at < now:
            t.w = _Expiring({})
        return t.w.data

    def _release_expired(self, t: _Tenant, now: int, limit: int) -> int:
        """Reservations past their TTL, lowest (score, id) first, at most `limit` (as ZRANGEBYSCORE LIMIT)."""
        ids: list[str] = []
        heap = t.open_heap
        while heap and heap[0][0] <= now and len(ids) < limit:
            s, rid = heapq.heappop(heap)
            if t.open.get(rid) == s:     # else stale: settled, released, or re-added under another score
                ids.append(rid)
        for rid in ids:
            q = self._q(t, rid, now)
            if q is not None and q.get("st") == "open":
                res = int(q.get("res", 0))
                t.b["rd:" + q["d"]] = t.b.get("rd:" + q["d"], 0) - res
                t.b["rm:" + q["m"]] = t.b.get("rm:" + q["m"], 0) - res
                q["st"] = "expired"
            del t.open[rid]
        return len(ids)

    # --- the scripts --------------------------------------------------------------------------
    async def admit(self, tenant: str, rid: str, *, rpm: int | None, tpm: int | None, tokens: int,
                    reserve: int, daily: int | None, monthly: int | None, ttl_s: float,
                    flex: FlexBudget | None = None) -> Admission:
        return parse_admission(self._admit(tenant, rid, rpm or 0, tpm or 0, tokens, reserve,
                                           -1 if daily is None else daily, -1 if monthly is None else monthly,
                                           int(ttl_s * 1000), flex or FlexBudget(0, 0, 0, 0)), daily, monthly)

    def _admit(self, tenant: str, rid: str, rpm: int, tpm: int, tokens: int, reserve: int, dlim: int, mlim: int,
               ttl_ms: int, f: FlexBudget) -> list[Any]:
        now = self.clock_ms()
        t = self._tenant(tenant)
        q = self._q(t, rid, now)
        if q is not None and "st" in q:
            return ["dup", q["st"], q.get("g", -1)]
        w = self._w(t, now)
        minute = now // 60000
        weight = 1 - (now % 60000) / 60000

        def window(kind: str) -> float:
            return float(w.get(f"{kind}:{minute}", 0)) + float(w.get(f"{kind}:{minute - 1}", 0)) * weight

        retry = 60000 - now % 60000
        if rpm > 0 and window("r") + 1 > rpm:
            return ["rate", "rpm", retry]
        if tpm > 0 and window("t") + tokens > tpm:
            return ["rate", "tpm", retry]
        self._release_expired(t, now, 100)
        day, mon, _, day_left_s, mon_left_s = periods(now)
        b = t.b
        dused = b.get("sd:" + day, 0) + b.get("rd:" + day, 0)
        mused = b.get("sm:" + mon, 0) + b.get("rm:" + mon, 0)
        granted = -1
        if f.least > 0:
            avail = reserve
            if dlim >= 0:
                avail = min(avail, dlim - dused)
            if mlim >= 0:
                avail = min(avail, mlim - mused)
            if avail < reserve:
                g = f.wanted
                if f.units_per_token > 0:
                    g = min(f.wanted, math.floor((avail - f.prompt_units) / f.units_per_token))
                if g >= f.least and f.prompt_units + g * f.units_per_token <= avail:
                    granted = g
                    reserve = f.prompt_units + g * f.units_per_token
                    tokens = max(tokens - (f.wanted - g), 0)
        if dlim >= 0 and dused + reserve > dlim:
            return ["budget", "daily", fmt(dlim - dused), day_left_s]
        if mlim >= 0 and mused + reserve > mlim:
            return ["budget", "monthly", fmt(mlim - mused), mon_left_s]
        w[f"r:{minute}"] = w.get(f"r:{minute}", 0) + 1
        w[f"t:{minute}"] = w.get(f"t:{minute}", 0) + tokens
        w.pop(f"r:{minute - 2}", None)
        w.pop(f"t:{minute - 2}", None)
        t.w.expires_at = now + 180000
        b["rd:" + day] = b.get("rd:" + day, 0) + reserve
        b["rm:" + mon] = b.get("rm:" + mon, 0) + reserve
        self._q_write(t, rid, now, {"st": "open", "res": reserve, "tok": tokens, "d": day, "m": mon, "min": minute,
                                     "g": granted})
        score = now + ttl_ms
        t.open[rid] = score
        heapq.heappush(t.open_heap, (score, rid))
        return ["ok", fmt(dlim - dused - reserve), fmt(mlim - mused - reserve), fmt(dused + reserve),
                fmt(mused + reserve), fmt(granted), fmt(math.ceil(window("r"))), fmt(math.ceil(window("t")))]

    async def settle(self, tenant: str, rid: str, usage: Usage) -> str:
        return parse_settled(self.settle_now(tenant, rid, usage))

    async def settle_many(self, items: Sequence[tuple[str, str, Usage]]) -> list[str | Exception]:
        out: list[str | Exception] = []
        for tenant, rid, usage in items:
            try:
                out.append(parse_settled(self.settle_now(tenant, rid, usage)))
            except Exception as exc:   # as a pipeline answers a script error: in the item's place
                out.append(exc)
        return out

    def settle_now(self, tenant: str, rid: str, usage: Usage) -> list[Any]:
        now = self.clock_ms()
        t = self._tenant(tenant)
        q = self._q(t, rid, now)
        st = q.get("st") if q is not None else None
        if st == "settled":
            return ["dup", "settled"]
        cost, tokens = usage.cost, usage.prompt + usage.completion
        how = st or "orphan"
        if st is not None:
            assert q is not None
            if "d" not in q:
                raise ValueError(f"settling {rid!r} in state {st!r}: it has no period (the script errors too)")
            day, mon, hour = q["d"], q["m"], periods(now)[2]
        else:   # admitted without a reservation: bill at the request's own time
            day, mon, hour = periods(usage.at_ms)[:3]
        b = t.b
        if st == "open":
            assert q is not None
            res = int(q["res"])
            b["rd:" + day] = b.get("rd:" + day, 0) - res
            b["rm:" + mon] = b.get("rm:" + mon, 0) - res
            key = f"t:{q['min']}"
            w = self._w(t, now)
            if key in w:
                w[key] = w[key] + tokens - int(q["tok"])
            t.open.pop(rid, None)
        b["sd:" + day] = b.get("sd:" + day, 0) + cost
        b["sm:" + mon] = b.get("sm:" + mon, 0) + cost
        self._q_write(t, rid, now, {"st": "settled", "cost": cost})
        self._ledger_add(t, now, rid, usage, how)
        self._aggregate(t, now, hour, usage)
        return ["settled", how]

    def _ledger_add(self, t: _Tenant, now: int, rid: str, usage: Usage, how: str) -> None:
        if self.ledger_maxlen <= 0:
            return
        ms, seq = t.last_id
        t.last_id = (now, 0) if now > ms else (ms, seq + 1)
        f = usage.fields()
        rec = {"id": rid, "cost": str(usage.cost), "at": str(usage.at_ms), "how": how}
        rec.update(zip(f[::2], f[1::2], strict=True))
        t.usage.append((f"{t.last_id[0]}-{t.last_id[1]}", rec))
        while len(t.usage) > self.ledger_maxlen:
            t.usage.popleft()

    def _aggregate(self, t: _Tenant, now: int, hour: str, usage: Usage) -> None:
        day = hour[:8]
        e = t.agg.get(day)
        if e is None or e.expires_at < now:
            e = t.agg[day] = _Expiring({})
        base = f"{hour}|{usage.tier}|"
        h = e.data
        f = usage.fields()
        adds = [("requests", 1), ("cost", usage.cost)]
        for k, raw in zip(f[::2], f[1::2], strict=True):
            if k in AGG_FIELDS or k.startswith(("slo_met@", "slo_n@")):
                adds.append((k, int(float(raw or 0))))
            elif k == "gpu_src" and raw in GPU_SOURCES:
                adds.append(("gpu_src_" + raw, 1))
        for k, v in adds:
            h[base + k] = h.get(base + k, 0) + v
        e.expires_at = now + self.retention_days * 86_400_000

    async def release(self, tenant: str, rid: str) -> str:
        now = self.clock_ms()
        t = self._tenant(tenant)
        q = self._q(t, rid, now)
        st = q.get("st") if q is not None else None
        if st == "open":
            assert q is not None
            res = int(q["res"])
            t.b["rd:" + q["d"]] = t.b.get("rd:" + q["d"], 0) - res
            t.b["rm:" + q["m"]] = t.b.get("rm:" + q["m"], 0) - res
            self._q_write(t, rid, now, {"st": "released"})
            t.open.pop(rid, None)
            return "released"
        if st is None:
            self._q_write(t, rid, now, {"st": "released"})
            return "blocked"
        return str(st)

    async def sweep(self, tenant: str, limit: int = 500) -> int:
        return self._release_expired(self._tenant(tenant), self.clock_ms(), limit)

    async def status(self, tenant: str) -> dict[str, Any]:
        now = self.clock_ms()
        t = self._tenant(tenant)
        self._release_expired(t, now, 100)
        day, mon = periods(now)[:2]
        b = t.b
        return parse_status([day, mon, fmt(b.get("sd:" + day, 0)), fmt(b.get("rd:" + day, 0)),
                             fmt(b.get("sm:" + mon, 0)), fmt(b.get("rm:" + mon, 0))])

    async def aggregates(self, tenant: str, days: int = 400, today: dt.date | None = None) -> dict[str, int]:
        end = today or dt.datetime.now(dt.UTC).date()
        now = self.clock_ms()
        t = self._tenant(tenant)
        out: dict[str, int] = {}
        for k in range(days + 1):
            e = t.agg.get(f"{end + dt.timedelta(days=1 - k):%Y%m%d}")
            if e is None or e.expires_at < now:
                continue
            for key, v in e.data.items():
                out[key] = out.get(key, 0) + v
        return out

    def all_aggregates(self) -> dict[str, dict[str, int]]:
        """Every tenant's hourly sums over every day kept (the replay's bill per tenant)."""
        out: dict[str, dict[str, int]] = {}
        for tenant, t in self._t.items():
            sums = out.setdefault(tenant, {})
            for day in sorted(t.agg):
                for key, v in t.agg[day].data.items():
                    sums[key] = sums.get(key, 0) + v
        return out

    async def ledger(self, tenant: str, count: int = 1000, after: str = "-") -> list[tuple[str, dict[str, str]]]:
        rows = self._tenant(tenant).usage
        if after != "-":
            ms, _, seq = after.partition("-")
            lo = (int(ms), int(seq or 0))
            picked = [r for r in rows if _id(r[0]) >= lo]
        else:
            picked = list(rows)
        return [(i, dict(f)) for i, f in picked[:count]]


def _id(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)
