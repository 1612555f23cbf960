"""`tiergate cost`: per-token prices from a GPU's price per hour and its measured throughput (issue #17).

The formula (what the command prints, and what it computes):

    price per output token = price_per_hour / (3600 s x output_tokens_per_s x utilization)
    price per input token  = price_per_hour / (3600 s x input_tokens_per_s x utilization)
                             (without --input-tokens-per-s: the output price x --input-fraction, default 0.25)
    price per cached token = the input price x --cached-fraction (default 0.2)

`output_tokens_per_s` is the GPU's aggregate decode throughput at the batch you mean to run (every request's
tokens together); `utilization` (0, 1] is the share of the paid hours it spends serving at that batch. The
price per hour is whatever you pay for the GPU (rental, or power plus depreciation) in any currency; the
policy's `prices` are USD per 1M tokens (policies/schema.py `Prices`), so a price in another currency needs
--usd-per-unit (USD for one unit of it) before the line is pasted. The prices cover the GPU only: the ratio
of two configurations' prices is the ratio of their throughputs unless each is given its own price per hour
(a configuration that draws less power costs less per hour; tiergate knows only the price it is given).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class CostInputs:
    price_per_hour: float
    tokens_per_s: float
    utilization: float = 1.0
    input_tokens_per_s: float | None = None
    input_fraction: float = 0.25
    cached_fraction: float = 0.2
    currency: str = "USD"
    usd_per_unit: float | None = None     # None: 1.0 for USD, unknown for any other currency


@dataclass(frozen=True)
class CostPrices:
    """Prices per 1M tokens in the given currency."""

    input: float
    cached_input: float
    output: float


def per_million(price_per_hour: float, tokens_per_s: float, utilization: float) -> float:
    return price_per_hour / (3600.0 * tokens_per_s * utilization) * 1e6


def prices(c: CostInputs) -> CostPrices:
    out = per_million(c.price_per_hour, c.tokens_per_s, c.utilization)
    inp = out * c.input_fraction if c.input_tokens_per_s is None else \
        per_million(c.price_per_hour, c.input_tokens_per_s, c.utilization)
    return CostPrices(input=inp, cached_input=inp * c.cached_fraction, output=out)


def num(x: float) -> str:
    """A price as the policy keeps it (to 1e-4 per 1M tokens), without trailing zeros."""
    s = f"{x:.4f}".rstrip("0").rstrip(".")
    return s if s not in ("", "-0") else "0"


def render(c: CostInputs) -> str:
    p = prices(c)
    cur = c.currency
    rate = c.usd_per_unit if c.usd_per_unit is not None else (1.0 if cur.upper() == "USD" else None)
    src = (f"= {c.price_per_hour:g} / (3600 x {c.input_tokens_per_s:g} x {c.utilization:g}) x 1e6"
           if c.input_tokens_per_s is not None else f"= output price x {c.input_fraction:g} (--input-fraction; "
                                                     "no --input-tokens-per-s given)")
    lines = [
        "formula: price per output token = price_per_hour / (3600 s x output_tokens_per_s x utilization)",
        "         price per input token  = price_per_hour / (3600 s x input_tokens_per_s x utilization),",
        "                                  or the output price x --input-fraction without a prefill rate",
        "         price per cached token = input price x --cached-fraction",
        f"inputs:  {c.price_per_hour:g} {cur}/h, {c.tokens_per_s:g} output tokens/s at the target batch, "
        f"utilization {c.utilization:g}",
        f"output:       {p.output:.6f} {cur} per 1M tokens = {c.price_per_hour:g} / (3600 x {c.tokens_per_s:g} x "
        f"{c.utilization:g}) x 1e6",
        f"input:        {p.input:.6f} {cur} per 1M tokens {src}",
        f"cached_input: {p.cached_input:.6f} {cur} per 1M tokens = input x {c.cached_fraction:g}",
    ]
    if rate is None:
        lines.append(f"# the policy's prices are USD per 1M tokens: pass --usd-per-unit (USD per 1 {cur}) to "
                     "convert; the line below is in " + cur)
        rate, unit = 1.0, cur
    else:
        unit = "USD"
    lines.append(f"prices: {{input: {num(p.input * rate)}, cached_input: {num(p.cached_input * rate)}, "
                 f"output: {num(p.output * rate)}}}   # {unit} per 1M tokens")
    return "\n".join(lines) + "\n"


def add_cost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu-price-per-hour", type=float, required=True,
                   help="what one GPU costs per hour (rental, or power plus depreciation)")
    p.add_argument("--currency", default="USD", help="the price's currency label (default USD)")
    p.add_argument("--usd-per-unit", type=float, default=None,
                   help="USD for one unit of --currency (the policy's prices are USD)")
    p.add_argument("--tokens-per-s", type=float, required=True,
                   help="output tokens per second the GPU produces at the target batch (all requests together)")
    p.add_argument("--utilization", type=float, default=1.0, help="share of paid hours spent serving, (0, 1]")
    p.add_argument("--input-tokens-per-s", type=float, default=None, help="prefill rate (prompt tokens/s)")
    p.add_argument("--input-fraction", type=float, default=0.25,
                   help="input price as a fraction of the output price when no prefill rate is given")
    p.add_argument("--cached-fraction", type=float, default=0.2, help="cached input price / input price")


def inputs(args: argparse.Namespace) -> CostInputs:
    """The parsed arguments, checked: ValueError names the first bad one."""
    positive = {"--gpu-price-per-hour": args.gpu_price_per_hour, "--tokens-per-s": args.tokens_per_s,
                "--input-tokens-per-s": args.input_tokens_per_s, "--usd-per-unit": args.usd_per_unit}
    for name, v in positive.items():
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0")
    if not 0 < args.utilization <= 1:
        raise ValueError("--utilization must be in (0, 1]")
    for name, v in (("--input-fraction", args.input_fraction), ("--cached-fraction", args.cached_fraction)):
        if not v >= 0:
            raise ValueError(f"{name} must be >= 0")
    return CostInputs(price_per_hour=args.gpu_price_per_hour, tokens_per_s=args.tokens_per_s,
                      utilization=args.utilization, input_tokens_per_s=args.input_tokens_per_s,
                      input_fraction=args.input_fraction, cached_fraction=args.cached_fraction,
                      currency=args.currency, usd_per_unit=args.usd_per_unit)
