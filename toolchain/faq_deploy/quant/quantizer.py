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


@dataclass(frozen=True)
class QuantizedWeight:
    """A Linear weight [N out, K in] as codes and per-group parameters."""

    codes: torch.Tensor   # uint8 [N, K], each in [0, 2^bits - 1]
    scales: torch.Tensor  # float32 [N, ceil(K / group)], each a value of scheme.scale_dtype
    zeros: torch.Tensor   # uint8 [N, ceil(K / group)]
    scheme: QuantScheme

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def cpu(self) -> QuantizedWeight:
        return replace(self, codes=self.codes.cpu(), scales=self.scales.cpu(), zeros=self.zeros.cpu())

    def dequantize(self) -> torch.Tensor:
        """(q − z) · scale, float32 [N, K]."""
        n, k = self.codes.shape
        blocks = self.scales.shape[1]
        codes = F.pad(self.codes.float(), (0, blocks * self.scheme.group_size - k)).view(n, blocks, -1)
        return ((codes - self.zeros.float()[..., None]) * self.scales[..., None]).view(n, -1)[:, :k]


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


def quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    n, k = weight.shape
    w = grouped(weight.detach().float(), scheme.group_size)
    if scheme.symmetric:
        half = 1 << (scheme.bits - 1)
        scales = _stored(w.abs().amax(dim=-1) / (half - 1), scheme)
        zeros = torch.full_like(scales, half)
    else:
        wmin, wmax = w.amin(dim=-1), w.amax(dim=-1)
        scales = _stored((wmax - wmin) / scheme.max_code, scheme)
        zeros = torch.round(-wmin / scales).clamp(0, scheme.max_code)
    codes = (torch.round(w / scales[..., None]) + zeros[..., None]).clamp(0, scheme.max_code)
    return QuantizedWeight(
        codes=codes.reshape(n, -1)[:, :k].to(torch.uint8).contiguous(),
        scales=scales.contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        scheme=scheme,
    )


@torch.no_grad()
def quantize_linear_(linear: nn.Linear | nn.Embedding, scheme: QuantScheme) -> QuantizedWeight:
    """Quantize a Linear's weight [out, in] (or an embedding table [vocab, hidden], blocks along the
    hidden size) and replace it by its fake-quantized value, in place."""
    quantized = quantize_weight(linear.weight, scheme)
    linear.weight.copy_(quantized.dequantize().to(linear.weight.dtype))
    return quantized
