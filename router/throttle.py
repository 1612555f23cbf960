"""Throttle for failed key checks, per client address: a token bucket of allowed failures.

Where: the endpoints whose keys a person chooses or types, so that an online guess is worth throttling:
`/admin/usage`, `/admin/fleet`, `POST /admin/policy/reload`, `/v1/usage`, the dashboard (its sign-in form
and bearer keys on its pages) and `/metrics` when it needs a token. One throttle serves them all, so guesses
spread over endpoints share one allowance.

Algorithm: each address has a bucket of `burst` failures that refills at `per_min` failures a minute. A key
check that fails (an Authorization header was sent and matched no key) takes one from the bucket. While the
bucket holds less than one, every request from the address to these endpoints gets 429 with `Retry-After`
(the whole seconds until one failure is allowed again) and OpenAI's error JSON, *before* its key is looked
at: a correct guess made while throttled is not revealed. A request without an Authorization header is not a
guess (a browser's first visit to the dashboard) and costs nothing; a success refills nothing (else a tenant
key could reset an attacker's allowance for admin guesses).

Parameters (router/settings.py):
- `auth_fail_burst` (10): failures an address may make at once.
- `auth_fail_per_min` (10.0): the refill rate, failures per minute, so ~14,400 guesses a day per address.
- `auth_fail_max_addresses` (10,000): addresses remembered. Memory stays bounded (about 200 bytes each,
  ~2 MB in all) whatever the number of attacking addresses: the least recently failed is forgotten first.
  That one has refilled the most, and a full bucket is the same as no entry. An attacker cycling through
  more than this many addresses gets `burst` guesses per address per cycle, no more than its addresses allow.

The address: the socket peer as the ASGI server gives it (uvicorn: behind a reverse proxy, set
`FORWARDED_ALLOW_IPS` to the proxy's address so X-Forwarded-For names the client, else every client shares
the proxy's bucket). IPv4 addresses count one by one; IPv6 addresses by their /64 (one host usually holds a
whole /64); an IPv4-mapped IPv6 address as its IPv4 address.

Not on `/v1/*`: tenant keys are `sk-tg-` + 256 random bits (router/auth.py), beyond online guessing, while
a throttle there would let one misconfigured client behind a shared NAT or proxy lock every tenant behind
that address out of serving, and an anonymous tenant (policy `anonymous:`) makes a wrong key no failure at
all. Admin keys are never valid on `/v1/*`, so they cannot be guessed there. Failed keys on `/v1/*` stay
visible as `tiergate_requests_total{status="401"}`.

The clock is injected (monotonic seconds), so tests step it instead of sleeping.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from router.errors import ApiError


def client_key(host: str | None) -> str:
    """The bucket's key for a peer address: IPv4 as is, IPv6 by /64, anything else (a unix socket) by text."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailureThrottle:
    def __init__(self, burst: int = 10, per_min: float = 10.0, max_addresses: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or per_min <= 0 or max_addresses < 1:
            raise ValueError("auth_fail_burst and auth_fail_max_addresses must be >= 1, auth_fail_per_min > 0")
        self.burst = float(burst)
        self.rate = per_min / 60.0              # failures allowed again per second
        self.max_addresses = max_addresses
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # key -> (level, as of), LRU order

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.burst
        level, at = entry
        return min(self.burst, level + max(0.0, now - at) * self.rate)

    def retry_after(self, host: str | None) -> int | None:
        """Whole seconds until `host` may make a key check again; None when it may now."""
        key = client_key(host)
        level = self._level(key, self.clock())
        if level >= 1.0:
            return None
        return max(1, math.ceil((1.0 - level) / self.rate))

    def check(self, host: str | None) -> None:
        """Raise the 429 when `host` has used up its failures (call before looking at the key)."""
        wait = self.retry_after(host)
        if wait is not None:
            raise ApiError(429, f"too many failed key checks from this address; retry after {wait} s",
                           code="too_many_failed_key_checks", headers={"Retry-After": str(wait)})

    def failed(self, host: str | None) -> None:
        """Count one failed key check from `host`."""
        key = client_key(host)
        now = self.clock()
        level = self._level(key, now) - 1.0
        self._buckets[key] = (level, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)

    def fail_if_sent(self, host: str | None, authorization: str | None) -> None:
        """Count a failed check only where a credential was sent (no header: not a guess)."""
        if authorization:
            self.failed(host)
