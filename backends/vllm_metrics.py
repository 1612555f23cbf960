"""Live signals from a vLLM server's /metrics: a pure parser and a lifespan-owned scraper.

`parse_vllm_metrics` reads the Prometheus text vLLM exposes and keeps what routing
needs, summed over label sets (one server may label by model and engine):
running and waiting requests, KV-cache usage (`kv_cache_usage_perc`, or the older
`gpu_cache_usage_perc`), prefix-cache queries and hits, prompt tokens, the TTFT
histogram's sum and count, and `num_gpu_blocks` from `cache_config_info`. It never
raises: lines it does not understand are skipped.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass

from backends.http_client import UpstreamClient, UpstreamConnectError
from backends.registry import InstanceState, Registry

_SAMPLE = re.compile(r"^(vllm:[a-zA-Z_:]+?)(?:\{([^}]*)\})?\s+(\S+)")
_GPU_BLOCKS = re.compile(r'num_gpu_blocks="(\d+)"')


@dataclass
class InstanceSignals:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0                 # 0..1
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0
    prompt_tokens: float = 0.0
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    num_gpu_blocks: int | None = None


_FIELDS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
    "vllm:prefix_cache_queries_total": "prefix_queries",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:time_to_first_token_seconds_sum": "ttft_sum",
    "vllm:time_to_first_token_seconds_count": "ttft_count",
}


_WANTED = (*_FIELDS, "vllm:cache_config_info")   # a line is matched only if it starts with one of these


def parse_vllm_metrics(text: str) -> InstanceSignals:
    sig = InstanceSignals()
    for line in text.splitlines():
        if not line.startswith(_WANTED):   # histogram buckets and the rest: skipped before the regex
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, raw = m.groups()
        if name == "vllm:cache_config_info":
            g = _GPU_BLOCKS.search(labels or "")
            if g is not None and int(g.group(1)) > 0:
                sig.num_gpu_blocks = int(g.group(1))
            continue
        field = _FIELDS.get(name)
        if field is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if math.isnan(value) or math.isinf(value):
            continue
        setattr(sig, field, getattr(sig, field) + value)
    return sig


async def scrape_once(client: UpstreamClient, registry: Registry, timeout_s: float = 1.0) -> None:
    async def one(inst: InstanceState) -> None:
        try:
            status, body = await client.get(inst.url + "/metrics", timeout_s)
        except UpstreamConnectError:
            return
        if status != 200:
            return
        sig = parse_vllm_metrics(body.decode("utf-8", "replace"))
        inst.running, inst.waiting, inst.kv_usage = sig.running, sig.waiting, sig.kv_usage
        inst.scraped_at = registry.clock()
        if inst.kv_capacity_blocks is None and sig.num_gpu_blocks:
            inst.kv_capacity_blocks = sig.num_gpu_blocks

    await asyncio.gather(*(one(i) for i in registry.all_instances()))


def quiet(registry: Registry) -> bool:
    """Nothing running or waiting on any engine as last scraped, and nothing in flight from any router."""
    return all(not (i.running or i.waiting or i.in_flight or i.peer_in_flight) for i in registry.all_instances())


def next_interval(current: float, base: float, idle_max: float, is_quiet: bool) -> float:
    """The scrape pace: `base` while the fleet is busy; each quiet scrape doubles the wait, up to `idle_max`
    (`max(base, idle_max)`). So an idle router scrapes every `idle_max` seconds, and the scrape after traffic
    starts (at most `idle_max` later; the router's own and its peers' in-flight counts carry the load
    meanwhile) brings the pace back to `base`."""
    return min(max(current * 2, base), max(base, idle_max)) if is_quiet else base


async def scrape_forever(client: UpstreamClient, registry: Registry, interval_s: float,
                         idle_max_s: float = 5.0) -> None:
    wait = interval_s
    while True:
        await scrape_once(client, registry)
        wait = next_interval(wait, interval_s, idle_max_s, quiet(registry))
        await asyncio.sleep(wait)
