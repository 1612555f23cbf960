"""`tiergate` command line: serve, sim, policy check, replay, keys new."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from litestar import Litestar

    from policies.schema import InstanceSpec
    from router.drain import DrainController, DrainingServer
    from router.settings import Settings


def bind_listener(host: str, port: int) -> socket.socket:
    """The router's listening socket, bound before any child starts (it listens once the app is up).
    Raises OSError (EADDRINUSE: the port is taken)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _listen_error(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} is in use on {host}: another process listens there; stop it or choose "
                f"another port (--port or TIERGATE_PORT)")
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def _exit_now(sig: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + sig)   # unwinds through `finally`, which stops the children


def _server(settings: Settings, app: Litestar, drain: DrainController) -> DrainingServer:
    """uvicorn as `tiergate serve` runs it: uvloop, httptools with header/body limits, drain on SIGTERM."""
    import uvicorn

    from router.drain import DrainingServer
    from router.http_limits import HttpLimits, protocol_class

    return DrainingServer(uvicorn.Config(
        app, host=settings.host, port=settings.port, loop="uvloop", log_level="warning",
        log_config=None,   # no dictConfig of uvicorn's: its loggers propagate to router/logs.py's JSON handler
        http=protocol_class(HttpLimits.from_settings(settings)),  # httptools + header/body limits
        timeout_keep_alive=settings.http_keep_alive_timeout_s,
        limit_concurrency=settings.http_limit_concurrency or None,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
        access_log=False, lifespan="on", timeout_graceful_shutdown=2), drain)


def _serve_worker(args: argparse.Namespace) -> int:
    """One of `--workers N`'s processes (router/workers.py): settings from the supervisor's environment."""
    from policies.schema import load_policy
    from router.app import create_app
    from router.drain import DrainController
    from router.logs import configure_logging
    from router.settings import Settings
    from router.workers import load_instances, worker_socket

    settings = Settings.from_env()
    configure_logging(settings.log_level)
    sock = worker_socket(args.worker_fd)
    drain = DrainController(settings.drain_grace_s, settings.drain_timeout_s)
    app = create_app(settings, policy=load_policy(settings.policy_path),
                     instance_urls=load_instances(args.worker_instances), watch_policy=True, drain=drain)
    server = _server(settings, app, drain)
    server.run(sockets=[sock])
    return 1 if server.force_exit else 0


def _serve(args: argparse.Namespace) -> int:
    from policies.schema import PolicyError, load_policy
    from router.app import create_app
    from router.drain import DrainController
    from router.logs import configure_logging, get_logger
    from router.settings import Settings
    from router.stack import EmbeddedStack

    if args.worker_fd is not None:
        return _serve_worker(args)
    settings = Settings.from_env(policy_path=args.policy, host=args.host, port=args.port, redis_url=args.redis_url,
                                 http_client=args.http_client, workers=args.workers)
    configure_logging(settings.log_level)
    if settings.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        policy = load_policy(settings.policy_path)
    except PolicyError as exc:
        print(f"policy error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = bind_listener(settings.host, settings.port)   # before any child: a busy port fails at once
    except OSError as exc:
        print(f"error: {_listen_error(settings.host, settings.port, exc)}", file=sys.stderr)
        return 1
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = EmbeddedStack(data_dir)   # its children die with this process, however it ends
    signal.signal(signal.SIGTERM, _exit_now)  # while children start; the server then takes the signals over
    drain = DrainController(settings.drain_grace_s, settings.drain_timeout_s)
    try:
        if settings.redis_url is None:
            settings.redis_url = stack.start_valkey()
        urls = stack.start_sims(policy, settings.host if settings.host != "0.0.0.0" else "127.0.0.1")
        get_logger("tiergate").info("listening", url=f"http://{settings.host}:{settings.port}",
                                    redis="embedded" if stack.valkey else "external",
                                    simulated_tiers=sorted(urls), children=stack.pids(), workers=settings.workers)
        if settings.workers > 1:
            return _supervise(settings, sock, urls)
        app = create_app(settings, policy=policy, instance_urls=urls, watch_policy=True, drain=drain)
        server = _server(settings, app, drain)
        server.run(sockets=[sock])
        return 1 if server.force_exit else 0
    except KeyboardInterrupt:   # Ctrl-C before the server took over its signals
        return 130
    finally:
        children = stack.pids()
        stack.stop()
        sock.close()
        get_logger("tiergate").info("stopped", children_stopped=children)


def _supervise(settings: Settings, sock: socket.socket, urls: dict[str, list[InstanceSpec]]) -> int:
    """Start `settings.workers` worker processes on `sock` and watch them until a signal (router/workers.py)."""
    from router.workers import WorkerPool

    sock.listen(2048)
    pool = WorkerPool(settings.workers, sock, settings, urls)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, pool.handle_signal)
    pool.start()
    pool.supervise()
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    from policies.engine import build_profiles
    from policies.schema import PolicyError, load_policy

    try:
        policy = load_policy(args.file)
        build_profiles(policy)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {args.file}: {len(policy.tiers)} tiers, {len(policy.routes)} models, "
          f"{len(policy.tenants)} tenants")
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from router.auth import hash_key, new_key

    key = new_key()
    print(f"key:    {key}")
    print(f"sha256: {hash_key(key)}")
    print(f"paste under tenants.{args.tenant}.key_sha256 in the policy file; the key is not stored anywhere.")
    return 0


def _sim(args: argparse.Namespace) -> int:
    from backends.sim.run import run_sim_cli

    run_sim_cli(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from backends.sim.run import add_sim_args

    p = argparse.ArgumentParser(prog="tiergate", description="OpenAI-compatible router for self-hosted LLM tiers")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the router (embedded valkey and simulated tiers by default)")
    s.add_argument("--policy", default=None, help="policy YAML (default: policies/examples/demo.yaml)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--redis-url", default=None, help="external Redis; default: start an embedded valkey-server")
    s.add_argument("--http-client", default=None, choices=["aiohttp", "httpx", "httpx-aiohttp"])
    s.add_argument("--workers", type=int, default=None,
                   help="router processes on the port, sharing Redis and the embedded stack (default 1)")
    s.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)   # router/workers.py
    s.add_argument("--worker-instances", default=None, help=argparse.SUPPRESS)
    s.set_defaults(fn=_serve)
    sim = sub.add_parser("sim", help="run one simulated vLLM instance")
    add_sim_args(sim)
    sim.set_defaults(fn=_sim)
    pol = sub.add_parser("policy", help="policy file tools")
    polsub = pol.add_subparsers(dest="policy_cmd", required=True)
    chk = polsub.add_parser("check", help="validate a policy file")
    chk.add_argument("file")
    chk.set_defaults(fn=_policy_check)
    from router.replay.cli import add_replay_args

    rp = sub.add_parser("replay", help="what would this policy do? replay a trace on virtual time")
    add_replay_args(rp)
    keys = sub.add_parser("keys", help="API keys")
    keysub = keys.add_subparsers(dest="keys_cmd", required=True)
    kn = keysub.add_parser("new", help="print a new key and its hash")
    kn.add_argument("--tenant", required=True)
    kn.set_defaults(fn=_keys_new)
    args = p.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
