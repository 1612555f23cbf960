"""Policy v1 `admission:`: the router's windows and queues between decision and dispatch (issue #14).

    admission:
      windows: true          # per-instance prefill windows, shared by every replica (default false: every
                             # request is dispatched the moment it is decided, as without this section)
      window_ms: 50          # the longest window: an instance's burst = its prefill rate x this
      min_window_ms: 10      # the shortest (the window follows the tier's step time in between)
      kv_high: 0.9           # KV-cache use above which an instance's rate shrinks, linearly to 10% at full
      max_queued: 1024       # requests waiting for a window, per tier and replica (beyond: shed)
      coalesce: true         # claim a new prefix at decision time (concurrent requests follow it)
      overdraw_ms: 10000     # the top class may run an instance's window this far into debt (ms of the
                             # instance's prefill): the engine takes it at once and the classes below
                             # wait for the debt to clear; past it the top class queues too, fairly by
                             # tenant (0 holds it like the others). Smaller protects a tenant from
                             # another's flood of the top class, at some cost to the class's attainment
                             # under load (BENCHMARKS.md: windows by replay)
      batch_max_wait_ms: 100 # the longest a batchable class's gathering window stays open
      batch_size: 8          # a gathering window closes at once when it holds this many requests
      batch_kv: 0.8          # a gathered batch goes to its instance once its KV-cache use is below this
                             # and nothing waits in its engine (router/admission/gather.py)

Per SLO class: `priority` (higher first), `batchable` (held while any other class waits), `max_queue_ms`
(the longest a request of the class waits for a window before it is sent anyway; default half its
TTFT target) and `price_factor` (its tokens are billed at the tier's prices times this; default 1).
Per tenant: `weight` (its share among the tenants of one class while they wait, and at `max_queue_ms`: a
tenant over its weighted share of its class is then shed, 429, instead of sent: router/admission/share.py).
Per tier: `max_num_seqs` (the gate holds requests while an instance has this many in flight: gate.py, room).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from policies.schema import Policy


class AdmissionSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    windows: bool = False
    window_ms: float = 50.0
    min_window_ms: float = 10.0
    kv_high: float = 0.9
    max_queued: int = 1024
    coalesce: bool = True
    overdraw_ms: float = 10_000.0
    batch_max_wait_ms: float = 100.0
    batch_size: int = 8
    batch_kv: float = 0.8


def admission_errors(policy: Policy) -> list[tuple[str, str]]:
    a, errs = policy.admission, []
    if not 0 < a.min_window_ms <= a.window_ms <= 10_000:
        errs.append(("$.admission.window_ms", "need 0 < min_window_ms <= window_ms <= 10000"))
    if not 0 < a.kv_high < 1:
        errs.append(("$.admission.kv_high", "must be between 0 and 1"))
    if a.max_queued < 1:
        errs.append(("$.admission.max_queued", "must be >= 1"))
    if not 0 <= a.batch_max_wait_ms <= 60_000:
        errs.append(("$.admission.batch_max_wait_ms", "must be between 0 and 60000"))
    if not 0 <= a.overdraw_ms <= 600_000:
        errs.append(("$.admission.overdraw_ms", "must be between 0 and 600000"))
    if not 1 <= a.batch_size <= 4096:
        errs.append(("$.admission.batch_size", "must be between 1 and 4096"))
    if not 0 < a.batch_kv <= 1:
        errs.append(("$.admission.batch_kv", "must be in (0, 1]"))
    for name, cls in policy.slo_classes.items():
        if cls.max_queue_ms is not None and not 0 <= cls.max_queue_ms < float("inf"):
            errs.append((f"$.slo_classes.{name}.max_queue_ms", "must be >= 0"))
        if not 0 < cls.price_factor <= 1:
            errs.append((f"$.slo_classes.{name}.price_factor", "must be in (0, 1]"))
    for name, tenant in policy.tenants.items():
        if not 0 < tenant.weight < float("inf"):
            errs.append((f"$.tenants.{name}.weight", "must be > 0"))
    return errs
