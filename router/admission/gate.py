"""The gate between decision and dispatch: per-instance prefill windows and the queue (issue #14).
Sans-I/O: both drivers run it (the live router awaits the Redis windows; replay the in-memory twin).

Algorithm, per request (after the decision and the budget admission):
  window    the chosen instance's window (router/admission/window_store.py) is asked for the request's
            uncached prefill tokens. Granted: dispatch now. Refused: the store says when the window opens
            again; the instance is noted closed until then (`closed`), and the request is decided again
            with every closed instance's predicted TTFT raised by its wait (its pending tokens grow by
            wait x prefill rate): queue time is part of the TTFT the predictor and the SLO see, so the
            money objective weighs a cheap instance that opens in 20 ms against a dearer one open now.
            If the new choice is open and grants: dispatch now. Else the request waits in the queue of the
            chosen tier (router/admission/queue.py: class priority, fair shares by tenant weight, bounded,
            shedding the lowest class first).
  release   when a tier's earliest closed window opens (`next_wake`), its queue is walked in order: the
            first waiting request is decided again (late binding: the instance that freed up first, or
            another tier where its SLO needs that) and, if its choice is open and grants, released; the
            first that can't go stops the walk until the next opening.
  room      where a tier states `max_num_seqs` (vLLM's --max-num-seqs), a request (any class) goes to an
            instance only while fewer than that many requests are in flight there (every replica's, through
            load sync, plus this walk's releases); else it waits in the queue like a closed window's. Under
            overload the backlog then waits here, in fair order, not in the engine's first-come queue, and
            another tenant's request overtakes a flood's. Off where the tier leaves it unset (BENCHMARKS.md:
            it costs interactive attainment in bursts).
  deadline  a request waits at most its class's `max_queue_ms` (default half its TTFT target); then it is
            dispatched as last decided (`bypass`; where that instance has no room, to the tier's instance
            with the least in flight): a window never costs a request its SLO by itself;
            unless its tenant sends more than its weighted share of its class on the tier
            (router/admission/share.py), when it is shed (429, Retry-After): the flood absorbs the refusals.
  shed      a full queue sheds its lowest-class, last-in-fair-order request (429 if it is the newcomer's
            own class that overflowed, else 503; Retry-After either way).
  classes   a window admits a request while its bucket is above its class's floor: the policy's top
            class (highest priority) may overdraw it by `overdraw_ms` of the instance's prefill work (the
            engine serves it at once; the debt holds back the classes below; past it, the engine's queue
            is already long enough that queueing in the router costs nothing, and the router's queue
            orders the class's tenants fairly), every other class needs a positive bucket,
            and a gathered batch the same plus an instance under the utilization threshold. So the
            top class's traffic is shaped by nothing but its own SLO, and documents and batch work yield
            to it: they are admitted only as far as its debt on the instance has cleared.
  batch     a `batchable` class's request is not windowed on arrival: it is gathered with the requests
            that share its prefix (router/admission/gather.py), and the closed group waits in the queue as
            one batch entry, released whole to one instance once that instance is under `batch_kv` and
            nothing else waits (the queue never releases batch while another class waits).
Window size, per instance, from what the router sees of it:
    rate   = the tier's prefill rate x kv: the policy's `prefill_tokens_per_s` (what the engine prefills per
             second at full batch: an operator's figure, e.g. from bench/gpu_calibrate.py), else the rate
             the router learned from idle instances' first tokens (per request, so lower: a prefill
             shares its steps with decodes), kv = 1 up to `kv_high` KV-cache
             use, then falling linearly to 0.1 at a full cache (fewer new prefills where preemption looms);
    window = twice the tier's observed time per output token (about two engine steps), clamped to
             [min_window_ms, window_ms]; window_ms where the step time is unknown;
    burst  = rate x window.
  An instance whose prefill rate is unknown has no window (its requests go at once).
Parameters: policies/admission_spec.py (`admission:` windows, window_ms, min_window_ms, kv_high,
max_queued, overdraw_ms, batch_*; per class max_queue_ms; per tenant weight).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec

from policies.admission_spec import AdmissionSpec
from policies.types import Candidate, RoutingDecision
from router.admission.gather import Gatherer, Group, group_key
from router.admission.queue import AdmissionQueue, Waiting
from router.admission.share import Shares
from router.admission.ticket import Ticket
from router.admission.window_store import Grant
from router.lifecycle.core import Lifecycle, Pending
from router.replay.window_twin import MemoryWindowStore

DEFAULT_MAX_QUEUE_S = 0.5      # a class with neither max_queue_ms nor a TTFT target
Take = Callable[[str, str, int, float, float, float], Awaitable[Grant | None]]


@dataclass
class Gate:
    spec: AdmissionSpec
    take_shared: Take | None           # the Redis windows (None: local only)
    local: MemoryWindowStore           # this replica's windows: the fallback, and replay's only store
    on_event: Callable[[str, str, float], None] = lambda kind, tier, value: None
    notify: Callable[[Ticket], None] = lambda t: None    # a queued ticket was shed (its driver answers it)
    queues: dict[str, AdmissionQueue[Ticket]] = field(default_factory=dict)
    closed: dict[str, float] = field(default_factory=dict)   # "tier/instance" -> opens at (driver clock)
    retry_at: dict[str, float] = field(default_factory=dict)  # tier -> no walk before (nothing to bind to)
    gather: Gatherer[Ticket] = field(default_factory=Gatherer)
    dirty: set[str] = field(default_factory=set)              # tiers a batch was queued into since their walk
    top: int = 2 ** 31                # the policy's highest class priority (may overdraw its windows)
    capacity: dict[str, float] = field(default_factory=dict)   # tier -> its policy's prefill_tokens_per_s
    top_opens: dict[str, float] = field(default_factory=dict)  # "tier/instance" -> the top class may go again
    shares: Shares = field(default_factory=Shares)             # tenants' arrival shares, for the deadline
    seqs: dict[str, int] = field(default_factory=dict)         # tier -> its policy's max_num_seqs
    given: dict[str, int] = field(default_factory=dict)  # this walk's releases, not yet in the candidates'
    #                                                       in_flight (the driver dispatches them after the walk)

    def tiers(self) -> set[str]:
        """Tiers with requests waiting: queued, or gathering into a batch."""
        return {t for t, q in self.queues.items() if len(q)} | self.gather.tiers()

    def sizing(self, c: Candidate) -> tuple[float, float] | None:
        """(rate tokens/s, burst tokens) of the candidate's window; None: no window (rate unknown)."""
        tps = self.capacity.get(c.tier) or c.prefill_tps
        if tps <= 0:
            return None
        s = self.spec
        kv = 1.0
        if c.kv_usage > s.kv_high:
            kv = max(0.1, 1.0 - 0.9 * (c.kv_usage - s.kv_high) / (1.0 - s.kv_high))
        rate = tps * kv
        window_ms = s.window_ms if c.tpot_s <= 0 else min(s.window_ms, max(s.min_window_ms, 2000.0 * c.tpot_s))
        return rate, rate * window_ms / 1000.0

    def level(self, t: Ticket) -> float:
        """The window floor of `t`'s class, in seconds of the instance's prefill (module doc): the top class
        may overdraw, every other class needs a positive window (a gathered batch also an instance under
        `batch_kv` with nothing waiting in its engine: `_under_threshold`)."""
        if t.members or t.batch:
            return 0.0
        return -self.spec.overdraw_ms / 1000.0 if t.priority >= self.top else 0.0

    async def take(self, c: Candidate, cost: int, now: float, level: float = 0.0) -> Grant:
        """Ask the candidate's window for `cost` tokens while it is above `level` seconds of its prefill
        rate (negative: debt; shared store, this replica's windows if it fails)."""
        sized = self.sizing(c)
        if sized is None:
            return Grant(True, 0.0, 0.0)
        rate, burst = sized
        floor = level * rate
        g = await self.take_shared(c.tier, c.instance_id, cost, rate, burst, floor) if self.take_shared else None
        store = "shared"
        if g is None:
            g = self.local.take_now(c.tier, c.instance_id, cost, rate, burst, floor)
            store = "local"
        if g.ok:
            self.closed.pop(c.key, None)
            self.on_event("window_tokens", f"{c.tier}|{store}", float(cost))
        else:
            if g.tokens <= 0:                # closed to every class but one allowed to overdraw: until positive,
                self.closed[c.key] = now + (round(-g.tokens * 1000) // max(1, int(rate)) + 1) / 1000  # as the store
            if level < 0:                    # the top class may go again once the debt is back above its floor
                self.top_opens[c.key] = now + g.wait_s
        self.on_event("window_budget", c.key, burst)
        return g

    def adjust(self, now: float) -> Callable[[list[Candidate]], list[Candidate]]:
        """Candidates with the wait ahead of a new request in their queue of pending tokens: a closed
        window's time to open (at the prefill rate), and the tokens queued for the tier, spread over its
        instances."""
        closed = {k: t - now for k, t in self.closed.items() if t > now}
        queued = {tier: q.tokens for tier, q in self.queues.items() if q.tokens}

        def f(cands: list[Candidate]) -> list[Candidate]:
            if not closed and not queued:
                return cands
            per_tier: dict[str, int] = {}
            for c in cands:
                per_tier[c.tier] = per_tier.get(c.tier, 0) + 1
            out = []
            for c in cands:
                extra = queued.get(c.tier, 0) // per_tier[c.tier]
                if c.key in closed and c.prefill_tps > 0:
                    extra += int(closed[c.key] * c.prefill_tps)
                out.append(msgspec.structs.replace(c, pending_tokens=c.pending_tokens + extra) if extra else c)
            return out
        return f

    def is_open(self, key: str, now: float) -> bool:
        return self.closed.get(key, 0.0) <= now

    def has_room(self, c: Candidate) -> bool:
        """Whether `c` takes another request now (module doc: room)."""
        seqs = self.seqs.get(c.tier)
        return seqs is None or c.in_flight + self.given.get(c.key, 0) < seqs

    def usable(self, c: Candidate, now: float) -> bool:
        return self.is_open(c.key, now) and self.has_room(c)

    def prefer_open(self, d: RoutingDecision, now: float) -> RoutingDecision:
        """Among candidates ranked equal to the choice (ties), an open window with room before the rest."""
        c = d.chosen
        if c is None or self.usable(c, now):
            return d
        best = d.totals.get(c.key)
        for alt in d.ranked:
            if self.usable(alt, now) and d.totals.get(alt.key) == best:
                return msgspec.structs.replace(d, chosen=alt, ranked=[alt, *(x for x in d.ranked if x is not alt)])
        return d

    async def admit(self, core: Lifecycle, p: Pending, now: float) -> tuple[Ticket, bool]:
        """`p`'s ticket (decided again by `core` among the tiers its admission reserved; its class's
        priority, `max_queue_ms` and batchability; its tenant's weight), entered: (ticket, go now)."""
        d = p.decision
        assert d is not None and d.chosen is not None
        pol, counts, tiers = p.view.policy, p.counts, p.reserved or None
        self.top = max((x.priority for x in pol.slo_classes.values()), default=0)
        self.capacity = {n: t.prefill_tokens_per_s for n, t in pol.tiers.items() if t.prefill_tokens_per_s}
        self.seqs = {n: t.max_num_seqs for n, t in pol.tiers.items() if t.max_num_seqs}
        cls = pol.slo_classes.get(p.rreq.slo_class)
        max_q = (cls.max_queue_ms / 1000 if cls is not None and cls.max_queue_ms is not None else
                 p.rreq.ttft_target_s / 2 if p.rreq.ttft_target_s else DEFAULT_MAX_QUEUE_S)

        def cost_of(c: Candidate) -> int:
            return max(0, counts.get(c.tier, 0) - c.cached_tokens)

        t = Ticket(p.rid, d.chosen.tier, 0, now, now + max_q, lambda adj: core.evaluate(p, adj, tiers), d,
                   cost_of=cost_of, slo_class=p.rreq.slo_class)
        priority, weight = cls.priority if cls else 0, pol.tenants[p.tenant].weight
        if cls is not None and cls.batchable:
            ph = t.prefix = p.hashes.get(d.chosen.tier)
            self.gather_batch(t, group_key(ph.hashes if ph is not None else []), now, priority, weight, p.tenant)
            return t, False
        self.shares.arrive((t.tier, priority), p.tenant, weight, now)
        go = await self.enter(t, now, priority, weight, False, p.tenant)
        return t, go

    def gather_batch(self, t: Ticket, key: bytes, now: float, priority: int, weight: float, tenant: str) -> None:
        """A batch request joins its prefix's gathering group (router/admission/gather.py); a group that
        closes now is queued."""
        chosen = t.decision.chosen
        assert chosen is not None
        t.tier, t.cost = chosen.tier, t.cost_of(chosen)
        a = self.spec
        g = self.gather
        g.batch_size, g.max_wait_s, g.min_wait_s = a.batch_size, a.batch_max_wait_ms / 1000, a.min_window_ms / 1000
        t.priority, t.weight, t.tenant = priority, weight, tenant
        closed = g.add(t, t.tier, key, now)
        if closed is not None:
            self._queue_group(closed, now)

    def _queue_group(self, g: Group[Ticket], now: float) -> None:
        """A closed gathering group enters its tier's queue as one batch entry (its first member's decision,
        the members' summed prefill cost on a candidate)."""
        lead = g.members[0]
        members = list(g.members)
        shared = [(m, lead.prefix.shared_tokens(m.prefix) if lead.prefix else 0) for m in members[1:]]

        def cost_of(c: Candidate) -> int:
            """The batch's prefill on `c`: the first member's, then each other's beyond what it shares with
            the first (scheduled together on one instance, the shared blocks are prefilled once)."""
            return lead.cost_of(c) + sum(max(0, m.cost_of(c) - max(0, s - c.cached_tokens)) for m, s in shared)
        chosen = lead.decision.chosen
        gt = Ticket("batch:" + lead.rid, lead.tier, cost_of(chosen) if chosen else lead.cost, now, lead.deadline,
                    lead.redecide, lead.decision, cost_of=cost_of, slo_class=lead.slo_class, members=members,
                    batch=True, priority=lead.priority, weight=lead.weight, tenant=lead.tenant)
        for m in members:
            m.parent = gt
        self.dirty.add(gt.tier)          # not tried yet: walk the queue at once
        self._push(gt, now)

    async def enter(self, t: Ticket, now: float, priority: int, weight: float, batch: bool, tenant: str) -> bool:
        """True: go now (`t.decision` is what to send). False: `t` waits (or was shed: `t.outcome`)."""
        cost_of = t.cost_of
        chosen = t.decision.chosen
        assert chosen is not None
        t.priority, t.weight, t.tenant, t.batch = priority, weight, tenant, batch
        level = self.level(t)
        if self.has_room(chosen) and (await self.take(chosen, cost_of(chosen), now, level)).ok:
            return True
        again = t.redecide(self.adjust(now))
        if again is not None and again.chosen is not None:
            t.decision = again = self.prefer_open(again, now)
            alt = again.chosen
            if alt is not None and self.has_room(alt) and (level < 0 or self.is_open(alt.key, now)) and \
                    (await self.take(alt, cost_of(alt), now, level)).ok:
                return True
        last = t.decision.chosen
        assert last is not None
        t.tier, t.cost = last.tier, cost_of(last)
        self._push(t, now)
        return False

    def _push(self, t: Ticket, now: float) -> None:
        """Queue `t` (its class's priority, its tenant's weight, its cost); the queue's victim, if full, is
        shed (a gathered batch: each of its members)."""
        q = self.queues.setdefault(t.tier, AdmissionQueue(self.spec.max_queued))
        t.waiting = w = Waiting(t, t.tenant, t.priority, max(t.cost, 1), t.weight, t.batch, now)
        shed = q.push(w)
        if shed is None:
            return
        victim = shed.payload
        status = 429 if shed.priority == w.priority and shed.batch == w.batch else 503
        reason = "queue_full" if status == 429 else "overloaded"
        self.on_event("shed", t.tier, 1.0)
        for v in victim.members or [victim]:
            v.outcome, v.shed_status, v.shed_reason = "shed", status, reason
            if v is not t:
                self.notify(v)
        victim.outcome, victim.shed_status, victim.shed_reason = "shed", status, reason

    def leave(self, t: Ticket, outcome: str) -> None:
        """`t` stops waiting: its deadline passed (bypassed) or its client went away (left)."""
        if t.outcome != "":
            return
        if self.gather.remove(t):
            t.outcome = outcome
            return
        g = t.parent
        if g is not None:               # a member of a queued batch: the batch goes on without it
            g.members = [m for m in g.members if m is not t]
            t.outcome, t.parent = outcome, None
            if not g.members and g.waiting is not None:
                self.queues[g.tier].remove(g.waiting)
                g.outcome = outcome
            return
        if t.waiting is not None:
            self.queues[t.tier].remove(t.waiting)
            t.outcome = outcome

    def expire(self, t: Ticket, now: float) -> None:
        """`t`'s deadline passed: bypassed, or shed when its tenant is over its share (module doc)."""
        if t.outcome != "":
            return
        if not t.batch and t.parent is None and self.shares.over((t.tier, t.priority), t.tenant, now):
            self.leave(t, "shed")
            t.shed_status, t.shed_reason = 429, "over_share"
            self.on_event("shed", t.tier, 1.0)
            return
        self.leave(t, "bypassed")
        c = t.decision.chosen
        if c is not None and not t.members and not self.has_room(c):
            self._spread(t, c, now)

    def _spread(self, t: Ticket, c: Candidate, now: float) -> None:
        """A bypassed request whose instance has no room goes to the instance of the same tier with the
        least in flight (decided again there): a burst that outwaited its queue is spread over the tier,
        not sent whole to the one instance every member had been decided to."""
        again = t.redecide(self.adjust(now))
        if again is None:
            return
        same = [x for x in again.ranked if x.tier == c.tier]
        if not same:
            return
        pick = min(same, key=lambda x: (x.in_flight, x.pending_tokens))
        t.decision = msgspec.structs.replace(again, chosen=pick,
                                             ranked=[pick, *(x for x in again.ranked if x is not pick)])

    def next_wake(self, tier: str, now: float) -> float | None:
        """When the tier's queue should be walked again: its earliest closed window's opening (now, if one
        has opened since), else after the shortest window."""
        closes = self.gather.next_close(tier)
        q = self.queues.get(tier)
        if q is None or not len(q):
            return closes
        prefix = f"{tier}/"
        opens = [t for k, t in self.closed.items() if k.startswith(prefix)]
        head = q.peek()
        if head is not None and self.level(head.payload) < 0:   # the top class waits: its own floor's opening
            opens += [t for k, t in self.top_opens.items() if k.startswith(prefix)]
        at = now if tier in self.dirty else min(opens) if opens else now + self.spec.min_window_ms / 1000.0
        at = max(at, self.retry_at.get(tier, at))
        return at if closes is None else min(at, closes)

    async def release(self, tier: str, now: float) -> list[Ticket]:
        """Walk the tier's queue (module doc): the tickets released now, their decisions updated."""
        for g in self.gather.due(tier, now):
            self._queue_group(g, now)
        self.dirty.discard(tier)
        q = self.queues.get(tier)
        out: list[Ticket] = []
        self.given = {}
        prefix = f"{tier}/"
        for k in [k for k, at in self.closed.items() if at <= now and k.startswith(prefix)]:
            del self.closed[k]           # open again: only windows still closed set the next wake
        for k in [k for k, at in self.top_opens.items() if at <= now and k.startswith(prefix)]:
            del self.top_opens[k]
        while q is not None and len(q):
            w = q.peek()
            if w is None:
                break                    # only batch waits, behind another class
            t = w.payload
            adj = self.adjust(now)
            again = t.redecide(adj)
            if again is not None:
                again = self.prefer_open(again, now)
            level = self.level(t)
            if again is not None and again.chosen is not None and t.members:
                again = self._batch_target(again, now)   # a batch: the best instance open and under the threshold
            c = again.chosen if again is not None else None
            full = c is not None and not t.members and not self.has_room(c)
            if again is None or c is None or full or (level >= 0 and not self.is_open(c.key, now)):
                if c is None or full or t.members:    # nothing to bind to now: look again shortly
                    self.retry_at[tier] = now + self.spec.min_window_ms / 1000.0
                break
            if not (await self.take(c, t.cost_of(c), now, level)).ok:
                break
            self.given[c.key] = self.given.get(c.key, 0) + max(1, len(t.members))
            q.release(w)
            t.decision, t.outcome = again, "released"
            out.extend(self._pinned(t, c, adj) if t.members else [t])
        self.given = {}
        return out

    def _batch_target(self, d: RoutingDecision, now: float) -> RoutingDecision | None:
        """`d` with its best-ranked candidate whose window is open and which is under the utilization
        threshold chosen; None when there is none."""
        c = next((x for x in d.ranked if self.is_open(x.key, now) and self._under_threshold(x)), None)
        if c is None:
            return None
        if c is d.chosen:
            return d
        return msgspec.structs.replace(d, chosen=c, ranked=[c, *(x for x in d.ranked if x is not c)])

    def _under_threshold(self, c: Candidate) -> bool:
        """A gathered batch goes to `c` only while `c` is under the utilization threshold (module doc)."""
        return c.kv_usage < self.spec.batch_kv and c.waiting <= 0

    @staticmethod
    def _pinned(g: Ticket, c: Candidate, adj: Callable[[list[Candidate]], list[Candidate]]) -> list[Ticket]:
        """A released batch's members, each decided again among `c` alone (the group's instance; its own
        choice where `c` can't serve it, e.g. its context does not fit)."""
        def only(cands: list[Candidate]) -> list[Candidate]:
            return [x for x in adj(cands) if x.key == c.key]
        for m in g.members:
            d = m.redecide(only)
            if d is None or d.chosen is None:
                d = m.redecide(adj)
            if d is not None and d.chosen is not None:
                m.decision = d
            m.outcome, m.parent = "released", None
        return list(g.members)

