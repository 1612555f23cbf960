"""Upstream API keys: a tier's (or one instance's) vLLM `--api-key`, read from the environment only.

The policy names an environment variable (`api_key_env: VLLM_API_KEY`), never a key: in Kubernetes the
variable comes from a Secret (deploy/k8s). An instance's `api_key_env` overrides its tier's. The router
sends `Authorization: Bearer <key>` with every request to that instance (vLLM guards /v1, /tokenize and
the rest with it; /health and /metrics stay open, so probes and scrapes send none). A named variable
that is unset or empty is a policy error, so a router never starts sending unauthenticated requests to
a backend that would answer each with 401.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from policies.schema import InstanceSpec, Policy, TierSpec

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _check(path: str, name: str | None, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    if name is None:
        return []
    if not _ENV_NAME.match(name):
        return [(path, "must be an environment variable name (letters, digits, _; not starting with a digit)")]
    if not environ.get(name):
        return [(path, f"environment variable {name} is not set (the upstream API key is read from it)")]
    return []


def api_key_errors(policy: Policy, environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Errors for every `api_key_env` of the policy, each naming its field path."""
    env = os.environ if environ is None else environ
    errs: list[tuple[str, str]] = []
    for name, tier in policy.tiers.items():
        errs += _check(f"$.tiers.{name}.api_key_env", tier.api_key_env, env)
        for i, inst in enumerate(tier.instances):
            errs += _check(f"$.tiers.{name}.instances[{i}].api_key_env", inst.api_key_env, env)
    return errs


def upstream_headers(tier: TierSpec, inst: InstanceSpec | None,
                     environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The headers every request to this instance carries (content type, and its API key if any)."""
    env = os.environ if environ is None else environ
    name = (inst.api_key_env if inst is not None else None) or tier.api_key_env
    key = env.get(name) if name else None
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return headers
