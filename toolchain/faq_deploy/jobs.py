"""The end-to-end jobs the CLI runs, composed from the pipeline stages; results are plain data."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tokenizers import Tokenizer

from faq_deploy import bundle, checkpoint, checks, models
from faq_deploy.data import Calibration, eval_tokens, load_corpus
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.export.options import ExportOptions
from faq_deploy.export.parity import onnx_logits
from faq_deploy.perplexity import perplexity
from faq_deploy.quant import QuantizedModel, budget, compute_device, quantize
from faq_deploy.quant.gguf import GgufConfig, planned
from faq_deploy.quant.scheme import MethodConfig
from faq_runtime.bundle import MANIFEST, MODEL_DIR
from faq_runtime.files import folder_bytes
from faq_runtime.model import GENAI_CONFIG, Decoder

# Calibration rows the byte budget's sensitivity pass takes (one backward each)
BUDGET_ROWS = 8


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


def quantize_loaded(loaded: models.LoadedModel, config: MethodConfig, calibration: Calibration,
                    budget_bytes: int | None = None, export: ExportOptions = ExportOptions()) -> QuantizedModel:
    """Quantize with `config`; with a byte budget, the Linears' schemes are first chosen so that the
    graph `export` writes fits it (quant/budget.py), and the result's config carries them. A GGUF
    config reads the codes of the file `loaded` came from."""
    start = time.perf_counter()
    if isinstance(config, GgufConfig):  # the codes come from the file the model was read from
        if budget_bytes:
            raise InvalidQuantConfig("--budget chooses each Linear's width, --method gguf keeps the file's",
                                     "drop --budget, or quantize the float model with another method")
        config = planned(config, loaded.model, loaded.ref.gguf)
    rows = calibration.rows(loaded.tokenizer.backend_tokenizer) if config.needs_calibration or budget_bytes else None
    if budget_bytes:  # the bundle `export` writes holds scales in its precision: quantize for those
        config = replace(config, scheme=replace(config.scheme, scale_dtype=export.scale_dtype))
        capacity = budget_bytes - checks.other_weight_bytes(loaded.model, export, export.scale_dtype)
        overrides = budget.allocate(loaded.model, config.scheme, rows[:BUDGET_ROWS], capacity)
        config = replace(config, overrides=overrides)
    result = quantize(loaded.model, config, rows if config.needs_calibration else None)
    return replace(result, seconds=time.perf_counter() - start)


def run_quantize(model_spec: str | None, config: MethodConfig, calibration: Calibration, out: str,
                 budget_bytes: int | None = None) -> QuantizeResult:
    loaded = models.load(model_spec)
    quantized = quantize_loaded(loaded, config, calibration, budget_bytes)
    used = calibration if config.needs_calibration or budget_bytes else None
    folder = checkpoint.save(quantized, loaded.tokenizer, loaded.ref, out, used)
    scheme = config.scheme
    return QuantizeResult(loaded.ref.name, config.method, scheme.bits, scheme.group_size, scheme.symmetric,
                          len(quantized.weights), round(quantized.seconds, 3), str(folder),
                          folder_bytes(folder))


def exported_folder(spec: str | None) -> Path | None:
    """The ONNX model folder `spec` names: a bundle (its model/) or a folder with genai_config.json."""
    path = Path(spec).expanduser() if spec else None
    if path is None or not path.is_dir():
        return None
    folder = path / MODEL_DIR if (path / MANIFEST).is_file() else path
    return folder if (folder / GENAI_CONFIG).is_file() else None


def _eval_exported(path: Path, folder: Path, text: str, tokens: int, window: int, start: float) -> EvalResult:
    """Perplexity of the shipped graph itself, through onnxruntime's CPU provider, on the same tokens
    and windows as the torch evaluation."""
    manifest = bundle.verify(path).manifest if folder != path else None
    quant = manifest["quantization"] if manifest else {}
    scheme = quant.get("scheme", {})
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = eval_tokens(tokenizer, load_corpus(text), tokens)
    result = perplexity(onnx_logits(Decoder(folder)), ids, window)
    return EvalResult(manifest["source"]["name"] if manifest else path.name, quant.get("method", "onnx"),
                      scheme.get("bits"), scheme.get("group_size"), scheme.get("symmetric"), text, result.tokens,
                      window, round(result.perplexity, 4), round(result.nll, 6), None,
                      round(time.perf_counter() - start, 2), "onnxruntime-cpu")


def run_eval(model_spec: str | None, config: MethodConfig | None, calibration: Calibration, text: str, tokens: int,
             window: int, budget_bytes: int | None = None) -> EvalResult:
    """Perplexity of a model (quantized on the fly when `config` is given), of a checkpoint, or of an
    exported graph (a bundle or its model folder)."""
    start = time.perf_counter()
    if folder := exported_folder(model_spec):
        if config is not None:
            raise InvalidQuantConfig(f"{model_spec} is an exported graph, already quantized",
                                     "drop --quantize, or pass the float model to quantize it on the fly")
        return _eval_exported(Path(model_spec), folder, text, tokens, window, start)
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
        quant_seconds = quantize_loaded(loaded, config, calibration, budget_bytes).seconds if config else None
        method = config.method if config else "fp"
        scheme = asdict(config.scheme) if config else {}
    ids = eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus(text), tokens)
    result = perplexity(loaded.model.to(compute_device()), ids, window)
    return EvalResult(name, method, scheme.get("bits"), scheme.get("group_size"), scheme.get("symmetric"),
                      text, result.tokens, window, round(result.perplexity, 4), round(result.nll, 6),
                      None if quant_seconds is None else round(quant_seconds, 2),
                      round(time.perf_counter() - start, 2), compute_device().type)
