"""Budget alert delivery: a signed JSON POST to the operator's webhook, retried, never on the request path.

One POST per alert, body (JSON):
    {"tenant": "acme", "period": "daily", "period_id": "20250301", "threshold": 0.8,
     "spent_usd": 16.02, "budget_usd": 20.0, "at": "2025-03-01T14:03:07.123Z"}
Headers: `content-type: application/json`; `x-tiergate-signature: sha256=<hex HMAC-SHA256(secret, body)>`
(the raw body bytes); `x-tiergate-timestamp` (unix seconds of this attempt; `at`, inside the signed body, is
the one to check for freshness); `x-tiergate-alert-id` (the same on every retry, and on every replica, for one
tenant, period and threshold: a receiver dedupes on it).

Retried with exponential backoff and full jitter on connect errors, timeouts, 5xx and 429 (its Retry-After
honoured up to 30 s), `attempts` tries in all; another status (a 4xx) gives up at once. Giving up logs
`budget_alert_undelivered`. Alerts wait in a bounded queue (full: the alert is dropped, logged and counted);
at most `parallel` are delivered at once, so a slow receiver holds no other alert up for long.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec

from router.logs import get_logger

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_DELAY_S = 30.0


def sign(secret: str, body: bytes) -> str:
    """The x-tiergate-signature value of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_webhook(url: str | None, secret: str | None) -> None:
    """Settings check at start-up: ValueError for a webhook URL that is not http(s) or has no secret."""
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("alert_webhook_url (TIERGATE_ALERT_WEBHOOK_URL) must be an http:// or https:// URL")
    if not secret:
        raise ValueError("alert_webhook_url needs alert_webhook_secret (TIERGATE_ALERT_WEBHOOK_SECRET): "
                         "alerts are signed")


class Alert(msgspec.Struct, frozen=True):
    tenant: str
    period: str          # daily | monthly
    period_id: str       # YYYYMMDD | YYYYMM (UTC)
    threshold: float
    spent_usd: float
    budget_usd: float
    at: str

    @property
    def alert_id(self) -> str:
        """Stable per (tenant, period, period id, threshold): the receiver's idempotency key."""
        key = f"{self.tenant}\n{self.period}\n{self.period_id}\n{self.threshold!r}"
        return hashlib.sha256(key.encode()).hexdigest()[:32]


class WebhookSender:
    """`on_result(alert, result)`: delivered | failed | dropped (the queue was full)."""

    def __init__(self, url: str, secret: str, on_result: Callable[[Alert, str], None], *, attempts: int = 5,
                 backoff_s: float = 2.0, timeout_s: float = 10.0, queue_max: int = 1000, parallel: int = 4) -> None:
        self.url = url
        self.secret = secret
        self.on_result = on_result
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=queue_max)
        self.parallel = parallel
        self.deliveries: set[asyncio.Task[Any]] = set()
        self.session: aiohttp.ClientSession | None = None
        self.log = get_logger("tiergate.alerts")

    def put(self, alert: Alert) -> None:
        try:
            self.queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.log.warning("budget_alert_dropped", tenant=alert.tenant, period=alert.period,
                             threshold=alert.threshold, reason="queue_full")
            self.on_result(alert, "dropped")

    async def run(self) -> None:
        """The sender (lifespan-owned): takes alerts off the queue, `parallel` deliveries at a time."""
        slots = asyncio.Semaphore(self.parallel)
        while True:
            alert = await self.queue.get()
            try:
                await slots.acquire()
            except asyncio.CancelledError:   # shutdown: `aclose` gives it its try
                self.queue.put_nowait(alert)
                raise
            task = asyncio.create_task(self._deliver_in(alert, slots), name="budget-alert-delivery")
            self.deliveries.add(task)
            task.add_done_callback(self.deliveries.discard)

    async def _deliver_in(self, alert: Alert, slots: asyncio.Semaphore) -> None:
        try:
            await self.deliver(alert)
        finally:
            slots.release()

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self.session

    async def deliver(self, alert: Alert) -> bool:
        """POST `alert` until it is accepted (2xx) or the tries run out; reports the result."""
        body = msgspec.json.encode(alert)
        headers = {"content-type": "application/json", "x-tiergate-signature": sign(self.secret, body),
                   "x-tiergate-alert-id": alert.alert_id}
        why, attempt = "", 0
        try:
            for attempt in range(self.attempts):
                if attempt:
                    await asyncio.sleep(self._delay(attempt, why))
                retry, why = await self._attempt(body, {**headers, "x-tiergate-timestamp": str(int(time.time()))})
                if not why:
                    self.on_result(alert, "delivered")
                    return True
                if not retry:
                    break
        except asyncio.CancelledError:   # shutdown's grace ran out
            self._gave_up(alert, why or "shutdown", attempt)
            raise
        self._gave_up(alert, why, attempt + 1)
        return False

    def _gave_up(self, alert: Alert, why: str, attempts: int) -> None:
        self.log.warning("budget_alert_undelivered", tenant=alert.tenant, period=alert.period,
                         period_id=alert.period_id, threshold=alert.threshold, reason=why, attempts=attempts)
        self.on_result(alert, "failed")

    async def _attempt(self, body: bytes, headers: dict[str, str]) -> tuple[bool, str]:
        """-> (retry?, why it failed: '' when delivered; 'status 429 retry-after 5' keeps the server's ask)."""
        try:
            async with self._session().post(self.url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return False, ""
                after = resp.headers.get("retry-after", "")
                return resp.status in RETRY_STATUS, f"status {resp.status}" + (
                    f" retry-after {after}" if after.isdigit() else "")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return True, type(exc).__name__

    def _delay(self, attempt: int, why: str) -> float:
        """Full jitter over [base/2, base], base = backoff x 2^(attempt-1), capped; a 429's Retry-After wins."""
        base = min(self.backoff_s * 2 ** (attempt - 1), MAX_DELAY_S)
        delay = random.uniform(base / 2, base)
        if " retry-after " in why:
            delay = max(delay, min(float(why.rsplit(" ", 1)[1]), MAX_DELAY_S))
        return delay

    async def aclose(self, grace_s: float = 2.0) -> None:
        """Shutdown: the alerts still queued get their first try within `grace_s`, with what is in flight;
        whatever is unfinished then is given up (logged, counted failed) and the session closed."""
        while not self.queue.empty():
            alert = self.queue.get_nowait()
            task = asyncio.create_task(self.deliver(alert))
            self.deliveries.add(task)
            task.add_done_callback(self.deliveries.discard)
        if self.deliveries:
            _, stuck = await asyncio.wait(list(self.deliveries), timeout=grace_s)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck, timeout=1)
                self.log.warning("budget_alerts_undelivered_at_shutdown", alerts=len(stuck))
        if self.session is not None:
            await self.session.close()
