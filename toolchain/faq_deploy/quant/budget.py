"""Mixed precision under a byte budget: the scheme of each Linear, chosen so that the weights fit the
budget with the least expected damage.

Damage of an option: ½ Σ F·δ² over the Linear's weights, where δ is the error that option's rounding
leaves in each weight and F the diagonal Fisher of the calibration loss (each weight's squared
gradient, summed one calibration row at a time): the second-order estimate of what the option adds
to the loss, on one scale for every layer. The choice is a multiple-choice knapsack, solved exactly
by dynamic programming over bytes rounded up to BYTES_STEP, so it never exceeds the budget.

q, k and v choose together: the onnxruntime-genai builder packs them into one MatMulNBits node, which
has one width and one block size (gate and up stay separate nodes there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from transformers import PreTrainedModel

from faq_deploy.architectures import packed_units
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.progress import progress
from faq_deploy.quant import compute_device
from faq_deploy.quant.packing import stored_bytes
from faq_deploy.quant.quantizer import fake_quantize
from faq_deploy.quant.scheme import QuantScheme

# What a Linear may take besides the method's scheme: 8-bit codes (fast on the CPU at accuracy level 4)
# in blocks of 128 or of the scheme's group. Coarser 4-bit groups were tried as a way down and lost: at
# the bytes of uniform w4 g32 the choice that mixed in g64 and g128 read 25.16 against 25.09 on the
# default model's hold-out (FAQ + GPTQ, 3 seeds; docs/results/quantizer.md).
UPGRADE_BITS = 8
UPGRADE_GROUPS = (128,)
BYTES_STEP = 4096


@dataclass(frozen=True)
class Choice:
    scheme: QuantScheme
    bytes: int
    damage: float


def options_for(scheme: QuantScheme, widths: set[int]) -> list[QuantScheme]:
    """`scheme`, then its 8-bit upgrades whose group divides every input width (the builder's checkpoint
    needs whole groups), with the scheme's symmetry and scale precision."""
    upgrades = [replace(scheme, bits=UPGRADE_BITS, group_size=group) for group in (*UPGRADE_GROUPS, scheme.group_size)
                if scheme.bits < UPGRADE_BITS and all(width % group == 0 for width in widths)]
    return [scheme, *dict.fromkeys(upgrades)]


def fisher(model: PreTrainedModel, calibration: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Σ over calibration rows of the squared gradient of the loss for each named Linear's weight."""
    linears = {name: model.get_submodule(name) for name in names}
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    for linear in linears.values():
        linear.weight.requires_grad_(True)
    sums = {name: torch.zeros_like(linear.weight) for name, linear in linears.items()}
    try:
        for row in progress(calibration, "sensitivity", "row"):
            with torch.enable_grad():  # callers may hold no_grad: this pass is the one that needs gradients
                model(row[None], labels=row[None], use_cache=False).loss.backward()
            for name, linear in linears.items():
                sums[name] += linear.weight.grad.pow(2)
                linear.weight.grad = None
    finally:
        for linear in linears.values():
            linear.weight.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
    return sums


def choices(model: PreTrainedModel, scheme: QuantScheme, calibration: torch.Tensor) -> list[list[Choice]]:
    """Each unit's options, with bytes and damage."""
    grouped = packed_units(model)
    weights = fisher(model, calibration, [name for unit in grouped for name in unit])
    table = []
    for unit in grouped:
        linears = [model.get_submodule(name) for name in unit]
        row = []
        for option in options_for(scheme, {linear.in_features for linear in linears}):
            damage = sum(0.5 * (weights[name] * (linear.weight - fake_quantize(linear.weight, option))
                                .pow(2)).sum().item() for name, linear in zip(unit, linears, strict=True))
            size = sum(stored_bytes(*linear.weight.shape, option) for linear in linears)
            row.append(Choice(option, size, damage))
        table.append(row)
    return table


def solve(table: list[list[Choice]], capacity: int) -> list[int]:
    """The option index of each unit minimising the total damage with total bytes ≤ capacity
    (dynamic programming over bytes in BYTES_STEP steps, costs rounded up)."""
    slots = capacity // BYTES_STEP
    best = np.full(slots + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(table), slots + 1), dtype=np.int8)
    for u, options in enumerate(table):
        step = np.full(slots + 1, np.inf)
        for i, choice in enumerate(options):
            cost = -(-choice.bytes // BYTES_STEP)
            if cost > slots:
                continue
            candidate = np.full(slots + 1, np.inf)
            candidate[cost:] = best[: slots + 1 - cost] + choice.damage
            better = candidate < step
            step[better], picks[u, better] = candidate[better], i
        best = step
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        smallest = sum(min(c.bytes for c in options) for options in table)
        raise InvalidQuantConfig(f"the Linears need at least {smallest / 1e6:.1f} MB, more than the "
                                 f"{capacity / 1e6:.1f} MB the budget leaves them", "raise --budget")
    chosen = []
    for u in range(len(table) - 1, -1, -1):
        i = int(picks[u, end])
        chosen.append(i)
        end -= -(-table[u][i].bytes // BYTES_STEP)
    return chosen[::-1]


def allocate(model: PreTrainedModel, scheme: QuantScheme, calibration: torch.Tensor,
             capacity: int) -> dict[str, QuantScheme]:
    """The scheme of every block Linear whose choice differs from `scheme`, fitting the Linears in
    `capacity` bytes with the least estimated damage."""
    device = next(model.parameters()).device
    table = choices(model.to(compute_device()), scheme, calibration.to(compute_device()))
    model.to(device)
    overrides = {}
    for unit, options, pick in zip(packed_units(model), table, solve(table, capacity), strict=True):
        for name in unit:
            if options[pick].scheme != scheme:
                overrides[name] = options[pick].scheme
    return overrides
