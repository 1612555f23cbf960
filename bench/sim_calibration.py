"""Simulator calibration table: the engine model's figures next to the GPU measurements.

For each profile, on a virtual clock (no sleeping): prefill throughput at 1K/8K/32K
prompt tokens, decode step time at batch 1/8/32/128 with KV 1K and 8K, TTFT of a
short prompt at concurrency 1, and output tokens/s at concurrency 32. Beside them,
the bf16 H200 measurements from bench/results/gpu_calibration_h200.json (written
by bench/gpu_calibrate.py). Then the simulator's own speed: requests/s and
tokens/s one in-process instance serves on this machine's CPU over HTTP.

Usage: python bench/sim_calibration.py
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.sim.engine import Engine, SimRequest  # noqa: E402
from backends.sim.profile import get_profile, load_profiles  # noqa: E402

GPU = ROOT / "bench" / "results" / "gpu_calibration_h200.json"
GPU_MODEL = {"qwen3-1.7b-fp8": "qwen3-1.7b", "qwen3-4b-mixed": "qwen3-4b", "qwen3-4b-256k": "qwen3-4b"}


class VClock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def run(engine: Engine, clock: VClock, reqs: list[SimRequest]) -> None:
    while any(r.finish_reason is None for r in reqs):
        batch = engine.schedule()
        clock.t += engine.step_time(batch) or engine.profile.step_overhead_s
        engine.commit(batch)


def mk(n: int, out: int, seed: int) -> SimRequest:
    rng = random.Random(seed)
    return SimRequest(request_id=str(seed), prompt_ids=[rng.randrange(1000, 99999) for _ in range(n)],
                      target_len=out, length_capped=True, rng=random.Random(seed))


def engine(name: str) -> tuple[Engine, VClock]:
    c = VClock()
    return Engine(get_profile(name), clock=c), c


def prefill_tps(name: str, n: int) -> float:
    e, c = engine(name)
    r = mk(n, 1, 1)
    e.add(r)
    run(e, c, [r])
    assert r.first_token_at is not None
    return n / r.first_token_at


def decode_step_ms(name: str, batch: int, kv: int) -> float:
    e, _ = engine(name)
    fake = []
    for i in range(batch):
        r = mk(1, 1, i)
        r.prompt_ids = [1] * kv
        r.num_computed = kv
        fake.append((r, 1))
    return e.step_time(fake) * 1000


def short_ttft_ms(name: str) -> float:
    e, c = engine(name)
    r = mk(1000, 1, 5)
    e.add(r)
    run(e, c, [r])
    assert r.first_token_at is not None
    return r.first_token_at * 1000


def output_tps(name: str, conc: int, prompt: int = 1000, out: int = 256) -> float:
    e, c = engine(name)
    reqs = [mk(prompt, out, i) for i in range(conc)]
    for r in reqs:
        e.add(r)
    run(e, c, reqs)
    return conc * out / c.t


async def sim_speed(seconds: float = 4.0, conc: int = 32) -> tuple[float, float]:
    import aiohttp

    from backends.sim.run import start_sim

    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.001)
    body = {"model": sim.server.model, "max_tokens": 64, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "hello"}]}
    done = tokens = 0
    async with aiohttp.ClientSession() as s:
        stop = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal done, tokens
            while time.perf_counter() < stop:
                async with s.post(sim.url + "/v1/chat/completions",
                                  json={**body, "messages": [{"role": "user", "content": f"hello {i} {done}"}]}) as r:
                    await r.read()
                done += 1
                tokens += 64

        await asyncio.gather(*(worker(i) for i in range(conc)))
    await sim.close()
    return done / seconds, tokens / seconds


def main() -> None:
    gpu = json.loads(GPU.read_text()) if GPU.exists() else {}
    print(f"GPU reference: {gpu.get('device', 'n/a')} (torch {gpu.get('torch', '?')}), bf16 eager/SDPA\n")
    print("| profile | prefill tok/s 1K / 8K / 32K (sim) | GPU bf16 1K / 8K / 32K | TTFT 1K-token prompt c=1 ms |"
          " output tok/s c=32 (256 out) |")
    print("|---|---|---|---|---|")
    for name in load_profiles():
        sim = " / ".join(f"{prefill_tps(name, n) / 1000:.0f}K" for n in (1024, 8192, 32768))
        g = gpu.get(GPU_MODEL[name], {}).get("prefill", [])
        gtxt = " / ".join(f"{x['tokens_per_s'] / 1000:.0f}K" for x in g) or "n/a"
        print(f"| {name} | {sim} | {gtxt} | {short_ttft_ms(name):.1f} | {output_tps(name, 32):.0f} |")
    print("\n| profile | KV | decode step ms at batch 1 / 8 / 32 / 128 (sim) | GPU kernel-sum ms (bf16, HF SDPA) |")
    print("|---|---|---|---|")
    for name in load_profiles():
        for kv in (1024, 8192):
            sim = " / ".join(f"{decode_step_ms(name, b, kv):.2f}" for b in (1, 8, 32, 128))
            g = {(x["batch"], x["kv_len"]): x for x in gpu.get(GPU_MODEL[name], {}).get("decode", [])}
            gtxt = " / ".join(f"{g[(b, kv)]['kernel_s'] * 1000:.2f}" if "kernel_s" in g.get((b, kv), {}) else "-"
                              for b in (1, 8, 32, 128))
            print(f"| {name} | {kv} | {sim} | {gtxt} |")
    rps, tps = asyncio.run(sim_speed())
    print(f"\nSimulator speed, one in-process instance on one core (time_scale 0.001, streaming, 64 tokens/request,"
          f" c=32): {rps:.0f} requests/s, {tps:.0f} output tokens/s")


if __name__ == "__main__":
    main()
