"""Process settings, from the environment (TIERGATE_*) or the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

DEMO_POLICY = str(Path(__file__).resolve().parent.parent / "policies" / "examples" / "demo.yaml")


class Settings(msgspec.Struct, kw_only=True):
    policy_path: str = DEMO_POLICY
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str | None = None           # None: start the embedded valkey-server
    data_dir: str = ".tiergate"
    workers: int = 1                        # `tiergate serve --workers N` (router/workers.py)
    tracing: str = "off"                    # off | otlp: OpenTelemetry traces (router/tracing.py; OTEL_* vars)
    tracing_sample_ratio: float = 1.0       # share of root traces kept (a client's sampled parent is honoured)
    http_client: str = "aiohttp"            # aiohttp | httpx | httpx-aiohttp
    max_body_bytes: int = 32 * 1024 * 1024
    upstream_connect_timeout_s: float = 2.0
    upstream_read_timeout_s: float = 300.0
    # upstream deadlines (router/deadlines.py): first byte = clamp(factor x max(predicted TTFT, TTFT target),
    # min, max); a policy tier may fix it (`first_byte_timeout_s`)
    first_byte_factor: float = 3.0
    first_byte_min_s: float = 5.0
    first_byte_max_s: float = 120.0
    first_byte_assumed_prefill_tps: float = 2000.0   # predicts TTFT for a tier whose prefill rate is not known yet
    # between stream chunks: clamp(factor x max(TPOT target, tier mean TPOT), min, max), else the default;
    # a policy tier may fix it (`stall_timeout_s`)
    stall_factor: float = 200.0
    stall_min_s: float = 15.0
    stall_max_s: float = 120.0
    stall_default_s: float = 30.0
    redis_timeout_s: float = 0.05
    # durability on Redis Cluster / Sentinel with replicas (router/budget_store.py): WAIT for this many replicas
    # after each admission and settlement; unconfirmed ones take the failure path (0: no WAIT)
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 100
    affinity_timeout_s: float = 0.05        # one lookup round trip; past it, route without affinity
    affinity_breaker_failures: int = 3      # consecutive failures that open the affinity breaker
    affinity_breaker_cooldown_s: float = 5.0
    probe_interval_s: float = 2.0
    scrape_interval_s: float = 1.0          # /metrics of every instance (running, waiting, KV usage)
    max_attempts: int = 3
    accounting_timeout_s: float = 0.1       # one admission round trip; past it, the tenant's on_store_failure
    load_sync_interval_s: float = 0.05      # share in-flight/queued counts with other replicas via Redis
    load_sync_stale_s: float = 2.0          # a replica silent this long no longer counts
    log_level: str = "info"
    expose_decision_header: bool = False    # x-tiergate-decision with per-plugin scores
    # explain, dry-run, shadow and decision records (router/explain.py, router/shadow.py, router/decision_records.py)
    explain_max_candidates: int = 16        # candidates listed by POST /v1/route and x-tiergate-explain
    shadow_policy_path: str | None = None   # a second policy decided on live traffic, never serving
    decision_records_max: int = 10_000      # last N decision records in a Redis stream (XADD MAXLEN ~); 0: off
    decision_records_timeout_s: float = 0.25  # one batch write; past it the batch is dropped (fail open, counted)
    decision_records_queue: int = 2048      # records waiting for the writer; past it new ones are dropped
    policy_reload_interval_s: float = 2.0   # check the policy file for changes (0: only POST /admin/policy/reload)
    drain_grace_s: float = 5.0              # after SIGTERM: /ready is 503 at once, new requests still taken this long
    drain_timeout_s: float = 30.0           # after SIGTERM: streams still running then are cut (error event, billed)
    # bounded resources (router/limits.py, router/http_limits.py); max_body_bytes above caps the body limit
    long_prompt_chars: int = 262_144        # prompts of this many characters or more take a tokenizer slot
    long_prompt_slots: int = 2              # long prompts tokenized at once (FIFO queue behind them)
    long_prompt_queue: int = 64             # long prompts waiting for a slot; more get 503 tokenizer_busy
    malloc_trim_after_bytes: int = 1024 * 1024  # after a body this large, give freed heap back (0: never)
    http_max_header_bytes: int = 65_536     # request line and headers; more gets 431 and the connection closed
    http_max_headers: int = 100             # header fields; more gets 431
    http_header_timeout_s: float = 10.0     # from a request's first byte (or the connection) to its last header
    http_body_idle_timeout_s: float = 30.0  # longest silence while a request body is being sent
    http_keep_alive_timeout_s: int = 5      # an idle keep-alive connection is closed after this
    http_limit_concurrency: int = 0         # connections + requests before uvicorn answers 503 (0: no limit)
    metrics_token: str | None = None        # /metrics needs `Authorization: Bearer <token>` (None: open)
    metrics_tenant_labels: str = "name"     # tenant label values: name | hash (HMAC with the salt) | redacted
    metrics_tenant_salt: str | None = None  # the HMAC key for `hash` (same on every replica); required by it
    auth_fail_burst: int = 10               # failed key checks per client address at once (router/throttle.py)
    auth_fail_per_min: float = 10.0         # ... and then per minute; past them 429 + Retry-After
    auth_fail_max_addresses: int = 10_000   # addresses remembered (LRU): bounds the throttle's memory
    # budget alerts (router/alerts.py): where they are POSTed is operator configuration only, never the policy's
    alert_webhook_url: str | None = None     # http(s) URL; None: alerts are only logged and counted
    alert_webhook_secret: str | None = None  # HMAC-SHA256 key of x-tiergate-signature; required with the URL
    alert_webhook_attempts: int = 5          # tries per alert (connect errors, timeouts, 5xx and 429 are retried)
    alert_webhook_backoff_s: float = 2.0     # first retry delay, doubled each time, with jitter (capped at 30 s)
    alert_webhook_timeout_s: float = 10.0    # one attempt
    # dashboard sign-in (router/dashboard/session.py): sessions in Redis (else memory), signed cookies
    session_secret: str | None = None       # signs session cookies; the same on every replica (None: per process)
    session_max_age_s: int = 8 * 3600       # a session ends this long after sign-in (absolute, not sliding)
    session_secure: bool = False            # Secure cookies (__Host- prefix): set when the dashboard is behind https

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env: dict[str, object] = {}
        for f in msgspec.structs.fields(cls):
            v = os.environ.get("TIERGATE_" + f.name.upper())
            if v is not None:
                env[f.name] = v
        env.update({k: v for k, v in overrides.items() if v is not None})
        return msgspec.convert(env, cls, strict=False)
