"""GPTQ rounding (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022): the codes of a Linear are chosen one input column at a time, and
each column's rounding error is pushed onto the columns not yet rounded, weighted by the inverse
Hessian H = XᵀX/T of the layer's calibration inputs, so errors that inputs would amplify cancel.

It runs after a method's scaling and clipping, the way llm-compressor chains AWQ and GPTQ: the grid
(each group's scale and zero point) is the one nearest rounding of the clipped weight uses, fixed
before the first column is rounded, and only the codes change, so the stored form is the same.
The target GPTQ rounds towards is the weight before clipping: the clamp of the grid is one more
error for the later columns to absorb.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from faq_deploy.architectures import architecture_of
from faq_deploy.progress import progress
from faq_deploy.quant.blocks import block_inputs, first_output, run_block
from faq_deploy.quant.quantizer import QuantizedWeight, quantize_linear_, quantize_weight
from faq_deploy.quant.scheme import MethodConfig, QuantScheme

_COLUMNS_PER_UPDATE = 64  # lazy batch: the trailing columns are updated once per 64 rounded


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx. A wide input goes as column halves, three products instead of four (the fourth block is
    the transpose of one): about 30% less time for the default model's 1536-wide down_proj input, the
    largest of the statistics pass's products, on a 2-core CPU."""
    if x.shape[1] < 1024:
        return x.T @ x
    a, b = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:]
    ab = a.T @ b
    return torch.cat([torch.cat([a.T @ a, ab], dim=1), torch.cat([ab.T, b.T @ b], dim=1)])


class HessianHooks:
    """While attached to a block (a context manager), sums XᵀX of the inputs each named Linear sees,
    over every forward that runs; `hessians()` gives H = XᵀX / T. Linears fed the same input (q, k and
    v; gate and up) get one shared tensor, so its inverse is factored once."""

    def __init__(self, block: nn.Module, names: set[str]) -> None:
        self._block, self._names = block, names
        self._sums: dict[str, torch.Tensor] = {}
        self._counts = dict.fromkeys(names, 0)
        self._last: list = [None, None]  # q/k/v (and gate/up) see one tensor: its XᵀX is computed once
        self._handles: list = []

    def _accumulate(self, name: str, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        if self._last[0] is not inputs:
            self._last[:] = inputs, gram(flat)
        self._sums[name] = self._sums[name] + self._last[1] if name in self._sums else self._last[1].clone()
        self._counts[name] += len(flat)

    def __enter__(self) -> HessianHooks:
        self._handles = [self._block.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: self._accumulate(name, args[0])) for name in self._names]
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._last[:] = None, None

    def hessians(self) -> dict[str, torch.Tensor]:
        distinct: list[torch.Tensor] = []
        hessians = {}
        for name in sorted(self._names):
            h = self._sums[name] / self._counts[name]
            hessians[name] = next((d for d in distinct if d.shape == h.shape and torch.equal(d, h)), h)
            if hessians[name] is h:
                distinct.append(h)
        return hessians


@torch.no_grad()
def input_hessians(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], names: set[str],
                   rows_per_pass: int = 8) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The Hessians of the inputs each named Linear of `block` sees over every row of x (HessianHooks),
    and the block's output on x; rows go through in slices, so only the K×K sums are kept."""
    with HessianHooks(block, names) as hooks:
        outputs = [first_output(block(x[start:start + rows_per_pass], **kwargs))
                   for start in range(0, len(x), rows_per_pass)]
    return hooks.hessians(), torch.cat(outputs)


def scaled_hessians(hessians: dict[str, torch.Tensor], balanced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hessians after AWQ-style scaling: a Linear whose input was divided by s (`balanced`: name → s)
    sees H / (s sᵀ). Converting the Hessians measured before the scaling is exact up to rounding and
    saves a forward."""
    converted: dict[int, torch.Tensor] = {}
    out = dict(hessians)
    for name, s in balanced.items():
        h = hessians[name]
        if id(h) not in converted:  # q/k/v share one tensor and one s: convert it once, keep it shared
            converted[id(h)] = h / torch.outer(s, s)
        out[name] = converted[id(h)]
    return out


@dataclass(frozen=True)
class InverseFactor:
    """What GPTQ takes from a Hessian: the column order, the inputs that are always zero, and the upper
    Cholesky factor of the damped inverse in that order (row i: how column i's error spreads over
    the columns after it)."""

    u: torch.Tensor
    order: torch.Tensor
    dead: torch.Tensor


@torch.no_grad()
def inverse_factor(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> InverseFactor:
    """`damp` adds that fraction of H's mean diagonal to its diagonal (a stable inverse); `act_order`
    rounds the columns of largest input energy first."""
    h = hessian.float().clone()
    dead = h.diagonal() == 0  # an input that is always zero: its weight never matters
    h[dead, dead] = 1
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(len(h), device=h.device)
    h = h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return InverseFactor(u, order, dead)


def inverse_factors(hessians: dict[str, torch.Tensor], config: MethodConfig) -> dict[str, InverseFactor]:
    """One factor per distinct Hessian (input_hessians shares the tensor of Linears fed alike)."""
    made: dict[int, InverseFactor] = {}
    for h in hessians.values():
        if id(h) not in made:
            made[id(h)] = inverse_factor(h, config.damp, config.act_order)
    return {name: made[id(h)] for name, h in hessians.items()}


@torch.no_grad()
def gptq_round(weight: torch.Tensor, factor: InverseFactor, grid: QuantizedWeight) -> QuantizedWeight:
    """The codes of `weight` [N, K] on `grid`'s scales and zero points, rounded column by column with
    GPTQ's error compensation."""
    # The loop works on wᵀ [K, N], where an input column is a contiguous row: 3-4× faster on the CPU
    # than strided columns of w, with the same codes.
    w = weight.detach().float().T.clone()
    w[factor.dead] = 0
    w = w[factor.order].contiguous()
    groups = (factor.order // grid.scheme.group_size).tolist()
    scales, zeros = grid.scales.float().T.contiguous(), grid.zeros.float().T.contiguous()
    codes = torch.empty_like(w)
    with _one_thread():
        _round_columns(w, factor.u, scales, zeros, groups, codes, grid.scheme.max_code)
    ordered = torch.empty_like(codes)
    ordered[factor.order] = codes
    return replace(grid, codes=ordered.T.to(torch.uint8).contiguous())


def _round_columns(w: torch.Tensor, u: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groups: list[int],
                   codes: torch.Tensor, top: int) -> None:
    """GPTQ's loop over the input columns, the rows of w = weightᵀ [K, N] (updated in place), writing each
    column's codes; column c is on the grid of group groups[c] (rows of scales, zeros [G, N])."""
    k = len(w)
    for first in range(0, k, _COLUMNS_PER_UPDATE):
        last = min(first + _COLUMNS_PER_UPDATE, k)
        part, errors = w[first:last], torch.empty(last - first, w.shape[1], device=w.device)
        for i in range(last - first):
            c = first + i
            scale, zero, q, error = scales[groups[c]], zeros[groups[c]], codes[c], errors[i]
            torch.div(part[i], scale, out=q).round_().add_(zero).clamp_(0, top)
            torch.addcmul(part[i], q - zero, scale, value=-1, out=error).div_(u[c, c])
            part[i + 1:].addr_(u[c, c + 1:last], error, alpha=-1)
        w[last:].addmm_(u[first:last, last:].T, errors, alpha=-1)


@contextmanager
def _one_thread() -> Iterator[None]:
    """The column loop is thousands of small ops; on the CPU, handing each to a thread pool costs
    more than its work (a 1536×576 Linear: 4.7 s on 2 threads, 0.44 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def round_linears_(linears: dict[str, nn.Linear], schemes: dict[str, QuantScheme],
                   factors: dict[str, InverseFactor] | None,
                   targets: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedWeight]:
    """Quantize each Linear on the nearest-rounding grid of its `schemes` entry for its weight as it
    stands (clipped, say) and replace the weight by its fake-quantized value, in place. With Hessian
    `factors`, the codes are GPTQ's rounding of `targets` (default: the weights themselves) on that grid;
    Linears that share a factor and a scheme (q/k/v, gate/up) go through one column loop over their
    stacked rows (GPTQ treats rows independently), a third fewer loop steps per block."""
    if factors is None:
        return {name: quantize_linear_(linear, schemes[name]) for name, linear in linears.items()}
    grids = {name: quantize_weight(linear.weight, schemes[name]) for name, linear in linears.items()}
    together: dict[tuple[int, QuantScheme], list[str]] = {}
    for name in linears:
        together.setdefault((id(factors[name]), schemes[name]), []).append(name)
    rounded: dict[str, QuantizedWeight] = {}
    for (_, scheme), names in together.items():
        stacked = QuantizedWeight(*(torch.cat([getattr(grids[name], part) for name in names])
                                    for part in ("codes", "scales", "zeros")), scheme=scheme)
        target = torch.cat([(targets or {}).get(name, linears[name].weight) for name in names])
        codes = gptq_round(target, factors[names[0]], stacked).codes.split([len(grids[n].codes) for n in names])
        rounded.update({name: replace(grids[name], codes=c.contiguous()) for name, c in zip(names, codes, strict=True)})
    for name, linear in linears.items():
        linear.weight.copy_(rounded[name].dequantize().to(linear.weight.dtype))
    return {name: rounded[name] for name in linears}


@torch.no_grad()
def quantize_gptq_blocks(model: PreTrainedModel, config: MethodConfig,
                         calibration: torch.Tensor) -> dict[str, QuantizedWeight]:
    """Every block Linear rounded by GPTQ on its nearest-rounding grid (RTN's grid, GPTQ's codes), block
    by block. As in GPTQ's own code, each block's Hessians are taken on the output of the quantized blocks
    before it: measured on the default model's 1990s hold-out (w3 g32), full-precision inputs left RTN+GPTQ
    worse than RTN (55.5 against 53.1), the quantized prefix's better (40.2)."""
    arch = architecture_of(model)
    blocks = model.get_submodule(arch.blocks)
    x, kwargs = block_inputs(model, blocks, calibration)
    weights: dict[str, QuantizedWeight] = {}
    for index in progress(range(len(blocks)), "gptq blocks", "block"):
        block = blocks[index]
        factors = inverse_factors(input_hessians(block, x, kwargs, set(arch.linears))[0], config)
        prefix = f"{arch.blocks}.{index}"
        linears = {name: block.get_submodule(name) for name in arch.linears}
        schemes = {name: config.scheme_for(f"{prefix}.{name}") for name in arch.linears}
        weights.update({f"{prefix}.{name}": w for name, w in round_linears_(linears, schemes, factors).items()})
        x = run_block(block, x, kwargs, set()).block_out  # the quantized block's output
    return weights
