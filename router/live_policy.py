"""Policy hot reload: a changed policy file is validated whole, then swapped in at once.

A `PolicyView` bundles a policy with everything derived from it (routing profiles, the key
index, tokenizers, affinity settings, the baseline tier, a version hash). Each request takes the
view once, at its start, so a reload never mixes two policies in one decision or one bill.

`PolicyReloader.check()` reads the file (policies/yaml_loader.read_policy_text: the size cap is
checked before reading past it). When its text changed, it parses and validates it: the strict
YAML loader (no anchors or aliases, so no alias bomb is ever expanded), the schema (errors name the
path and line), plugin parameters, each tier's tokenizer, and that every tier without listed
instances is one whose simulators were started with the process. Reading, parsing, validating and
building the view run off the event loop, so a large file (10,000 tenants) never stalls requests or
/health: reading on the executor, parsing and validating in a short-lived child process
(router/policy_worker.py says why a thread is not enough), decoding its result and building the view
(profiles, key index, tokenizers) on the executor. Only then does it apply the new
policy, on the loop, in one synchronous step: the gateway's view, the registry (instances matched
by id and URL keep their health, load and learned EWMAs), the accountant, and the KV-event
subscribers of new instances.

The file's state is remembered with its text: while the file stays invalid, every check (the
endpoint's included) answers `invalid` with the same error, counted and logged once per distinct
refusal, never "unchanged".

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
from policies.schema import Policy, PolicyError
from policies.yaml_loader import read_policy_text
from router.accounting import baseline_tier
from router.affinity import Affinity
from router.affinity_store import AffinityStore
from router.auth import KeyIndex
from router.logs import get_logger
from router.policy_worker import parse_in_child
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
        self.seen: str | None = None        # the file's text last checked (valid or not)
        self.error: str | None = None       # why the file as last seen (or last failed to read) is refused
        self.lock = asyncio.Lock()
        self.log = get_logger("tiergate.policy")

    def remember(self) -> None:
        """Mark the file as it is now as already running (at start, before serving)."""
        try:
            self.seen = read_policy_text(self.path)
        except PolicyError:
            self.seen = None

    async def check(self, force: bool = False) -> ReloadResult:
        """Read, parse, validate and build off the event loop; only the swap (`apply`) runs on it.
        A file already seen answers its known state: `invalid` again (not counted or logged again) while
        it stays invalid, `unchanged` while it is the running one."""
        async with self.lock:
            loop = asyncio.get_running_loop()
            try:
                text = await loop.run_in_executor(self.executor, read_policy_text, self.path)
            except PolicyError as exc:      # unreadable, over the size cap, not UTF-8: checked before parsing
                self.seen = None
                return self._fail(str(exc), again=str(exc) == self.error and not force)
            if text == self.seen and not force:
                return self._fail(self.error, again=True) if self.error else \
                    ReloadResult("unchanged", self.current().version)
            self.seen = text
            try:
                policy = await parse_in_child(text, str(self.path), self.executor)   # router/policy_worker.py
                view = await loop.run_in_executor(self.executor, self._prepare, policy)
            except (PolicyError, ValueError, OSError) as exc:
                return self._fail(str(exc))
            except Exception as exc:        # whatever the file does, the running policy stays (and the watcher runs)
                return self._fail(f"{self.path}: cannot build this policy: {type(exc).__name__}: {exc}")
            self.error = None
            if view.version == self.current().version:
                return ReloadResult("unchanged", view.version)
            old = self.current().version
            self.apply(view)
            self.on_result("reloaded")
            self.log.info("policy_reloaded", path=str(self.path), previous_version=old, policy_version=view.version,
                          tiers=len(view.policy.tiers), tenants=len(view.policy.tenants))
            return ReloadResult("reloaded", view.version)

    def _prepare(self, policy: Policy) -> PolicyView:
        """Blocking, on the executor: the checks that need this process, then the view (profiles, key index,
        tokenizers)."""
        missing = [t for t, spec in policy.tiers.items()
                   if not spec.instances and spec.discover is None and t not in self.simulated]
        if missing:
            raise PolicyError(f"$.tiers.{missing[0]}.instances", "a tier without listed instances is "
                              "simulated, and simulators start with the process: list its instances, "
                              "or restart", None, str(self.path))
        return self.build(policy)

    def _fail(self, error: str, again: bool = False) -> ReloadResult:
        """`again`: the same refusal as the last check's, answered without counting or logging it twice."""
        self.error = error
        if not again:
            self.on_result("invalid")
            self.log.warning("policy_reload_rejected", path=str(self.path), error=error,
                             policy_version=self.current().version)
        return ReloadResult("invalid", self.current().version, error)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()
