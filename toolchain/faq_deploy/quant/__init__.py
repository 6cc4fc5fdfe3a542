"""Weight quantization: one verb, `quantize(model, config, calibration)`, for every method.

A method is a frozen config dataclass (recorded whole in checkpoints and manifests) and a
handler that fake-quantizes the model in place and returns the integer record of each Linear.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel

from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.quant.awq import AwqConfig, quantize_awq
from faq_deploy.quant.faq import FaqConfig, quantize_faq
from faq_deploy.quant.gguf import TABLES, GgufConfig, quantize_gguf
from faq_deploy.quant.quantizer import QuantizedWeight
from faq_deploy.quant.rtn import RtnConfig, quantize_rtn
from faq_deploy.quant.scheme import MethodConfig, QuantScheme


class Method(NamedTuple):
    config: type[MethodConfig]
    run: Callable[..., dict[str, QuantizedWeight]]


METHODS: dict[str, Method] = {
    RtnConfig.method: Method(RtnConfig, quantize_rtn),
    AwqConfig.method: Method(AwqConfig, quantize_awq),
    FaqConfig.method: Method(FaqConfig, quantize_faq),
    GgufConfig.method: Method(GgufConfig, quantize_gguf),
}


@dataclass
class QuantizedModel:
    """The result of `quantize`: the fake-quantized model and the codes behind it. `tables`: codes a
    method fixed for the vocabulary tables ("lm_head", "model.embed_tokens"; a GGUF's own), which the
    export stores instead of its RTN of them."""

    model: PreTrainedModel
    weights: dict[str, QuantizedWeight]
    config: MethodConfig
    seconds: float
    tables: dict[str, QuantizedWeight] = field(default_factory=dict)


def make_config(method: str, scheme: QuantScheme, **options: Any) -> MethodConfig:
    """The config of `method`; options left as None take the method's defaults."""
    if method not in METHODS:
        raise InvalidQuantConfig(f"unknown method {method!r}", f"use one of {', '.join(METHODS)}")
    config_type = METHODS[method].config
    known = {f.name for f in fields(config_type)} - {"scheme"}
    given = {k: v for k, v in options.items() if v is not None}
    if unknown := sorted(given.keys() - known):
        raise InvalidQuantConfig(f"{method} does not take {', '.join(unknown)}",
                                 f"{method} takes: {', '.join(sorted(known)) or 'no options'}")
    return config_type(scheme=scheme, **given)


def describe(config: MethodConfig) -> dict[str, Any]:
    """A config as JSON-ready data, with its type and version, for checkpoints and manifests."""
    body = asdict(config)
    return {"method": config.method, "version": config.version, **body}


def compute_device() -> torch.device:
    """CUDA when there is one: the host-side math is the same, only faster."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantize(model: PreTrainedModel, config: MethodConfig, calibration: torch.Tensor | None = None) -> QuantizedModel:
    """Quantize every block Linear of `model` in place with the method `config` names."""
    if config.needs_calibration and calibration is None:
        raise InvalidQuantConfig(f"{config.method} needs calibration tokens", "pass calibration rows")
    # The result always lands on the CPU, where export reads it.
    device = compute_device()
    start = time.perf_counter()
    model.to(device)
    weights = METHODS[config.method].run(model, config, None if calibration is None else calibration.to(device))
    model.to("cpu")
    weights = {name: weight.cpu() for name, weight in weights.items()}
    tables = {name: weights.pop(name) for name in TABLES if name in weights}
    # a method that chose schemes itself (a GGUF's per-tensor types) records them like a budget's
    overrides = {name: w.scheme for name, w in weights.items() if w.scheme != config.scheme}
    return QuantizedModel(model, weights, replace(config, overrides=overrides), time.perf_counter() - start, tables)
