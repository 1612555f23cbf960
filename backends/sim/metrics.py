"""Prometheus text exposition of the simulator's engine, with vLLM's metric names."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from backends.sim.engine import Engine

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe_many(self, values: Iterable[float]) -> None:
        for v in values:
            self.counts[bisect_left(self.buckets, v)] += 1
            self.sum += v
            self.count += 1

    def render(self, name: str, labels: str) -> list[str]:
        lines = []
        acc = 0
        for le, c in zip(self.buckets, self.counts, strict=False):
            acc += c
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {acc}')
        lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum{{{labels}}} {self.sum}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


class EngineMetrics:
    """Accumulates an engine's observations and renders vLLM's /metrics page."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.labels = f'engine="0",model_name="{model_name}"'
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.queue = Histogram(E2E_BUCKETS)

    def render(self) -> str:
        eng = self.engine
        ttft, itl, e2e, queue = eng.stats.drain()
        self.ttft.observe_many(ttft)
        self.itl.observe_many(itl)
        self.e2e.observe_many(e2e)
        self.queue.observe_many(queue)
        lb = self.labels
        st = eng.stats
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            # prometheus_client writes counters' HELP/TYPE under the _total name, as vLLM's page shows
            shown = name + "_total" if kind == "counter" else name
            out.append(f"# HELP {shown} {help_}")
            out.append(f"# TYPE {shown} {kind}")
            out.extend(samples)

        metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
               [f"vllm:num_requests_running{{{lb}}} {len(eng.running)}"])
        metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
               [f"vllm:num_requests_waiting{{{lb}}} {len(eng.waiting)}"])
        metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
               [f"vllm:kv_cache_usage_perc{{{lb}}} {eng.kv.usage}"])
        metric("vllm:num_preemptions", "counter", "Cumulative number of preemption from the engine.",
               [f"vllm:num_preemptions_total{{{lb}}} {st.preemptions}"])
        metric("vllm:prefix_cache_queries", "counter",
               "Prefix cache queries, in terms of number of queried tokens.",
               [f"vllm:prefix_cache_queries_total{{{lb}}} {st.prefix_queries}"])
        metric("vllm:prefix_cache_hits", "counter", "Prefix cache hits, in terms of number of cached tokens.",
               [f"vllm:prefix_cache_hits_total{{{lb}}} {st.prefix_hits}"])
        metric("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.",
               [f"vllm:prompt_tokens_total{{{lb}}} {st.prompt_tokens}"])
        metric("vllm:generation_tokens", "counter", "Number of generation tokens processed.",
               [f"vllm:generation_tokens_total{{{lb}}} {st.generation_tokens}"])
        metric("tiergate_sim:delivered_generation_tokens", "counter",
               "Generated tokens written to clients (not vLLM's; aborted requests may strand a few).",
               [f"tiergate_sim:delivered_generation_tokens_total{{{lb}}} {st.delivered_tokens}"])
        metric("vllm:request_success", "counter", "Count of successfully processed requests.",
               [f'vllm:request_success_total{{{lb},finished_reason="{r}"}} {n}'
                for r, n in sorted(st.success.items())])
        metric("vllm:time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.",
               self.ttft.render("vllm:time_to_first_token_seconds", lb))
        metric("vllm:inter_token_latency_seconds", "histogram", "Histogram of inter-token latency in seconds.",
               self.itl.render("vllm:inter_token_latency_seconds", lb))
        metric("vllm:e2e_request_latency_seconds", "histogram",
               "Histogram of e2e request latency in seconds.",
               self.e2e.render("vllm:e2e_request_latency_seconds", lb))
        metric("vllm:request_queue_time_seconds", "histogram",
               "Histogram of time spent in WAITING phase for request.",
               self.queue.render("vllm:request_queue_time_seconds", lb))
        metric("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig",
               [f'vllm:cache_config_info{{block_size="{eng.profile.block_size}",'
                f'num_gpu_blocks="{eng.kv.num_blocks}",'
                f'enable_prefix_caching="{eng.kv.enable_prefix_caching}"}} 1.0'])
        return "\n".join(out) + "\n"
