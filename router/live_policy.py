"""Policy hot reload: a changed policy file is validated whole, then swapped in at once.

A `PolicyView` bundles a policy with everything derived from it (routing profiles, the key
index, tokenizers, affinity settings, the baseline tier, a version hash). Each request takes the
view once, at its start, so a reload never mixes two policies in one decision or one bill.

`PolicyReloader.check()` reads the file. When its bytes changed, it parses and validates it: the
schema (errors name the path and line), plugin parameters, each tier's tokenizer (loaded on the
tokenizer executor, off the event loop), and that every tier without listed instances is one
whose simulators were started with the process. Only then does it apply the new policy, in one
synchronous step: the gateway's view, the registry (instances matched by id and URL keep their
health, load and learned EWMAs), the accountant, and the KV-event subscribers of new instances.

Triggers: the watcher, `POST /admin/policy/reload` (which answers the result) and SIGHUP.
An invalid file changes nothing: the running policy stays, the error is logged and counted, and
the endpoint answers it. Parameters: `interval_s` (Settings.policy_reload_interval_s,
how often the file is checked; 0 turns the watcher off, the endpoint still works).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgspec

from backends.registry import Registry
from backends.tokenization import TokenizerCache
from policies.engine import Profile, build_profiles
from policies.models import model_names
from policies.schema import Policy, PolicyError, parse_policy
from router.accounting import baseline_tier
from router.affinity import Affinity
from router.affinity_store import AffinityStore
from router.auth import KeyIndex
from router.logs import get_logger
from router.prompts import PromptTokenizer


def policy_version(policy: Policy) -> str:
    return hashlib.sha256(msgspec.json.encode(policy)).hexdigest()[:16]


@dataclass(frozen=True)
class PolicyView:
    policy: Policy
    version: str
    profiles: dict[str, Profile]
    keys: KeyIndex
    prompts: PromptTokenizer
    affinity: Affinity
    baseline: str
    models: dict[str, str]      # lower-cased model name or alias -> route (policies/models.py)


def build_view(policy: Policy, registry: Registry, tokenizers: TokenizerCache, executor: ThreadPoolExecutor,
               affinity_store: AffinityStore | None) -> PolicyView:
    """Everything derived from `policy`; blocking (it may load tokenizers), so reloads run it off the loop."""
    return PolicyView(policy=policy, version=policy_version(policy), profiles=build_profiles(policy),
                      keys=KeyIndex(policy), prompts=PromptTokenizer(policy, tokenizers, executor),
                      affinity=Affinity(policy, registry, affinity_store, executor), baseline=baseline_tier(policy),
                      models=model_names(policy))


class ReloadResult(msgspec.Struct):
    result: str                 # reloaded | unchanged | invalid
    version: str                # the version running after this check
    error: str | None = None


class PolicyReloader:
    def __init__(self, path: Path, current: Callable[[], PolicyView], build: Callable[[Policy], PolicyView],
                 apply: Callable[[PolicyView], None], executor: Executor, *, interval_s: float = 2.0,
                 simulated: frozenset[str] = frozenset(), on_result: Callable[[str], None] = lambda r: None) -> None:
        self.path = path
        self.current = current
        self.build = build
        self.apply = apply
        self.executor = executor
        self.interval_s = interval_s
        self.simulated = simulated
        self.on_result = on_result
        self.seen: bytes | None = None      # the file's bytes last checked (valid or not)
        self.lock = asyncio.Lock()
        self.log = get_logger("tiergate.policy")

    def remember(self) -> None:
        """Mark the file as it is now as already running (at start)."""
        try:
            self.seen = self.path.read_bytes()
        except OSError:
            self.seen = None

    async def check(self, force: bool = False) -> ReloadResult:
        async with self.lock:
            loop = asyncio.get_running_loop()
            try:
                raw = await loop.run_in_executor(self.executor, self.path.read_bytes)
            except OSError as exc:
                return self._fail(f"{self.path}: cannot read: {exc.strerror}")
            if raw == self.seen and not force:
                return ReloadResult("unchanged", self.current().version)
            self.seen = raw
            try:
                policy = parse_policy(raw.decode("utf-8"), str(self.path))
                missing = [t for t, spec in policy.tiers.items() if not spec.instances and t not in self.simulated]
                if missing:
                    raise PolicyError(f"$.tiers.{missing[0]}.instances", "a tier without listed instances is "
                                      "simulated, and simulators start with the process: list its instances, "
                                      "or restart", None, str(self.path))
                view = await loop.run_in_executor(self.executor, self.build, policy)
            except (PolicyError, ValueError, OSError, UnicodeDecodeError) as exc:
                return self._fail(str(exc))
            if view.version == self.current().version:
                return ReloadResult("unchanged", view.version)
            old = self.current().version
            self.apply(view)
            self.on_result("reloaded")
            self.log.info("policy_reloaded", path=str(self.path), previous_version=old, policy_version=view.version,
                          tiers=len(view.policy.tiers), tenants=len(view.policy.tenants))
            return ReloadResult("reloaded", view.version)

    def _fail(self, error: str) -> ReloadResult:
        self.on_result("invalid")
        self.log.warning("policy_reload_rejected", path=str(self.path), error=error,
                         policy_version=self.current().version)
        return ReloadResult("invalid", self.current().version, error)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()
