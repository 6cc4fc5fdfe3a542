"""The end-to-end jobs the CLI runs, composed from the pipeline stages; results are plain data."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from faq_deploy import checkpoint, models
from faq_deploy.data import Calibration, eval_tokens, load_corpus
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.fetch import folder_bytes
from faq_deploy.perplexity import perplexity
from faq_deploy.quant import QuantizedModel, compute_device, quantize
from faq_deploy.quant.scheme import MethodConfig


@dataclass(frozen=True)
class QuantizeResult:
    model: str
    method: str
    bits: int
    group: int
    symmetric: bool
    linears: int
    seconds: float
    out: str
    bytes: int


@dataclass(frozen=True)
class EvalResult:
    model: str
    method: str
    bits: int | None
    group: int | None
    symmetric: bool | None
    text: str
    tokens: int
    window: int
    perplexity: float
    nll: float
    quant_seconds: float | None
    seconds: float
    device: str


def quantize_loaded(loaded: models.LoadedModel, config: MethodConfig, calibration: Calibration) -> QuantizedModel:
    rows = calibration.rows(loaded.tokenizer.backend_tokenizer) if config.needs_calibration else None
    return quantize(loaded.model, config, rows)


def run_quantize(model_spec: str | None, config: MethodConfig, calibration: Calibration, out: str) -> QuantizeResult:
    loaded = models.load(model_spec)
    quantized = quantize_loaded(loaded, config, calibration)
    used = calibration if config.needs_calibration else None
    folder = checkpoint.save(quantized, loaded.tokenizer, loaded.ref, out, used)
    scheme = config.scheme
    return QuantizeResult(loaded.ref.name, config.method, scheme.bits, scheme.group_size, scheme.symmetric,
                          len(quantized.weights), round(quantized.seconds, 3), str(folder),
                          folder_bytes(folder))


def run_eval(model_spec: str | None, config: MethodConfig | None, calibration: Calibration, text: str, tokens: int,
             window: int) -> EvalResult:
    """Perplexity of a model (quantized on the fly when `config` is given) or of a checkpoint."""
    start = time.perf_counter()
    if model_spec and checkpoint.is_checkpoint(model_spec):
        if config is not None:
            raise InvalidQuantConfig(f"{model_spec} is already a quantized checkpoint",
                                     "drop --quantize, or pass the float model to quantize it on the fly")
        loaded = checkpoint.load(model_spec)
        name = Path(model_spec).name
        record = loaded.record["quantization"]
        method, scheme = record["method"], record["scheme"]
        quant_seconds = loaded.record["seconds"]
    else:
        loaded = models.load(model_spec)
        name = loaded.ref.name
        quant_seconds = quantize_loaded(loaded, config, calibration).seconds if config is not None else None
        method = config.method if config else "fp"
        scheme = asdict(config.scheme) if config else {}
    ids = eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus(text), tokens)
    result = perplexity(loaded.model.to(compute_device()), ids, window)
    return EvalResult(name, method, scheme.get("bits"), scheme.get("group_size"), scheme.get("symmetric"),
                      text, result.tokens, window, round(result.perplexity, 4), round(result.nll, 6),
                      None if quant_seconds is None else round(quant_seconds, 2),
                      round(time.perf_counter() - start, 2), compute_device().type)
