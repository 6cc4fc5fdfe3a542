"""Future-Aware Quantization (FAQ_SPEC.md §2): AWQ whose scale search starts from a statistic
that mixes the block's own activations with those of the next `window` blocks.

The engine's statistics pass (quant/awq.py) already holds a_{b,G} for every block b and scaling
group G before the first block is quantized: that is FAQ's pre-pass. For block b,
f_b = Σ_k ω_k · a_{b+k,G} / m(a_{b+k,G}) over the available window (unit mean, so that
large-magnitude layers do not dominate), and the search uses
ã_{b,G} = (1 − γ)·a_{b,G} + γ·m(a_{b,G})·f_b. With γ = 0, or an empty window, this is AWQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from faq_deploy.architectures import ScalingGroup
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.quant.awq import AwqConfig, Statistics, quantize_awq
from faq_deploy.quant.quantizer import QuantizedWeight

WINDOW_WEIGHTS = ("uniform", "geometric")
SCOPES = ("residual", "all")


@dataclass(frozen=True)
class FaqConfig(AwqConfig):
    method: ClassVar[str] = "faq"
    # γ and j: the arg-min of the pre-search on a calibration-domain hold-out (docs/results/presearch.md)
    gamma: float = 1.0              # weight of the future profile; 0 is AWQ exactly
    window: int = 1                 # j: how many future blocks
    window_weights: str = "uniform"  # or "geometric": ω_k ∝ rho^(k−1)
    rho: float = 0.5
    scope: str = "residual"         # residual: only groups fed by the residual stream; all: every group

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = [
            f"gamma={self.gamma} (0…1)" if not 0 <= self.gamma <= 1 else "",
            f"window={self.window} (≥ 1)" if self.window < 1 else "",
            f"window_weights={self.window_weights!r} ({'/'.join(WINDOW_WEIGHTS)})"
            if self.window_weights not in WINDOW_WEIGHTS else "",
            f"rho={self.rho} (0 < rho ≤ 1)" if not 0 < self.rho <= 1 else "",
            f"scope={self.scope!r} ({'/'.join(SCOPES)})" if self.scope not in SCOPES else "",
        ]
        if problems := [p for p in problems if p]:
            raise InvalidQuantConfig(f"FAQ settings out of range: {', '.join(problems)}",
                                     "see `faq-deploy quantize --help` for each setting's range")

    def window_weights_for(self, available: int) -> list[float]:
        """ω_1 … ω_available, normalised to sum to 1 (the window is truncated near the last block)."""
        raw = [1.0 if self.window_weights == "uniform" else self.rho ** k for k in range(available)]
        return [w / sum(raw) for w in raw]

    def mixes(self, group: ScalingGroup) -> bool:
        return self.scope == "all" or group.residual


def mix(config: FaqConfig, stats: Statistics, index: int, group: ScalingGroup) -> torch.Tensor:
    """ã_{b,G}: the block's own statistic mixed with the normalised profile of the next blocks."""
    a = stats[index, group.name]
    available = sum(1 for k in range(1, config.window + 1) if (index + k, group.name) in stats)
    if config.gamma == 0 or available == 0 or not config.mixes(group):
        return a
    future = sum(w * stats[index + k, group.name] / stats[index + k, group.name].mean()
                 for k, w in enumerate(config.window_weights_for(available), start=1))
    return (1 - config.gamma) * a + config.gamma * a.mean() * future


def quantize_faq(model: PreTrainedModel, config: FaqConfig,
                 calibration: torch.Tensor) -> dict[str, QuantizedWeight]:
    return quantize_awq(model, config, calibration, partial(mix, config))
