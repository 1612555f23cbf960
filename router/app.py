"""The app factory. It receives its resources; background tasks are owned by the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream

from backends.health import probe_forever, probe_once
from backends.http_client import ClientLimits, UpstreamClient, make_client
from backends.registry import Registry
from backends.tokenization import TokenizerCache, tokenizer_executor
from backends.vllm_metrics import scrape_forever
from policies.schema import InstanceSpec, Policy, load_policy
from router.accounting import Accountant
from router.admission.live import LiveGate
from router.admission.window_store import WindowStore
from router.affinity_store import AffinityStore, Breaker
from router.alerts import BudgetAlerts
from router.budget_store import BudgetStore
from router.dashboard.routes import dashboard_router
from router.dashboard.session import sessions_from_settings
from router.deadlines import Deadlines
from router.decision_records import RedisDecisionRecords
from router.decision_routes import decision_handlers
from router.discovery import Discovery
from router.drain import DrainController
from router.errors import ApiError, error_body
from router.gateway import Gateway
from router.journal import Journal
from router.kv_events import kv_subscribers
from router.limits import RequestLimits
from router.live_policy import PolicyReloader, PolicyView, build_view
from router.load_sync import LoadSync
from router.logs import bind_request, get_logger
from router.metrics import RouterMetrics, instance_gauges_forever, tenant_labeler, write_instance_gauges
from router.model_list import model_list, warn_anonymous
from router.openapi import openapi_handlers
from router.redis_pool import RedisClient, close_redis, make_redis
from router.replay.record import TraceRecorder
from router.settings import Settings
from router.shadow import Shadow
from router.throttle import FailureThrottle
from router.tracing import Tracing
from router.usage_routes import UsageSource, usage_handlers

_enc = msgspec.json.Encoder()
T = TypeVar("T")
JSON = "application/json"


def create_app(settings: Settings, *, policy: Policy | None = None, upstream: UpstreamClient | None = None,
               redis: RedisClient | None = None, instance_urls: dict[str, list[InstanceSpec]] | None = None,
               tokenizers: TokenizerCache | None = None, watch_policy: bool | None = None,
               drain: DrainController | None = None, tracing: Tracing | None = None) -> Litestar:
    """`watch_policy`: hot-reload `settings.policy_path` (default: when the policy is loaded from it here).
    `drain`: the process's shutdown drain, which `tiergate serve` starts on SIGTERM (router/drain.py)."""
    log = get_logger("tiergate")
    watch = policy is None if watch_policy is None else watch_policy
    policy = policy or load_policy(settings.policy_path)
    registry = Registry(policy, instance_urls)
    client = upstream or make_client(settings.http_client, ClientLimits(
        connect_timeout_s=settings.upstream_connect_timeout_s, read_timeout_s=settings.upstream_read_timeout_s))
    metrics = RouterMetrics(tenant_labeler(settings.metrics_tenant_labels, settings.metrics_tenant_salt),
                            redacted=settings.metrics_tenant_labels == "redacted")
    throttle = FailureThrottle(settings.auth_fail_burst, settings.auth_fail_per_min,
                               settings.auth_fail_max_addresses)  # failed key checks (router/throttle.py)
    executor = tokenizer_executor(4)
    store = redis if redis is not None else (make_redis(settings.redis_url, settings.redis_timeout_s)
                                             if settings.redis_url else None)
    aff_store = None
    if store is not None:
        aff_store = AffinityStore(
            store, timeout_s=settings.affinity_timeout_s,
            breaker=Breaker(settings.affinity_breaker_failures, settings.affinity_breaker_cooldown_s),
            on_event=lambda op, result: metrics.child(metrics.affinity, op, result).inc(), metrics=metrics)
    load_sync = None
    if store is not None and settings.load_sync_interval_s > 0:
        load_sync = LoadSync(store, registry, uuid.uuid4().hex[:12], interval_s=settings.load_sync_interval_s,
                             timeout_s=settings.redis_timeout_s, stale_s=settings.load_sync_stale_s,
                             on_result=lambda result: metrics.child(metrics.load_sync, result).inc())
    journal = Journal(Path(settings.data_dir) / "journal")
    accountant = Accountant(policy, BudgetStore(store, ledger_maxlen=policy.accounting.ledger_maxlen,
                                        retention_days=policy.accounting.usage_retention_days,
                                        wait_replicas=settings.redis_wait_replicas,
                                        wait_timeout_ms=settings.redis_wait_timeout_ms)
                            if store is not None else None, journal, metrics,
                            timeout_s=max(settings.redis_timeout_s, settings.accounting_timeout_s))
    alerts = None if store is None else BudgetAlerts.from_settings(settings, store, metrics, lambda: accountant.policy)
    if alerts is not None:   # budget alerts, checked after each settlement (router/alerts.py)
        accountant.on_settled = alerts.settled
    tokenizers = tokenizers or TokenizerCache()
    limits = RequestLimits(settings, metrics, tokenizers)  # body limit, long-prompt gate (router/limits.py)
    records = RedisDecisionRecords(store, metrics, maxlen=settings.decision_records_max,
                                   timeout_s=settings.decision_records_timeout_s,
                                   queue_max=settings.decision_records_queue) \
        if store is not None and settings.decision_records_max > 0 else None
    shadow = None
    if settings.shadow_policy_path:     # a second policy, decided on live traffic, never serving (router/shadow.py)
        shadow = Shadow(settings.shadow_policy_path, metrics, executor, interval_s=settings.policy_reload_interval_s)
        shadow.load_now()
    gate = LiveGate(policy.admission, WindowStore(store, timeout_s=settings.redis_timeout_s).take
                    if store is not None else None, metrics)   # prefill windows and queues (issue #14)
    gw = Gateway(policy, registry, client, metrics, tokenizers, executor,
                 max_attempts=settings.max_attempts, expose_decision=settings.expose_decision_header,
                 affinity_store=aff_store, accountant=accountant, records=records, shadow=shadow,
                 explain_max_candidates=settings.explain_max_candidates, gate=gate, load_sync=load_sync,
                 tracing=tracing or Tracing.from_settings(settings.tracing, settings.tracing_sample_ratio))
    drain = drain or DrainController(settings.drain_grace_s, settings.drain_timeout_s)
    gw.forwarder.cuts = drain.cuts  # streams the drain may cut at its deadline
    gw.forwarder.deadlines = Deadlines.from_settings(settings)   # first byte and stall (router/deadlines.py)
    gw.forwarder.on_fault = metrics.upstream_fault
    recorder = TraceRecorder.from_env()   # TIERGATE_RECORD_TRACE: this traffic as a replay trace (no prompt text)
    gw.core.recorder = recorder
    state: dict[str, Any] = {"redis_ok": False}
    jobs: set[asyncio.Task[object]] = set()  # short background jobs that shutdown waits for
    kv_tasks: dict[tuple[str, str, str], asyncio.Task[None]] = {}

    def sync_kv_subscribers() -> None:
        """Start subscribers for instances that publish KV events, stop those of instances no longer listed."""
        if aff_store is None:
            return
        want = kv_subscribers(gw.policy, registry, aff_store, metrics)
        for key in [k for k in kv_tasks if k not in want]:
            kv_tasks.pop(key).cancel()
        for key, sub in want.items():
            if key not in kv_tasks:
                kv_tasks[key] = asyncio.create_task(sub.run(), name=f"kv-events-{sub.tier}-{sub.instance}")
    discovery = Discovery(registry, metrics, on_change=sync_kv_subscribers)   # DNS (router/discovery.py)

    def apply_policy(view: PolicyView) -> None:
        """Swap a validated policy in, in one synchronous step (requests already running keep theirs)."""
        old = gw.view.version
        gw.view = view
        registry.apply(view.policy)
        discovery.sync(view.policy)
        accountant.policy = view.policy
        if accountant.store is not None:
            accountant.store.ledger_maxlen = view.policy.accounting.ledger_maxlen
            accountant.store.retention_days = view.policy.accounting.usage_retention_days
        with contextlib.suppress(KeyError):
            metrics.policy_info.remove(old)
        metrics.policy_info.labels(view.version).set(1)
        warn_anonymous(log, view.policy)
        sync_kv_subscribers()
        if store is not None:
            track(_note_version(store, view.version))

    def track(coro: Coroutine[Any, Any, object]) -> None:
        """A short background job that shutdown waits for (a policy-version note, a SIGHUP reload)."""
        task = asyncio.create_task(coro)
        jobs.add(task)
        task.add_done_callback(jobs.discard)

    reloader = PolicyReloader(
        Path(settings.policy_path), lambda: gw.view,
        lambda p: build_view(p, registry, tokenizers, executor, aff_store), apply_policy, executor,
        interval_s=settings.policy_reload_interval_s, simulated=frozenset(registry.urls),
        on_result=lambda result: metrics.child(metrics.policy_reloads, result).inc())
    metrics.policy_info.labels(gw.view.version).set(1)
    warn_anonymous(log, policy)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Litestar) -> AsyncIterator[None]:
        await discovery.start(gw.policy)   # each discovering tier resolved once before serving
        await probe_once(client, registry)
        if store is not None:
            try:
                await store.set("tiergate:policy:version", gw.view.version)
                state["redis_ok"] = True
            except Exception as exc:  # fail open: v1 keeps no request state in Redis
                log.warning("redis_unavailable", error=type(exc).__name__)
        tasks = [asyncio.create_task(probe_forever(client, registry, settings.probe_interval_s), name="probe"),
                 asyncio.create_task(scrape_forever(client, registry, settings.scrape_interval_s), name="scrape")]
        # the micro-batch flushers (router/redis_batch.py): stopped only after their drains below
        flushers = [asyncio.create_task(accountant.batch.run(), name="settle-batch")]
        if aff_store is not None:
            flushers.append(asyncio.create_task(aff_store.batch.run(), name="affinity-record-batch"))
        tasks.append(asyncio.create_task(accountant.background(), name="accounting"))
        tasks.append(asyncio.create_task(gate.run(), name="admission-gate"))
        if recorder is not None:
            tasks.append(asyncio.create_task(recorder.run(), name="trace-record"))
        if alerts is not None:
            tasks.append(asyncio.create_task(alerts.run(), name="budget-alerts"))
        if load_sync is not None:
            tasks.append(asyncio.create_task(load_sync.run(), name="load-sync"))
        if metrics.multiprocess:   # one of `tiergate serve --workers N` (router/workers.py)
            tasks.append(asyncio.create_task(instance_gauges_forever(metrics, registry), name="instance-gauges"))
        if records is not None:
            tasks.append(asyncio.create_task(records.run(), name="decision-records"))
        if shadow is not None and settings.policy_reload_interval_s > 0:
            tasks.append(asyncio.create_task(shadow.run(), name="shadow-policy"))
        sync_kv_subscribers()
        hup = False
        if watch:
            reloader.remember()
            if settings.policy_reload_interval_s > 0:
                tasks.append(asyncio.create_task(reloader.run(), name="policy-reload"))
            hup = _on_sighup(lambda: track(reloader.check()))
        log.info("started", policy=settings.policy_path, policy_version=gw.view.version, policy_watch=watch,
                 tiers={t: len(r.instances) for t, r in registry.tiers.items()}, http_client=client.name)
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            tasks.extend([*kv_tasks.values(), *discovery.tasks()])
            for task in tasks:
                task.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=5)  # bounded: a task that ignores its cancel can't hang us
            if stuck:
                log.warning("shutdown_tasks_stuck", tasks=sorted(t.get_name() for t in stuck))
            if load_sync is not None:
                await load_sync.leave()
            if gw.forwarder.drains:
                await asyncio.wait(list(gw.forwarder.drains), timeout=10)
            if jobs:  # policy-version notes still writing to Redis, reloads asked for by SIGHUP
                await asyncio.wait(list(jobs), timeout=2)
            if records is not None:
                await records.flush()
            await accountant.drain()
            if alerts is not None:   # the last settlements' alerts, then the webhook's grace
                await alerts.aclose()
            if recorder is not None:
                await recorder.aclose()
            await accountant.replay_once()
            journal.close()
            if aff_store is not None:
                await aff_store.drain()
            for task in flushers:   # idle now: everything they queued is flushed
                task.cancel()
            await asyncio.wait(flushers, timeout=1)
            await client.close()
            if store is not None and redis is None:
                await close_redis(store)
            executor.shutdown(wait=False, cancel_futures=True)
            if gw.tracing is not None:   # flush the spans still queued (the exporter's own thread)
                await asyncio.to_thread(gw.tracing.shutdown)

    def render(reply_status: int, body: bytes, headers: dict[str, str] | None = None) -> Response[bytes]:
        return Response(content=body, status_code=reply_status, media_type=JSON, headers=headers)

    def fail(exc: ApiError, request_id: str) -> Response[bytes]:
        if not exc.logged:
            gw.log.info("request", request_id=request_id, tenant=exc.tenant, status=exc.status, error=exc.code,
                        param=exc.param)
            gw.metrics.child(gw.metrics.requests, "none", exc.tenant or "unknown", "none", str(exc.status)).inc()
        return render(exc.status, exc.body(), {"x-request-id": request_id, **exc.headers})

    async def serve(kind: str, request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
        rid = bind_request(request.headers.get("x-request-id"))   # on every line logged in this request
        raw = b""
        try:  # the size is checked before anything else: 413 before reading when Content-Length says so
            raw = await limits.read(request.receive, request.headers.get("content-length"), gw.view)
            reply = await until_gone(gw.handle(kind, raw, request.headers.get("authorization"), rid,
                                               request.headers), request.receive)
            if reply is None:   # the client left before the answer: cancelled (queue left, upstream aborted)
                return render(499, b"")
        except ApiError as exc:
            return fail(exc, rid)
        finally:
            limits.done(len(raw))  # after a large body, give the freed memory back
        if reply.stream is not None:
            return Stream(content=reply.stream, status_code=reply.status, media_type="text/event-stream",
                          headers={**reply.headers, "cache-control": "no-cache", "x-accel-buffering": "no"})
        return render(reply.status, reply.body or b"", reply.headers)

    @post("/v1/chat/completions", status_code=200, summary="OpenAI chat completions (routed)")
    async def chat(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
        return await serve("chat", request)

    @post("/v1/completions", status_code=200, summary="OpenAI completions (routed)")
    async def completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
        return await serve("completions", request)

    @get("/v1/models", summary="Models (routes and their aliases) in OpenAI's list shape")
    async def models(request: Request[Any, Any, Any]) -> Response[bytes]:
        try:
            tenant = gw.tenant(request.headers.get("authorization"))
        except ApiError as exc:
            return render(exc.status, exc.body(), exc.headers)
        return render(200, _enc.encode({"object": "list", "data": model_list(gw.view, gw.allowed_models(tenant))}))

    @get("/health", summary="Liveness")
    async def health() -> Response[bytes]:
        return render(200, b'{"status":"ok"}')

    @get("/ready", summary="Readiness: policy loaded with a tier, and not draining")
    async def ready() -> Response[bytes]:
        """503 only while draining (or with no tier): backends all down must not take every router
        replica out of its Service at once, so their health is in the body and /metrics instead."""
        reachable = {t: sum(1 for i in rt.instances if i.serving(registry.clock()))
                     for t, rt in registry.tiers.items()}
        ok = bool(registry.tiers) and not drain.draining
        body = {"ready": ok, "status": "draining" if drain.draining else "ready" if ok else "no_tiers",
                "policy_version": gw.view.version, "reachable_instances": reachable,
                "redis": state["redis_ok"] if store is not None else None}
        return render(200 if ok else 503, _enc.encode(body))

    @get("/metrics", summary="Prometheus metrics", media_type=MediaType.TEXT)
    async def prom(request: Request[Any, Any, Any]) -> Response[bytes]:
        if settings.metrics_token:   # TIERGATE_METRICS_TOKEN: bearer, constant time, throttled
            denied = metrics_denied(request)
            if denied is not None:
                return denied
        write_instance_gauges(metrics, registry)
        return Response(content=metrics.render(), media_type="text/plain; version=0.0.4")

    def metrics_denied(request: Request[Any, Any, Any]) -> Response[bytes] | None:
        host = request.client.host if request.client is not None else None
        try:
            throttle.check(host)
        except ApiError as exc:
            return render(exc.status, exc.body(), exc.headers)
        auth = request.headers.get("authorization") or ""
        sent = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        want = hashlib.sha256(str(settings.metrics_token).encode()).digest()
        if hmac.compare_digest(hashlib.sha256(sent.encode()).digest(), want):  # equal lengths: constant time
            return None
        throttle.fail_if_sent(host, auth)
        return render(401, error_body(401, "/metrics needs `Authorization: Bearer <metrics token>`",
                                      code="invalid_api_key"), {"WWW-Authenticate": 'Bearer realm="tiergate-metrics"'})

    @post("/admin/policy/reload", status_code=200, summary="Reload the policy file now (admin key)")
    async def reload_policy(request: Request[Any, Any, Any]) -> Response[bytes]:
        auth = request.headers.get("authorization")
        host = request.client.host if request.client is not None else None
        try:
            throttle.check(host)
        except ApiError as exc:
            return render(exc.status, exc.body(), exc.headers)
        if not gw.view.keys.is_admin(auth):
            status, msg = (403, "this endpoint needs an admin key") if gw.view.keys.tenant_for(auth) else \
                (401, "missing or invalid admin key")
            if status == 401:
                throttle.fail_if_sent(host, auth)
            return render(status, error_body(status, msg, code="admin_only" if status == 403 else "invalid_api_key"))
        if not watch:
            return render(409, error_body(409, "this router was given its policy in code, not read from a file; "
                                          "there is nothing to reload", code="no_policy_file"))
        result = await reloader.check()
        if result.result == "invalid":
            return render(422, error_body(422, f"policy not reloaded, the running one stays: {result.error}",
                                          code="invalid_policy"))
        return render(200, msgspec.json.encode(result))

    def http_error(_r: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        status = exc.status_code
        msg = {404: "no such endpoint", 405: "method not allowed on this endpoint",
               413: f"request body exceeds the {settings.max_body_bytes} byte limit"}.get(status, exc.detail)
        return render(status, error_body(status, msg, code={413: "request_too_large"}.get(status)))

    def internal_error(_r: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        log.error("internal_error", error=type(exc).__name__, exc_info=exc)
        return render(500, error_body(500, "internal error", code="internal_error"))

    return Litestar(
        route_handlers=[chat, completions, models, health, ready, prom, reload_policy,
                        *usage_handlers(lambda: (gw.view.policy, gw.view.keys), accountant, throttle=throttle),
                        dashboard_router(lambda: (gw.view.policy, gw.view.keys), UsageSource(accountant.store),
                                         throttle, sessions_from_settings(settings, store)),   # router/dashboard/
                        *decision_handlers(gw, limits, throttle, records),
                        *openapi_handlers()],
        lifespan=[lifespan],
        middleware=[drain.middleware],  # counts requests for the drain, refuses new ones after its grace
        openapi_config=None,  # our own document and offline docs page: router/openapi.py
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        request_max_body_size=settings.max_body_bytes,
        debug=False, logging_config=None,  # stdlib logging is router/logs.py's (JSON lines)
    )


async def until_gone(work: Coroutine[Any, Any, T], receive: Callable[[], Awaitable[Any]]) -> T | None:
    """`work`'s result, or None once the client disconnects first (`work` is then cancelled, so a request
    waiting in the admission queue or on a non-streamed upstream answer stops and is billed nothing)."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:     # this handler itself cancelled: take the work down with it
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    exc = task.exception()
    if exc is None:
        return task.result()
    del task, watch   # else exception -> traceback -> this frame -> task -> exception: a cycle that would keep
    raise exc         # the request's body and parsed JSON alive until the garbage collector runs


async def _note_version(store: RedisClient, version: str) -> None:
    try:
        async with asyncio.timeout(1.0):
            await store.set("tiergate:policy:version", version)
    except Exception:  # informational only
        pass


def _on_sighup(callback: Callable[[], None]) -> bool:
    """`kill -HUP` reloads the policy, as operators expect of a daemon (main thread, POSIX only)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return False
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, callback)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True
