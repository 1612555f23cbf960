"""Start simulator instances: in-process (tests, benches) or as `tiergate sim`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from backends.sim.faults import Faults
from backends.sim.kv_publisher import WIRE_FORMATS, KVEventPublisher, parse_kv_events_config
from backends.sim.profile import get_profile
from backends.sim.server import SimServer
from backends.tokenization import TierTokenizer, TokenizerCache


@dataclass
class RunningSim:
    server: SimServer
    runner: web.AppRunner
    url: str

    async def close(self) -> None:
        await self.runner.cleanup()


def _nodelay_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


_TOKENIZERS = TokenizerCache()


async def start_sim(profile: str, *, host: str = "127.0.0.1", port: int = 0, time_scale: float = 1.0,
                    num_gpu_blocks: int | None = None, served_model_name: str | None = None,
                    faults: Faults | None = None, tokenizer: TierTokenizer | None = None,
                    instance_id: str = "sim", kv_events: tuple[str, str] | None = None,
                    kv_events_format: str = "current", api_keys: tuple[str, ...] = (),
                    **overrides: object) -> RunningSim:
    """Start one simulated vLLM server; `kv_events` = (ZMQ endpoint, topic) to publish KV events in
    `kv_events_format`: current (vLLM after 0.26), v0.26 or legacy (backends/kv_events.py)."""
    prof = get_profile(profile, **overrides)
    tok = tokenizer or _TOKENIZERS.get(None)
    server = SimServer(prof, tok, served_model_name=served_model_name, num_gpu_blocks=num_gpu_blocks,
                       time_scale=time_scale, faults=faults, instance_id=instance_id, api_keys=api_keys)
    if kv_events is not None:
        server.publish_kv_events(KVEventPublisher(*kv_events, wire_format=kv_events_format))
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    sock = _nodelay_socket(host, port)
    site = web.SockSite(runner, sock)
    await site.start()
    bound = sock.getsockname()[1]
    return RunningSim(server=server, runner=runner, url=f"http://{host}:{bound}")


@contextlib.asynccontextmanager
async def running_sim(profile: str, **kw: object) -> AsyncIterator[RunningSim]:
    sim = await start_sim(profile, **kw)  # type: ignore[arg-type]
    try:
        yield sim
    finally:
        await sim.close()


def add_sim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="qwen3-1.7b-fp8 | qwen3-4b-mixed | qwen3-4b-256k")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--time-scale", type=float, default=1.0, help="simulated seconds -> wall seconds")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--error-status", type=int, default=500)
    p.add_argument("--rate-limit-rate", type=float, default=0.0)
    p.add_argument("--retry-after", type=int, default=1)
    p.add_argument("--hang-before-headers", type=float, default=0.0, help="seconds to sleep before any header")
    p.add_argument("--hang-after-headers", type=float, default=0.0,
                   help="streams: seconds to sleep after the 200 and its headers, before the first event")
    p.add_argument("--stall-between-chunks", type=float, default=0.0, help="seconds to sleep between chunks")
    p.add_argument("--stall-at-chunk", type=int, default=0,
                   help="N > 0: the stall happens once, before chunk N, instead of between every chunk")
    p.add_argument("--cut-after-chunks", type=int, default=0)
    p.add_argument("--malformed", default="", choices=["", "json", "sse"],
                   help="json: a truncated body; sse: a broken event after the first")
    p.add_argument("--fail-on-input", default="", metavar="SUBSTRING",
                   help="answer 500 to any request whose body contains SUBSTRING (a query of death)")
    p.add_argument("--slow-start", type=float, default=0.0)
    p.add_argument("--api-key", action="append", default=None,
                   help="require `Authorization: Bearer KEY` as vLLM does (repeatable; default: $VLLM_API_KEY)")
    p.add_argument("--kv-events-config", default=None,
                   help='vLLM\'s JSON, e.g. {"enable_kv_cache_events": true, "publisher": "zmq", '
                        '"endpoint": "tcp://*:5557", "topic": "kv-events"}')
    p.add_argument("--kv-events-format", default="current", choices=WIRE_FORMATS,
                   help="KV-event msgpack form: current (map batch of maps, vLLM after 0.26), "
                        "v0.26 (array batch of maps) or legacy (arrays, vLLM before 0.26)")


def run_sim_cli(args: argparse.Namespace) -> None:
    faults = Faults(error_rate=args.error_rate, error_status=args.error_status,
                    rate_limit_rate=args.rate_limit_rate, retry_after_s=args.retry_after,
                    hang_before_headers_s=args.hang_before_headers, hang_after_headers_s=args.hang_after_headers,
                    stall_between_chunks_s=args.stall_between_chunks, stall_at_chunk=args.stall_at_chunk,
                    cut_after_chunks=args.cut_after_chunks, malformed=args.malformed,
                    fail_on_input=args.fail_on_input, slow_start_s=args.slow_start)
    faults.validate()

    async def main() -> None:
        sim = await start_sim(args.profile, host=args.host, port=args.port, time_scale=args.time_scale,
                              num_gpu_blocks=args.num_gpu_blocks_override,
                              served_model_name=args.served_model_name, faults=faults,
                              max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens,
                              kv_events=parse_kv_events_config(args.kv_events_config),
                              kv_events_format=args.kv_events_format,
                              api_keys=tuple(args.api_key or [k for k in [os.environ.get("VLLM_API_KEY")] if k]))
        print(f"tiergate sim {args.profile} serving {sim.server.model} on {sim.url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await sim.close()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
