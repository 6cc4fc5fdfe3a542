"""Round-to-nearest: the quantizer applied to every block Linear, no calibration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from faq_deploy.architectures import block_linears
from faq_deploy.progress import progress
from faq_deploy.quant.quantizer import QuantizedWeight, quantize_linear_
from faq_deploy.quant.scheme import MethodConfig


@dataclass(frozen=True)
class RtnConfig(MethodConfig):
    method: ClassVar[str] = "rtn"


def quantize_rtn(model: PreTrainedModel, config: RtnConfig,
                 calibration: torch.Tensor | None = None) -> dict[str, QuantizedWeight]:
    del calibration  # RTN looks at weights only
    linears = block_linears(model)
    return {name: quantize_linear_(linear, config.scheme)
            for name, linear in progress(linears.items(), "rtn", "linear")}
