"""GPU calibration for the simulator's Qwen3 profiles (run on an H100/H200).

Builds random-weight models with Qwen3-1.7B's and Qwen3-4B's exact shapes from
their configs (transformers' Qwen3Config, written out here because the machine
has no network), then measures:

* prefill throughput (tokens/s) at 1K, 8K and 32K prompt tokens, bf16, SDPA;
* decode step time at batch 1, 8, 32, 128 with KV lengths 1K and 8K, as the
  sum of GPU kernel times of one step (what a CUDA-graph replay costs, without
  Python launch gaps), measured with torch.profiler;
* the FP8 (e4m3, torch._scaled_mm) over bf16 GEMM speedup at the models' MLP
  shapes, which the fp8 profiles use to scale the linear part of step time.

Prints one JSON document; `bench/sim_calibration.py` and BENCHMARKS.md use it.
Usage: python bench/gpu_calibrate.py > calib.json
"""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

SHAPES = {
    # From the models' published config.json files.
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
                       rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=262144,
                     rope_theta=5000000.0, rms_norm_eps=1e-6),
}


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def kernel_time(fn, reps: int = 3) -> float:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            total_us += evt.device_time
    return total_us / reps / 1e6


def build(name: str) -> Qwen3ForCausalLM:
    cfg = Qwen3Config(**SHAPES[name], attn_implementation="sdpa", torch_dtype=torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


@torch.inference_mode()
def prefill(model: Qwen3ForCausalLM, n: int) -> dict[str, float]:
    ids = torch.randint(0, 150000, (1, n), device="cuda")
    dt = timed(lambda: model(input_ids=ids, logits_to_keep=1, use_cache=False), 3)
    return {"tokens": n, "seconds": dt, "tokens_per_s": n / dt}


@torch.inference_mode()
def decode(model: Qwen3ForCausalLM, batch: int, kv: int) -> dict[str, float]:
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=kv + 1, max_batch_size=batch)
    ids = torch.randint(0, 150000, (batch, 1), device="cuda")
    pos = torch.tensor([kv], device="cuda")

    def step() -> None:
        model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True, logits_to_keep=1)

    wall = timed(step, 5)
    gpu = kernel_time(step)
    torch.cuda.empty_cache()
    return {"batch": batch, "kv_len": kv, "kernel_s": gpu, "eager_wall_s": wall}


@torch.inference_mode()
def fp8_gemm_speedup(m: int, k: int, n: int) -> dict[str, float]:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bf = timed(lambda: a @ b.t(), 20)
    out: dict[str, float] = {"m": m, "k": k, "n": n, "bf16_s": bf}
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t()
        one = torch.tensor(1.0, device="cuda")
        f8 = timed(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 20)
        out["fp8_s"] = f8
        out["speedup"] = bf / f8
    except Exception as exc:
        out["fp8_error"] = repr(exc)[:200]
    return out


def main() -> None:
    result: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    result["transformers"] = transformers.__version__
    for name in SHAPES:
        log("model", name)
        model = build(name)
        entry: dict[str, object] = {"prefill": [], "decode": []}
        for n in (1024, 8192, 32768):
            entry["prefill"].append(prefill(model, n))  # type: ignore[union-attr]
            log(" prefill", n, entry["prefill"][-1])  # type: ignore[index]
        for kv in (1024, 8192):
            for b in (1, 8, 32, 128):
                kv_bytes = 2 * model.config.num_hidden_layers * 8 * 128 * 2 * (kv + 1) * b
                if kv_bytes > 40e9:
                    entry["decode"].append({"batch": b, "kv_len": kv, "skipped": "KV > 40 GB"})  # type: ignore[union-attr]
                    continue
                try:
                    entry["decode"].append(decode(model, b, kv))  # type: ignore[union-attr]
                except Exception as exc:
                    entry["decode"].append({"batch": b, "kv_len": kv, "error": repr(exc)[:300]})  # type: ignore[union-attr]
                log(" decode", entry["decode"][-1])  # type: ignore[index]
        h = SHAPES[name]["hidden_size"]
        i = SHAPES[name]["intermediate_size"]
        entry["fp8_gemm"] = [fp8_gemm_speedup(m, h, 2 * i) for m in (128, 8192)]
        log(" fp8", entry["fp8_gemm"])
        result[name] = entry
        del model
        torch.cuda.empty_cache()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
