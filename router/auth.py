"""API keys: stored as SHA-256 hashes in the policy, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from policies.schema import Policy


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sk-tg-" + secrets.token_urlsafe(32)


class KeyIndex:
    def __init__(self, policy: Policy) -> None:
        self._by_hash: dict[str, tuple[str, str]] = {}
        for tenant, spec in policy.tenants.items():
            for h in spec.key_sha256:
                self._by_hash[h] = (h, tenant)

    def tenant_for(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith(("Bearer ", "bearer ")):
            return None
        key = authorization[7:].strip()
        if not key:
            return None
        digest = hash_key(key)
        hit = self._by_hash.get(digest)
        if hit is None:
            return None
        stored, tenant = hit
        return tenant if hmac.compare_digest(stored, digest) else None
