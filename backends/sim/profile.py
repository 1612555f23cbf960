"""Simulator profiles: data (profiles.yaml), each value with its source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import yaml

PROFILES_FILE = Path(__file__).with_name("profiles.yaml")


class SimProfile(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    model: str
    max_model_len: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    chunked_prefill: bool
    kv_bytes_per_token: int
    kv_cache_bytes: int
    prefill_tokens_per_s: float
    prefill_attn_s_per_token_ctx: float
    decode_weight_read_s: float
    decode_per_seq_s: float
    hbm_bytes_per_s: float
    step_overhead_s: float
    output_len_mean: float
    output_len_sigma: float
    sources: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def num_gpu_blocks(self) -> int:
        return max(1, self.kv_cache_bytes // (self.kv_bytes_per_token * self.block_size))


def time_scaled(prof: SimProfile, scale: float) -> SimProfile:
    """The profile of a GPU `scale` times slower: every term of `Engine.step_time` (backends/sim/engine.py)
    is one of these constants times a count, so a step takes exactly `scale` times as long, as the live
    simulator's `--time-scale` makes it sleep."""
    if scale == 1.0:
        return prof
    if not scale > 0:
        raise ValueError("time scale must be > 0")
    return msgspec.structs.replace(
        prof, name=f"{prof.name}@x{scale:g}", prefill_tokens_per_s=prof.prefill_tokens_per_s / scale,
        prefill_attn_s_per_token_ctx=prof.prefill_attn_s_per_token_ctx * scale,
        decode_weight_read_s=prof.decode_weight_read_s * scale, decode_per_seq_s=prof.decode_per_seq_s * scale,
        hbm_bytes_per_s=prof.hbm_bytes_per_s / scale, step_overhead_s=prof.step_overhead_s * scale)


def load_profiles(path: Path = PROFILES_FILE) -> dict[str, SimProfile]:
    raw = yaml.safe_load(path.read_text())
    out: dict[str, SimProfile] = {}
    for name, fields in raw.items():
        values: dict[str, Any] = {"name": name}
        sources: dict[str, str] = {}
        for key, val in fields.items():
            if isinstance(val, dict) and "value" in val:
                values[key] = val["value"]
                sources[key] = str(val.get("source", "unstated"))
            else:
                values[key] = val
        values["sources"] = sources
        out[name] = msgspec.convert(values, SimProfile, strict=False)
    return out


def get_profile(name: str, **overrides: Any) -> SimProfile:
    profiles = load_profiles()
    if name not in profiles:
        raise KeyError(f"unknown simulator profile {name!r}; known: {', '.join(sorted(profiles))}")
    prof = profiles[name]
    clean = {k: v for k, v in overrides.items() if v is not None}
    return msgspec.structs.replace(prof, **clean) if clean else prof
