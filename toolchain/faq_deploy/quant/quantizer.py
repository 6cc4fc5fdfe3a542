"""Quantizer Q: per-group integer codes, scales and zero points.

The record QuantizedWeight is what every method produces and what export consumes; its
`dequantize` is the fake-quantized weight the torch model carries for evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from faq_deploy.quant.scheme import QuantScheme

_MIN_SCALE = 1e-5  # a constant (e.g. all-zero) group would otherwise divide by zero
# Rows quantized at once: each float temporary of a 151,936-row table would otherwise be 0.5 GB
ROWS_PER_SLICE = 8192


@dataclass(frozen=True)
class QuantizedWeight:
    """A Linear weight [N out, K in] as codes and per-group parameters."""

    codes: torch.Tensor   # uint8 [N, K], each in [0, 2^bits - 1]
    scales: torch.Tensor  # float32 [N, ceil(K / group)], each a value of scheme.scale_dtype
    zeros: torch.Tensor   # uint8 [N, ceil(K / group)]
    scheme: QuantScheme
    offsets: torch.Tensor | None = None  # float32 [N, ceil(K / group)] when scheme.offsets

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def cpu(self) -> QuantizedWeight:
        offsets = None if self.offsets is None else self.offsets.cpu()
        return replace(self, codes=self.codes.cpu(), scales=self.scales.cpu(), zeros=self.zeros.cpu(), offsets=offsets)

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """(q − z) · scale (+ offset), float32 [N, K]; written into `out` (float32 [N, K]) when given, in
        place and without temporaries when K is a whole number of groups."""
        n, k = self.codes.shape
        blocks = self.scales.shape[1]
        if k % self.scheme.group_size:  # a partial last group: through a padded copy
            codes = F.pad(self.codes.float(), (0, blocks * self.scheme.group_size - k)).view(n, blocks, -1)
            values = (codes - self.zeros.float()[..., None]) * self.scales[..., None]
            if self.offsets is not None:
                values += self.offsets[..., None]
            values = values.view(n, -1)[:, :k]
            return values if out is None else out.copy_(values)
        values = self.codes.float() if out is None else out.copy_(self.codes)
        grouped_values = values.view(n, blocks, -1).sub_(self.zeros[..., None]).mul_(self.scales[..., None])
        if self.offsets is not None:
            grouped_values.add_(self.offsets[..., None])
        return values


def grouped(weight: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] → [N, G, group]; a partial last group is padded by repeating its last value, which
    leaves the group's min and max (and so its scale) unchanged."""
    n, k = weight.shape
    pad = math.ceil(k / group) * group - k
    if pad:
        weight = F.pad(weight.unsqueeze(0), (0, pad), mode="replicate").squeeze(0)
    return weight.reshape(n, -1, group)


def _stored(scales: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """`scales` rounded to the precision the graph stores them in, as float32: the zero points and
    codes are then chosen for the scales the graph holds."""
    return scales.clamp(min=_MIN_SCALE).to(getattr(torch, scheme.scale_dtype)).float()


def _grid(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's scale and zero point, float32 [N, G], for groups w [N, G, group]."""
    if scheme.symmetric:
        half = 1 << (scheme.bits - 1)
        scales = _stored(w.abs().amax(dim=-1) / (half - 1), scheme)
        return scales, torch.full_like(scales, half)
    wmin, wmax = w.amin(dim=-1), w.amax(dim=-1)
    scales = _stored((wmax - wmin) / scheme.max_code, scheme)
    return scales, torch.round(-wmin / scales).clamp(0, scheme.max_code)


def _codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    return (torch.round(w / scales[..., None]) + zeros[..., None]).clamp_(0, scheme.max_code)


def quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    if len(weight) > ROWS_PER_SLICE:  # a vocabulary table: rows are independent, so slices bound the temporaries
        parts = [quantize_weight(rows, scheme) for rows in weight.split(ROWS_PER_SLICE)]
        return QuantizedWeight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scales", "zeros")),
                               scheme=scheme)
    n, k = weight.shape
    w = grouped(weight.detach().float(), scheme.group_size)
    scales, zeros = _grid(w, scheme)
    return QuantizedWeight(
        codes=_codes(w, scales, zeros, scheme).reshape(n, -1)[:, :k].to(torch.uint8).contiguous(),
        scales=scales.contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        scheme=scheme,
    )


def fake_quantize_groups(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Groups w [N, G, group] quantized and dequantized in one go, float32: the value
    `quantize_weight(...).dequantize()` gives, without the integer tensors (the searches' inner step)."""
    scales, zeros = _grid(w, scheme)
    return _codes(w, scales, zeros, scheme).sub_(zeros[..., None]).mul_(scales[..., None])


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """A weight [N, K] quantized and dequantized, float32 [N, K]."""
    n, k = weight.shape
    return fake_quantize_groups(grouped(weight.detach().float(), scheme.group_size), scheme).reshape(n, -1)[:, :k]


@torch.no_grad()
def quantize_linear_(linear: nn.Linear | nn.Embedding, scheme: QuantScheme) -> QuantizedWeight:
    """Quantize a Linear's weight [out, in] (or an embedding table [vocab, hidden], blocks along the
    hidden size) and replace it by its fake-quantized value, in place."""
    quantized = quantize_weight(linear.weight, scheme)
    linear.weight.copy_(quantized.dequantize().to(linear.weight.dtype))
    return quantized


def widened(weight: QuantizedWeight, group: int | None = None) -> QuantizedWeight:
    """The same weights as 8-bit codes in groups of `group` (a divisor of the weight's own; default its
    own): exact, codes and zero points shifted alike, each group's scale, zero point and offset repeated.
    For a node that must hold codes of several widths, or codes of a width it cannot take."""
    shift = 128 - (1 << (weight.scheme.bits - 1))  # symmetric codes stay symmetric
    group = group or weight.scheme.group_size
    repeat = weight.scheme.group_size // group

    def spread(values: torch.Tensor) -> torch.Tensor:
        return values.repeat_interleave(repeat, dim=1)

    return QuantizedWeight(weight.codes + shift, spread(weight.scales), spread(weight.zeros) + shift,
                           replace(weight.scheme, bits=8, group_size=group),
                           None if weight.offsets is None else spread(weight.offsets))
