"""API keys: stored as SHA-256 hashes in the policy, compared in constant time."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from policies.schema import Policy


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sk-tg-" + secrets.token_urlsafe(32)


def bearer_or_basic(authorization: str | None) -> str | None:
    """The key from `Bearer <key>`, or the password of `Basic` (so a browser can open the dashboard)."""
    if not authorization:
        return None
    if authorization.startswith(("Bearer ", "bearer ")):
        return authorization[7:].strip() or None
    if authorization.startswith(("Basic ", "basic ")):
        try:
            user_pass = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user_pass.partition(":")[2] or None
    return None


@dataclass(frozen=True)
class Identity:
    """Who a key (or a session holding its digest) is: the admin, or one tenant."""

    admin: bool
    tenant: str | None
    digest: str             # the key's SHA-256 (what a dashboard session keeps; never the key)


class KeyIndex:
    def __init__(self, policy: Policy) -> None:
        self._by_hash: dict[str, tuple[str, str]] = {}
        for tenant, spec in policy.tenants.items():
            for h in spec.key_sha256:
                self._by_hash[h] = (h, tenant)
        self._admin = list(policy.admin.key_sha256)
        self.anonymous = policy.anonymous.tenant if policy.anonymous is not None else None

    def is_admin(self, authorization: str | None, allow_basic: bool = False) -> bool:
        key = bearer_or_basic(authorization) if allow_basic else self._bearer(authorization)
        if key is None:
            return False
        digest = hash_key(key)
        found = False
        for h in self._admin:  # constant time per stored hash, and every hash is compared
            found |= hmac.compare_digest(h, digest)
        return found

    @staticmethod
    def _bearer(authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith(("Bearer ", "bearer ")):
            return None
        return authorization[7:].strip() or None

    def tenant_for(self, authorization: str | None, allow_basic: bool = False) -> str | None:
        key = bearer_or_basic(authorization) if allow_basic else self._bearer(authorization)
        if not key:
            return None
        digest = hash_key(key)
        hit = self._by_hash.get(digest)
        if hit is None:
            return None
        stored, tenant = hit
        return tenant if hmac.compare_digest(stored, digest) else None

    def identify_digest(self, digest: str) -> Identity | None:
        """The admin or tenant whose key has this SHA-256 digest, compared in constant time."""
        admin = False
        for h in self._admin:
            admin |= hmac.compare_digest(h, digest)
        if admin:
            return Identity(True, None, digest)
        hit = self._by_hash.get(digest)
        if hit is not None and hmac.compare_digest(hit[0], digest):
            return Identity(False, hit[1], digest)
        return None

    def identify(self, key: str) -> Identity | None:
        return self.identify_digest(hash_key(key)) if key else None

    def resolve(self, authorization: str | None) -> str | None:
        """The tenant for an API request: the key's, else the anonymous tenant where the policy has one
        (any key or none). Admin endpoints use `is_admin` and never fall back."""
        return self.tenant_for(authorization) or self.anonymous
