"""A request waiting at the admission gate (router/admission/gate.py); the driver holds it and waits on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from policies.types import Candidate, RoutingDecision
from router.admission.queue import Waiting
from router.prefix_hash import PrefixHashes

Redecide = Callable[[Callable[[list[Candidate]], list[Candidate]]], RoutingDecision | None]


@dataclass(eq=False)
class Ticket:
    """A request waiting for a window; the driver holds it and waits on it."""

    rid: str
    tier: str
    cost: int                         # uncached prefill tokens of its current choice
    at: float                         # queued (the driver's clock)
    deadline: float                   # dispatched as decided by then (bypass)
    redecide: Redecide                # the core's decision over adjusted candidates
    decision: RoutingDecision
    cost_of: Callable[[Candidate], int] = lambda c: 0   # uncached prefill tokens on a candidate
    slo_class: str = ""
    waiting: Waiting[Ticket] | None = None
    outcome: str = ""                 # released | bypassed | shed | left
    shed_status: int = 503
    members: list[Ticket] = field(default_factory=list)   # a gathered batch: the requests it stands for
    batch: bool = False               # a batchable class's (held while another class waits)
    parent: Ticket | None = None      # a batch member: its group's ticket, once the group is queued
    prefix: PrefixHashes | None = None   # a batch request's sampled block hashes on its tier
    priority: int = 0                 # its class's
    weight: float = 1.0               # its tenant's share
    tenant: str = ""
    shed_reason: str = ""          # why it was shed (the error code): queue_full | overloaded | over_share
