"""AWQ with AutoAWQ semantics: per-channel scales searched on calibration
activations, folded into the preceding op, auto-clip, then the quantizer; block by block, with
full-precision activations propagated from block to block.

Two passes. The statistics pass runs the FP model block by block over every calibration row and
keeps only a_{b,G} (per-channel mean |x|, kilobytes) and, for GPTQ rounding, the Hessians of the
Linears' inputs; it runs lazily, a block or two ahead of the main pass. The main pass works on the
first `search_rows` rows: the 20-candidate search dominates the cost and is scored there. FAQ
(quant/faq.py) steers the search through a `Guide`: above all the statistic the search starts
from, and so costs no more than AWQ: both need the blocks' statistics, FAQ just reads them ahead.

The ablation switches that are not about the future live here, because they make sense for AWQ
too: `alpha_search=False` takes one fixed ratio instead of the search, and `propagate="quant"` feeds
each block the quantized prefix's output, re-measuring its statistics on every calibration row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from faq_deploy.architectures import Architecture, ScalingGroup, active_groups, architecture_of
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.progress import progress
from faq_deploy.quant.blocks import BlockCapture, block_inputs, first_output, run_block
from faq_deploy.quant.gptq import (
    HessianHooks,
    InverseFactor,
    input_hessians,
    inverse_factors,
    round_linears_,
    scaled_hessians,
)
from faq_deploy.quant.quantizer import QuantizedWeight, fake_quantize, fake_quantize_groups, grouped
from faq_deploy.quant.scheme import MethodConfig, QuantScheme

PROPAGATE = ("fp", "quant")


@dataclass(frozen=True)
class AwqConfig(MethodConfig):
    method: ClassVar[str] = "awq"
    grid: int = 20          # candidate ratios r = 0, 1/grid, …, (grid−1)/grid
    coarse: int = 1         # score every coarse-th ratio, then the ratios around the best (1: all)
    reach: int = 0          # how far on each side of the best coarse ratio the fine step looks (0: coarse − 1)
    alpha_search: bool = True  # False: every group takes `ratio`, no search (the search-free variant)
    ratio: float = 0.5
    propagate: str = "fp"   # fp (AutoAWQ): block b+1 sees block b's FP output; quant: its quantized output
    clip: bool = True       # AWQ auto-clip (skips q and k)
    clip_tokens: int = 512  # tokens sampled for the clip search
    # Calibration rows the scale search scores its candidates on; the statistics use every row.
    # The 20-candidate search is ~90% of the time and grows linearly with it (CPU: ~1 s per
    # block per 512-token row on the default model), the statistics cost one forward.
    search_rows: int = 8

    @property
    def needs_calibration(self) -> bool:
        return True

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.grid, self.coarse, self.clip_tokens, self.search_rows) < 1 or self.reach < 0:
            raise InvalidQuantConfig(
                f"grid={self.grid}, coarse={self.coarse}, clip_tokens={self.clip_tokens} and "
                f"search_rows={self.search_rows} must be ≥ 1, reach={self.reach} ≥ 0",
                "use the defaults (20, 1, 512, 8 and 0)")
        if not 0 <= self.ratio <= 1 or self.propagate not in PROPAGATE:
            raise InvalidQuantConfig(f"ratio={self.ratio} (0…1) or propagate={self.propagate!r} "
                                     f"({'/'.join(PROPAGATE)}) is out of range",
                                     "see `faq-deploy quantize --help` for each setting's range")


# (block, group name) → a_{b,G}, float32 [channels]; (L, FINAL) → the final norm's input, past block L−1
Statistics = dict[tuple[int, str], torch.Tensor]
FINAL = "final-norm-input"

# (all statistics, block, group) → the statistic the scale search uses. AWQ: the block's own a.
StatsHook = Callable[[Statistics, int, ScalingGroup], torch.Tensor]


def _own_statistic(stats: Statistics, index: int, group: ScalingGroup) -> torch.Tensor:
    return stats[index, group.name]


@dataclass(frozen=True)
class Guide:
    """What steers the scale search. AWQ's: the block's own statistic, scored at the inspected module."""

    statistic: StatsHook = _own_statistic
    # How many blocks past the current one the statistic reads: they are measured before its search.
    ahead: int = 0
    # Under quant propagation, also re-measure blocks b+1..b+lookahead from the quantized prefix
    # (pushed through the FP blocks) instead of taking their FP pre-pass statistics.
    lookahead: int = 0
    # 0: score a candidate at the inspected module's output; j: at the output of blocks b..b+j.
    loss_window: int = 0


def channel_mean_abs(x: torch.Tensor) -> torch.Tensor:
    """a: per-input-channel mean of |x| over all tokens, float32 [channels]."""
    return x.reshape(-1, x.shape[-1]).abs().float().mean(dim=0)


def weight_profile(weights: list[torch.Tensor], group: int) -> torch.Tensor:
    """w̄: per input channel, the mean over output rows of |w| / (max |w| of its group)."""
    w = torch.cat(weights, dim=0).abs().float()
    k = w.shape[1]
    g = grouped(w, group)
    return (g / (g.amax(dim=-1, keepdim=True) + 1e-6)).reshape(w.shape[0], -1)[:, :k].mean(dim=0)


def candidate_scales(a: torch.Tensor, w_bar: torch.Tensor, ratio: float) -> torch.Tensor:
    s = (a.pow(ratio) / (w_bar.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


Loss = Callable[[], float]  # the error of the block as its weights stand, against FP


def _mse(x: torch.Tensor, target: torch.Tensor) -> float:
    return (x - target).float().pow(2).mean().item()


def local_loss(block: nn.Module, group: ScalingGroup, capture: BlockCapture) -> Loss:
    """AWQ's objective: the inspected module's output on its recorded inputs."""
    args, kwargs = capture.calls[group.inspect]
    inspect = block.get_submodule(group.inspect)
    target = capture.outputs[group.inspect]
    return lambda: _mse(first_output(inspect(*args, **kwargs)), target)


def window_loss(blocks: nn.ModuleList, index: int, window: int, x: torch.Tensor,
                kwargs: dict[str, Any]) -> Loss:
    """FAQ's window objective: the output of blocks index..index+window (truncated at the last),
    the later blocks in FP, against the all-FP output of the same blocks."""
    chain = [blocks[b] for b in range(index, min(index + window, len(blocks) - 1) + 1)]

    def forward() -> torch.Tensor:
        h = x
        for block in chain:
            h = first_output(block(h, **kwargs))
        return h

    target = forward()
    return lambda: _mse(forward(), target)


@torch.no_grad()
def search_scale(block: nn.Module, group: ScalingGroup, a: torch.Tensor, config: AwqConfig, scheme: QuantScheme,
                 loss: Loss) -> torch.Tensor:
    """The s of the best ratio r on the unmodified block (or of the fixed ratio, without search), for
    balance Linears quantized with `scheme`."""
    balance = [block.get_submodule(name) for name in group.balance]
    originals = [linear.weight.detach().clone() for linear in balance]
    w_bar = weight_profile(originals, scheme.group_size)
    if not config.alpha_search:
        return candidate_scales(a, w_bar, config.ratio)
    scored: dict[int, float] = {}

    def score(step: int) -> float:
        if step not in scored:
            s = candidate_scales(a, w_bar, step / config.grid)
            for linear, w in zip(balance, originals, strict=True):
                linear.weight.copy_(fake_quantize(w * s, scheme) / s)
            scored[step] = loss()
        return scored[step]

    try:
        # every `coarse`-th ratio, then every ratio within reach of the best of those
        best = min(range(0, config.grid, config.coarse), key=score)
        reach = config.reach or config.coarse - 1
        best = min(range(max(0, best - reach), min(config.grid, best + reach + 1)), key=score)
    finally:
        for linear, w in zip(balance, originals, strict=True):
            linear.weight.copy_(w)
    return candidate_scales(a, w_bar, best / config.grid)


@torch.no_grad()
def apply_scale(block: nn.Module, group: ScalingGroup, s: torch.Tensor) -> None:
    """Fold s: prev_op's output ÷ s, balance inputs × s. Without quantization this preserves the
    block's function exactly (up to float rounding)."""
    prev = block.get_submodule(group.prev_op)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s[:, None])
    else:  # a norm: its weight scales each output channel
        prev.weight.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for name in group.balance:
        block.get_submodule(name).weight.mul_(s[None, :])


@torch.no_grad()
def auto_clip_(linear: nn.Linear, x: torch.Tensor, scheme: QuantScheme, tokens: int,
               grid: int = 20, max_shrink: float = 0.5) -> None:
    """Clamp each (output row, group) to the max-abs shrink factor in 1.00, 0.95, …, 0.55 that best
    preserves the group-partial products on `tokens` sampled inputs.

    The error of a group's partial product, mean_t (x_t,g · d_g)² for the weight change d_g, is the
    quadratic form d_gᵀ H_g d_g with H_g = X_gᵀ X_g / T: one [g, g] Gram matrix per group replaces
    a [T, N] product per group and shrink step.
    """
    g = scheme.group_size
    x = x.reshape(-1, x.shape[-1]).float()
    x = x[:: max(1, len(x) // tokens)][:tokens]
    n, k = linear.weight.shape
    w = grouped(linear.weight.float(), g)  # [N, G, g]; a partial last group repeats its last value…
    xg = nn.functional.pad(x, (0, -k % g)).reshape(len(x), -1, g)  # …which meets zero inputs here
    gram = torch.einsum("tgk,tgl->gkl", xg, xg) / len(x)  # [G, g, g]
    max_abs = w.abs().amax(dim=-1)  # [N, G]
    best_max, best_err = max_abs.clone(), torch.full_like(max_abs, float("inf"))
    for step in range(int(max_shrink * grid)):
        limit = (max_abs * (1 - step / grid))[..., None]
        d = fake_quantize_groups(torch.clamp(w, -limit, limit), scheme).sub_(w)
        err = (torch.einsum("ngk,gkl->ngl", d, gram) * d).sum(dim=-1)  # [N, G]
        better = err < best_err
        best_err, best_max = torch.where(better, err, best_err), torch.where(better, limit[..., 0], best_max)
    clipped = torch.clamp(w, -best_max[..., None], best_max[..., None]).reshape(n, -1)[:, :k]
    linear.weight.copy_(clipped.to(linear.weight.dtype))


def _quantize_block(block: nn.Module, prefix: str, arch: Architecture, fp: BlockCapture,
                    balanced: dict[str, torch.Tensor], config: AwqConfig,
                    factors: dict[str, InverseFactor] | None) -> dict[str, QuantizedWeight]:
    """Clip and round the block's Linears, scaled already; `fp` holds their inputs before the scaling,
    `balanced` the s that divides a balance Linear's input."""
    linears = {name: block.get_submodule(name) for name in arch.linears}
    schemes = {name: config.scheme_for(f"{prefix}.{name}") for name in arch.linears}
    # what GPTQ rounds towards: the scaled weights before clipping
    targets = {name: linear.weight.detach().clone() for name, linear in linears.items()} if factors else None
    for name, linear in linears.items():
        if config.clip and name not in arch.no_clip:
            x = fp.input(name) / balanced[name] if name in balanced else fp.input(name)
            auto_clip_(linear, x, schemes[name], config.clip_tokens)
    return {f"{prefix}.{name}": w for name, w in round_linears_(linears, schemes, factors, targets).items()}


@torch.no_grad()
def measure_statistics(stats: Statistics, arch: Architecture, blocks: nn.ModuleList, first: int, last: int,
                       x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Run blocks first..last as they stand on x (block `first`'s input), recording a_{b,G} of each
    into `stats`, and the final norm's input when the run passes the last block; returns the output."""
    for index in range(first, last + 1):
        groups = active_groups(arch, blocks[index])
        capture = run_block(blocks[index], x, kwargs, {g.balance[0] for g in groups})
        for group in groups:
            stats[index, group.name] = channel_mean_abs(capture.input(group.balance[0]))
        x = capture.block_out
    if last == len(blocks) - 1:
        stats[len(blocks), FINAL] = channel_mean_abs(x)
    return x


class FullPrecisionPass:
    """Every calibration row through the blocks as they were before quantization, one block at a time,
    kept just ahead of the quantizer: it records a_{b,G} of each block it passes (the statistics pass)
    and, for GPTQ, the Hessians of the block's Linear inputs. Lazily, because one forward then serves
    both and only the Hessians of the blocks between the quantizer and the pass are held."""

    @torch.no_grad()
    def __init__(self, model: PreTrainedModel, calibration: torch.Tensor, hessians: bool = False) -> None:
        self.arch = architecture_of(model)
        self.blocks = model.get_submodule(self.arch.blocks)
        self.x, self.kwargs = block_inputs(model, self.blocks, calibration)
        self.stats: Statistics = {}
        self.hessians: dict[int, dict[str, torch.Tensor]] = {}
        self._with_hessians = hessians
        self._passed = 0

    @torch.no_grad()
    def through(self, last: int) -> Statistics:
        """Pass every block up to `last` (or the final block) not passed yet; the statistics so far.
        The blocks passed must not have been changed yet: they are measured as the model was."""
        while self._passed <= min(last, len(self.blocks) - 1):
            index, block = self._passed, self.blocks[self._passed]
            with HessianHooks(block, set(self.arch.linears) if self._with_hessians else set()) as hooks:
                self.x = measure_statistics(self.stats, self.arch, self.blocks, index, index, self.x, self.kwargs)
            if self._with_hessians:
                self.hessians[index] = hooks.hessians()
            self._passed += 1
        return self.stats


@torch.no_grad()
def activation_statistics(model: PreTrainedModel, calibration: torch.Tensor) -> Statistics:
    """The whole statistics pass at once: a_{b,G} for every block and group, from one FP forward."""
    fp_pass = FullPrecisionPass(model, calibration)
    return fp_pass.through(len(fp_pass.blocks) - 1)


@torch.no_grad()
def quantize_awq(model: PreTrainedModel, config: AwqConfig, calibration: torch.Tensor,
                 guide: Guide = Guide()) -> dict[str, QuantizedWeight]:
    """Scale, clip and quantize every block in place; returns the integer record per Linear."""
    arch = architecture_of(model)
    blocks = model.get_submodule(arch.blocks)
    quantized_prefix = config.propagate == "quant"
    gptq = config.rounding == "gptq"
    # GPTQ's Hessians: with FP propagation a block's inputs are the FP pass's; with a quantized prefix
    # they are measured on the prefix's output (x_all) instead
    fp_pass = FullPrecisionPass(model, calibration, hessians=gptq and not quantized_prefix)
    stats = fp_pass.stats
    x, kwargs = block_inputs(model, blocks, calibration[: config.search_rows])
    if quantized_prefix:  # every row: the statistics of the quantized prefix, GPTQ's Hessians
        x_all, kwargs_all = block_inputs(model, blocks, calibration)
    inspected = {g.inspect for g in arch.groups}
    weights: dict[str, QuantizedWeight] = {}
    for index in progress(range(len(blocks)), f"{config.method} blocks", "block"):
        block = blocks[index]
        groups = active_groups(arch, block)
        fp_pass.through(index + max(guide.ahead, guide.lookahead))
        if quantized_prefix:
            last = min(index + guide.lookahead, len(blocks) - 1)
            measure_statistics(stats, arch, blocks, index, last, x_all, kwargs_all)
        fp = run_block(block, x, kwargs, set(arch.linears) | inspected, inspected)
        losses = ([window_loss(blocks, index, guide.loss_window, x, kwargs)] * len(groups) if guide.loss_window
                  else [local_loss(block, g, fp) for g in groups])
        prefix = f"{arch.blocks}.{index}"
        scales = [search_scale(block, g, guide.statistic(stats, index, g), config,
                               config.scheme_for(f"{prefix}.{g.balance[0]}"), loss)
                  for g, loss in zip(groups, losses, strict=True)]
        for group, s in zip(groups, scales, strict=True):
            apply_scale(block, group, s)
        # The scaling divides the inputs of each group's balance Linears by its s and changes no other
        # input: the scaled block's inputs, and their Hessians, follow from the FP ones without a forward.
        balanced = {name: s for group, s in zip(groups, scales, strict=True) for name in group.balance}
        factors = None
        if gptq:
            hessians = (input_hessians(block, x_all, kwargs_all, set(arch.linears))[0] if quantized_prefix else
                        scaled_hessians(fp_pass.hessians.pop(index), balanced))
            factors = inverse_factors(hessians, config)
        weights.update(_quantize_block(block, prefix, arch, fp, balanced, config, factors))
        if quantized_prefix:
            x = run_block(block, x, kwargs, set()).block_out
            x_all = run_block(block, x_all, kwargs_all, set()).block_out
        else:
            x = fp.block_out  # full-precision propagation (AutoAWQ): the next block sees the FP output
    return weights
