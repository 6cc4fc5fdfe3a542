"""Future-Aware Quantization: AWQ whose scale search starts from a statistic
that mixes the block's own activations with those of the next `window` blocks.

The engine's statistics pass (quant/awq.py) measures a_{b,G} for every block b and scaling group G
on the model as it was, and runs `window` blocks ahead of the quantizer: that is FAQ's pre-pass. For block b,
f_b = Σ_k ω_k · a_{b+k,G} / m(a_{b+k,G}) over the available window (unit mean, so that
large-magnitude layers do not dominate), and the search uses
ã_{b,G} = (1 − γ)·a_{b,G} + γ·m(a_{b,G})·f_b. With γ = 0, or an empty window, this is AWQ.

The ablation switches: `last_blocks="virtual"` lets the final norm's input stand in for
a block past the last one (residual groups); `future_stats="lookahead"` (with propagate="quant")
measures the future blocks from the quantized prefix instead of the FP pre-pass;
`objective="window"` scores each candidate at the output of blocks b..b+j instead of the
inspected module.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from faq_deploy.architectures import ScalingGroup
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.quant.awq import FINAL, AwqConfig, Guide, Statistics, quantize_awq
from faq_deploy.quant.quantizer import QuantizedWeight

WINDOW_WEIGHTS = ("uniform", "geometric")
SCOPES = ("residual", "all")
LAST_BLOCKS = ("truncate", "virtual")
FUTURE_STATS = ("prepass", "lookahead")
OBJECTIVES = ("local", "window")


@dataclass(frozen=True)
class FaqConfig(AwqConfig):
    method: ClassVar[str] = "faq"
    # Chosen on the calibration-domain hold-out over 3 seeds (docs/results/quantizer.md), where AWQ keeps
    # AutoAWQ's: GPTQ rounding after the scaling (w4 g32: 25.48 → 25.09, w3 g32: 35.3 → 32.2), and a
    # search 4.4× cheaper with the same result (every 4th ratio, then the 2 on each side of the best:
    # 9 of 20 candidates; 4 scoring rows).
    rounding: str = "gptq"
    coarse: int = 4
    reach: int = 2
    search_rows: int = 4
    # γ and j: the arg-min of the pre-search on a calibration-domain hold-out (docs/results/presearch.md)
    gamma: float = 1.0              # weight of the future profile; 0 is AWQ exactly
    window: int = 1                 # j: how many future blocks
    window_weights: str = "uniform"  # or "geometric": ω_k ∝ rho^(k−1)
    rho: float = 0.5
    scope: str = "residual"         # residual: only groups fed by the residual stream; all: every group
    last_blocks: str = "truncate"   # or virtual: the final norm's input is one more future layer
    future_stats: str = "prepass"   # or lookahead (needs propagate=quant)
    objective: str = "local"        # or window: candidates scored at the output of blocks b..b+j

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"window_weights": WINDOW_WEIGHTS, "scope": SCOPES, "last_blocks": LAST_BLOCKS,
                   "future_stats": FUTURE_STATS, "objective": OBJECTIVES}
        problems = [
            f"gamma={self.gamma} (0…1)" if not 0 <= self.gamma <= 1 else "",
            f"window={self.window} (≥ 1)" if self.window < 1 else "",
            f"rho={self.rho} (0 < rho ≤ 1)" if not 0 < self.rho <= 1 else "",
            *(f"{name}={getattr(self, name)!r} ({'/'.join(allowed)})"
              for name, allowed in choices.items() if getattr(self, name) not in allowed),
            # from the FP prefix the lookahead would re-measure exactly the pre-pass
            "future_stats='lookahead' needs propagate='quant'"
            if self.future_stats == "lookahead" and self.propagate != "quant" else "",
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


def future(config: FaqConfig, stats: Statistics, index: int, group: ScalingGroup) -> list[torch.Tensor]:
    """a_{b+k,G} for k = 1 … j, as far as blocks exist; with last_blocks=virtual a residual group
    also sees the final norm's input, which lives in the same residual coordinates."""
    found = []
    for k in range(1, config.window + 1):
        key = (index + k, group.name)
        if key not in stats and config.last_blocks == "virtual" and group.residual:
            key = (index + k, FINAL)
        if key not in stats:
            break
        found.append(stats[key])
    return found


def mix(config: FaqConfig, stats: Statistics, index: int, group: ScalingGroup) -> torch.Tensor:
    """ã_{b,G}: the block's own statistic mixed with the normalised profile of the next blocks."""
    a = stats[index, group.name]
    ahead = future(config, stats, index, group)
    if config.gamma == 0 or not ahead or not config.mixes(group):
        return a
    profile = sum(w * f / f.mean() for w, f in zip(config.window_weights_for(len(ahead)), ahead, strict=True))
    return (1 - config.gamma) * a + config.gamma * a.mean() * profile


def guide(config: FaqConfig) -> Guide:
    return Guide(statistic=partial(mix, config), ahead=config.window,
                 lookahead=config.window if config.future_stats == "lookahead" else 0,
                 loss_window=config.window if config.objective == "window" else 0)


def quantize_faq(model: PreTrainedModel, config: FaqConfig,
                 calibration: torch.Tensor) -> dict[str, QuantizedWeight]:
    return quantize_awq(model, config, calibration, guide(config))
