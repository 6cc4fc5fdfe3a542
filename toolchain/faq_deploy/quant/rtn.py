"""Round-to-nearest: the quantizer applied to every block Linear, no calibration (unless its codes are
rounded by GPTQ, which needs the layers' inputs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from faq_deploy.architectures import block_linears
from faq_deploy.progress import progress
from faq_deploy.quant.gptq import quantize_gptq_blocks
from faq_deploy.quant.quantizer import QuantizedWeight, quantize_linear_
from faq_deploy.quant.scheme import MethodConfig


@dataclass(frozen=True)
class RtnConfig(MethodConfig):
    method: ClassVar[str] = "rtn"


def quantize_rtn(model: PreTrainedModel, config: RtnConfig,
                 calibration: torch.Tensor | None = None) -> dict[str, QuantizedWeight]:
    if config.rounding == "gptq":  # the same grid, codes chosen against the calibration inputs
        return quantize_gptq_blocks(model, config, calibration)
    linears = block_linears(model)
    return {name: quantize_linear_(linear, config.scheme_for(name))
            for name, linear in progress(linears.items(), "rtn", "linear")}
