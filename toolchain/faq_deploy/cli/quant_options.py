"""The quantization options of quantize, eval and build, declared once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from faq_deploy.data import Calibration
from faq_deploy.quant import METHODS, make_config
from faq_deploy.quant.awq import PROPAGATE, AwqConfig
from faq_deploy.quant.faq import FUTURE_STATS, LAST_BLOCKS, OBJECTIVES, SCOPES, WINDOW_WEIGHTS, FaqConfig
from faq_deploy.quant.gguf import FIVE_BIT_FORMS
from faq_deploy.quant.scheme import ROUNDINGS, MethodConfig, QuantScheme

DEFAULT_SCHEME = (4, 32)  # bits, group size
METHOD_HELP = ("Quantization method: rtn, awq or faq quantize the float weights; gguf keeps a GGUF model's own "
               "quantized blocks exactly (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K; --bits/--group then only "
               "apply to tensors of other types, re-quantized by RTN).")
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _stack(*decorators: Decorator) -> Decorator:
    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


def method_option(default: str | None, help: str) -> Decorator:
    return click.option("--method", "method", type=click.Choice(sorted(METHODS)), default=default,
                        show_default=True, help=help)


# Method knobs default to None, meaning "the method's own default" (see quant/awq.py, quant/faq.py).
quant_options = _stack(
    click.option("--bits", type=int, default=None,
                 help="Bits per weight: 2, 3, 4, 5 or 8 (5: a 4-bit and a 2-bit node) "
                      f"[default: {DEFAULT_SCHEME[0]}, or the target's for build]."),
    click.option("--group", "group_size", type=int, default=None,
                 help=f"Input channels per quantization group, a power of two ≥ 16 [default: {DEFAULT_SCHEME[1]}, "
                      "or the target's for build]."),
    click.option("--symmetric", is_flag=True, help="Symmetric codes instead of an integer zero point."),
    click.option("--rounding", type=click.Choice(ROUNDINGS), default=None,
                 help="How codes are chosen on the method's grid: nearest, or GPTQ's error-compensating rounding "
                      "against the calibration inputs (any method; rtn then needs calibration too) "
                      f"[default: {FaqConfig.rounding} for faq, nearest for awq and rtn]."),
    click.option("--damp", type=float, default=None,
                 help=f"gptq: fraction of the Hessian's mean diagonal added to it [default: {MethodConfig.damp}]."),
    click.option("--act-order/--no-act-order", default=None,
                 help="gptq: round the input columns of largest energy first [default: off]."),
    click.option("--budget", type=click.FloatRange(min=1), default=None, metavar="MB",
                 help="Mixed precision: give the most sensitive Linears 8-bit codes (blocks of 128 or --group) so "
                      "that the exported weight files (model.onnx and its data) fill MB megabytes with the least "
                      "estimated loss; sensitivity from the calibration text [default: every Linear in --bits]."),
    click.option("--five-bit", type=click.Choice(FIVE_BIT_FORMS), default=None,
                 help="gguf: 5-bit blocks (Q5_0, Q5_1, Q5_K) in one 8-bit node (8.5 bits a weight), or as planes, "
                      "a 4-bit and a 2-bit node (7 bits: smaller, slower, CPU graphs only) [default: 8bit]."),
    click.option("--calib", "calib_text", default="speeches-calib", show_default=True, metavar="TEXT",
                 help="awq/faq/gptq: calibration text (same forms as --text)."),
    click.option("--samples", type=click.IntRange(min=1), default=32, show_default=True,
                 help="awq/faq/gptq: calibration rows."),
    click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True,
                 help="awq/faq/gptq: tokens per calibration row."),
    click.option("--seed", type=int, default=0, show_default=True, help="awq/faq/gptq: calibration sampling seed."),
    click.option("--search-rows", type=int, default=None,
                 help="awq/faq: rows the scale search scores candidates on "
                      f"[default: {AwqConfig.search_rows} for awq, {FaqConfig.search_rows} for faq]."),
    click.option("--coarse", type=int, default=None,
                 help="awq/faq: score every Nth of the 20 ratios, then the ratios around the best; 1 scores all "
                      f"[default: {AwqConfig.coarse} for awq, {FaqConfig.coarse} for faq]."),
    click.option("--reach", type=int, default=None,
                 help="awq/faq: how many ratios on each side of the best coarse one the fine step scores; 0 goes "
                      f"up to the next coarse ratio [default: {AwqConfig.reach} for awq, {FaqConfig.reach} for faq]."),
    click.option("--clip/--no-clip", default=None, help="awq/faq: AWQ auto-clip [default: on]."),
    click.option("--alpha-search/--no-alpha-search", default=None,
                 help="awq/faq: search the scale ratio per group, or take --ratio everywhere [default: search]."),
    click.option("--ratio", type=float, default=None,
                 help=f"awq/faq: the fixed ratio r (0…1) with --no-alpha-search [default: {FaqConfig.ratio}]."),
    click.option("--propagate", type=click.Choice(PROPAGATE), default=None,
                 help="awq/faq: what the next block sees, the FP output (AutoAWQ) or the quantized block's "
                      f"[default: {FaqConfig.propagate}]."),
    click.option("--gamma", type=float, default=None,
                 help=f"faq: weight of the future profile, 0 = AWQ [default: {FaqConfig.gamma}, pre-searched]."),
    click.option("--window", type=int, default=None,
                 help=f"faq: future blocks previewed [default: {FaqConfig.window}, pre-searched]."),
    click.option("--window-weights", type=click.Choice(WINDOW_WEIGHTS), default=None,
                 help=f"faq: weights over the window [default: {FaqConfig.window_weights}]."),
    click.option("--rho", type=float, default=None,
                 help=f"faq: ratio of geometric window weights [default: {FaqConfig.rho}]."),
    click.option("--scope", type=click.Choice(SCOPES), default=None,
                 help=f"faq: residual (groups fed by the residual stream) or all [default: {FaqConfig.scope}]."),
    click.option("--last-blocks", type=click.Choice(LAST_BLOCKS), default=None,
                 help="faq: near the end, truncate the window, or take the final norm's input as one more "
                      f"future layer [default: {FaqConfig.last_blocks}]."),
    click.option("--future-stats", type=click.Choice(FUTURE_STATS), default=None,
                 help="faq: future statistics from the FP pre-pass, or (with --propagate quant) measured from the "
                      f"quantized prefix through the FP blocks ahead [default: {FaqConfig.future_stats}]."),
    click.option("--objective", type=click.Choice(OBJECTIVES), default=None,
                 help="faq: score scale candidates at the inspected module, or at the output of the window's "
                      f"last block (about j times slower) [default: {FaqConfig.objective}]."),
)


def quant_request(method: str, options: dict[str, Any], defaults: tuple[int, int] = DEFAULT_SCHEME
                  ) -> tuple[MethodConfig, Calibration, int | None]:
    """The method config, calibration and byte budget the quant_options describe; `defaults` (bits,
    group) fill what the user left out."""
    budget = options.pop("budget")
    bits, group = options.pop("bits"), options.pop("group_size")
    scheme = QuantScheme(bits=defaults[0] if bits is None else bits, group_size=defaults[1] if group is None else group,
                         symmetric=options.pop("symmetric"))
    calibration = Calibration(options.pop("calib_text"), options.pop("samples"), options.pop("seq_len"),
                              options.pop("seed"))
    return make_config(method, scheme, **options), calibration, None if budget is None else int(budget * 1e6)
