"""What the lifecycle core needs from the world, as protocols (the live driver's classes and the replay
driver's in-memory twins both satisfy them).

* `AffinityIndex`: the shared prefix-affinity index (router/affinity_store.py `AffinityStore` over Redis;
  router/replay/affinity_twin.py `MemoryAffinityStore`).
* `BudgetLedger`: per-tenant admission, settlement and the usage ledger (router/budget_store.py
  `BudgetStore` over Redis; router/replay/budget_twin.py `MemoryBudgetStore`).
  The core reaches it through router/accounting.py `Accountant` (admission, settlement, journal).
* `View`: what the core reads of one policy (router/live_policy.py `PolicyView` has it; replay builds one
  without tokenizers).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from policies.engine import Profile
from policies.schema import Policy
from router.budget_store import Admission, FlexBudget, Usage

if TYPE_CHECKING:
    from router.affinity import Affinity


class AffinityIndex(Protocol):
    async def lookup(self, groups: Sequence[tuple[str, Sequence[str], Sequence[bytes]]],
                     ttl_s: float) -> dict[tuple[str, str], int] | None: ...

    async def record(self, tier: str, instance: str, hashes: Sequence[bytes], ttl_s: float,
                     capacity_blocks: int) -> int | None: ...

    def record_later(self, tier: str, instance: str, hashes: Sequence[bytes], ttl_s: float,
                     capacity_blocks: int) -> None: ...

    async def claim(self, tier: str, chosen: str, seen: Sequence[tuple[str, int]], hashes: Sequence[bytes],
                    ttl_s: float, capacity_blocks: int) -> tuple[str, int] | None: ...

    async def remove(self, tier: str, instance: str, hashes: Sequence[bytes]) -> None: ...

    async def clear(self, tier: str, instance: str) -> None: ...

    async def size(self, tier: str, instance: str) -> int: ...

    async def drain(self) -> None: ...


class BudgetLedger(Protocol):
    ledger_maxlen: int
    retention_days: int

    async def admit(self, tenant: str, rid: str, *, rpm: int | None, tpm: int | None, tokens: int,
                    reserve: int, daily: int | None, monthly: int | None, ttl_s: float,
                    flex: FlexBudget | None = None) -> Admission: ...

    async def settle(self, tenant: str, rid: str, usage: Usage) -> str: ...

    async def settle_many(self, items: Sequence[tuple[str, str, Usage]]) -> list[str | Exception]: ...

    async def release(self, tenant: str, rid: str) -> str: ...

    async def sweep(self, tenant: str, limit: int = 500) -> int: ...

    async def status(self, tenant: str) -> dict[str, Any]: ...

    async def aggregates(self, tenant: str, days: int = 400, today: dt.date | None = None) -> dict[str, int]: ...

    async def ledger(self, tenant: str, count: int = 1000,
                     after: str = "-") -> list[tuple[str, dict[str, str]]]: ...


class View(Protocol):
    """One policy and what is derived from it, as the core reads it."""

    @property
    def policy(self) -> Policy: ...

    @property
    def profiles(self) -> dict[str, Profile]: ...

    @property
    def baseline(self) -> str: ...

    @property
    def affinity(self) -> Affinity: ...

    @property
    def models(self) -> dict[str, str]: ...   # lower-cased model name or alias -> route (policies/models.py)


Clock = Callable[[], float]
