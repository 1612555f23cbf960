"""`tiergate replay`'s output: one column per policy, side by side (rich table), or JSON.

Both come from `Results.summary()` only, so they hold no wall-clock figure, and two runs with the same
trace, policies and options print the same bytes.
"""

from __future__ import annotations

import io
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table


def to_json(runs: dict[str, dict[str, Any]], meta: dict[str, Any]) -> bytes:
    return msgspec.json.format(msgspec.json.encode({"meta": meta, "policies": runs}), indent=2) + b"\n"


def _f(x: Any, fmt: str = "{:.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def rows(runs: dict[str, dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(label, one cell per policy) for every figure any policy has."""
    names = list(runs)
    out: list[tuple[str, list[str]]] = []

    def row(label: str, get: Any) -> None:
        out.append((label, [get(runs[n]) for n in names]))

    row("requests served", lambda s: f"{s['served']:,} / {s['requests']:,}")
    row("USD per 1M tokens", lambda s: _f(s["usd_per_1m_tokens"], "{:.6f}"))
    row("USD (tokens)", lambda s: _f(s["usd"], "{:.4f}"))
    row("USD on the baseline tier (where it fits)",
        lambda s: f"{_f(s['baseline_usd'], '{:.4f}')} vs {_f(s['baseline_comparable_usd'], '{:.4f}')}, "
                  f"{s['baseline_no_alternative']:,} no alternative")
    row("prefix cache hit", lambda s: _pct(s["cache_hit"]))
    row("makespan (virtual s)", lambda s: _f(s["makespan_s"], "{:.1f}"))
    gpu_tiers = sorted({t for s in runs.values() for t in s["gpu"]})
    for t in gpu_tiers:
        row(f"GPU-s {t} (busy / provisioned)",
            lambda s, t=t: f"{s['gpu'][t]['busy_s']:,.0f} / {s['gpu'][t]['provisioned_s']:,.0f}" if t in s["gpu"]
            else "-")
        row(f"GPU USD {t}", lambda s, t=t: _f(s["gpu"][t]["usd"], "{:.4f}") if t in s["gpu"] else "-")
    classes = sorted({c for s in runs.values() for c in s["slo"]})
    for c in classes:
        def cls(s: dict[str, Any], key: str, c: str = c) -> Any:
            return s["slo"].get(c, {}).get(key)
        row(f"{c}: requests", lambda s, c=c: f"{cls(s, 'requests', c) or 0:,}")
        row(f"{c}: TTFT attainment", lambda s, c=c: _pct(cls(s, "ttft_attainment", c)))
        row(f"{c}: TPOT attainment", lambda s, c=c: _pct(cls(s, "tpot_attainment", c)))
        row(f"{c}: TTFT p50 / p99 (s)", lambda s, c=c: f"{_f(cls(s, 'ttft_p50_s', c), '{:.3f}')} / "
                                                        f"{_f(cls(s, 'ttft_p99_s', c), '{:.3f}')}")
    for t in sorted({t for s in runs.values() for t in s["tiers"]}):
        row(f"requests on {t}", lambda s, t=t: f"{s['tiers'].get(t, 0):,}")
        row(f"{t}: USD / cache hit", lambda s, t=t: (f"{s['tier_usd'].get(t, 0):.4f} / "
                                                     f"{(s['tier_cache_hit'].get(t) or 0) * 100:.1f}%"))
    if any("queue" in s for s in runs.values()):
        row("queued: released / bypassed / shed", lambda s: "-" if "queue" not in s else
            f"{s['queue'].get('released', 0):,} / {s['queue'].get('bypassed', 0):,} / {s['queue'].get('shed', 0):,}")
        row("queue wait p50 / p99 (s)", lambda s: "-" if "queue" not in s else
            f"{_f(s['queue']['wait_p50_s'], '{:.3f}')} / {_f(s['queue']['wait_p99_s'], '{:.3f}')}")
    for t in sorted({t for s in runs.values() for t in s["tenants_usd"]}):
        row(f"bill {t} (USD)", lambda s, t=t: _f(s["tenants_usd"].get(t), "{:.4f}"))
    for k in sorted({k for s in runs.values() for k in s["refused"]}):
        row(f"refused {k}", lambda s, k=k: f"{s['refused'].get(k, 0):,}")
    return out


def to_table(runs: dict[str, dict[str, Any]], title: str) -> str:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for name in runs:
        table.add_column(name, justify="right")
    for label, cells in rows(runs):
        table.add_row(label, *cells)
    buf = io.StringIO()
    Console(file=buf, width=max(100, 34 + 24 * len(runs)), color_system=None, force_terminal=False).print(table)
    return buf.getvalue()
