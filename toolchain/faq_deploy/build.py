"""`faq-deploy build`: model → calibration → quantization → export → parity → bundle, in one job.

Every stage's output feeds the next and nothing is written at `out` until the bundle is whole.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faq_deploy import bundle, checkpoint, models
from faq_deploy.data import Calibration, eval_tokens, load_corpus
from faq_deploy.errors import ExportError
from faq_deploy.export import ExportOptions, check_codes, export_builder
from faq_deploy.fetch import folder_bytes
from faq_deploy.jobs import quantize_loaded
from faq_deploy.parity import Parity, compare, onnx_logits
from faq_deploy.perplexity import perplexity
from faq_deploy.quant import describe
from faq_deploy.quant.scheme import MethodConfig
from faq_deploy.registry import Target
from faq_runtime.model import Decoder

EVAL_TEXT = "speeches-eval"
STAGES = 6
# Next-token agreement below this means a broken export, not rounding: level 0 agrees on 100%, and
# level 4's int8 activations on ~97% (default model, RTN w4 g32, 1,024 tokens).
MIN_AGREEMENT = 0.95


@dataclass(frozen=True)
class BuildResult:
    bundle: str
    bundle_id: str
    target: str
    model: str
    method: str
    bits: int
    group: int
    bundle_bytes: int
    float_bytes: int
    weights_bytes: int
    kv_cache_bytes: int
    context: int
    decode_ceiling_tokens_s: float | None
    perplexity_float: float
    perplexity_bundle: float
    eval_tokens: int
    parity: dict[str, float]
    seconds: dict[str, float]


@contextmanager
def _stage(number: int, name: str, seconds: dict[str, float]) -> Iterator[None]:
    print(f"[{number}/{STAGES}] {name}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 2)


def run_build(model_spec: str | None, config: MethodConfig, calibration: Calibration, target: Target, out: Path,
              export: ExportOptions, n_eval: int, context: int) -> BuildResult:
    seconds: dict[str, float] = {}
    with _stage(1, "load model and held-out text", seconds):
        loaded = models.load(model_spec)
        ids = eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus(EVAL_TEXT), n_eval)
        window = min(1024, len(ids))
        float_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        before = perplexity(loaded.model, ids, window)
    with _stage(2, f"quantize ({config.method})", seconds):
        quantized = quantize_loaded(loaded, config, calibration)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-work-") as work:
        with _stage(3, "export (onnxruntime-genai builder)", seconds):
            used = calibration if config.needs_calibration else None
            ckpt = checkpoint.save(quantized, loaded.tokenizer, loaded.ref, Path(work) / "checkpoint", used)
            model_dir = export_builder(ckpt, Path(work) / "model", export)
            modules = check_codes(model_dir, quantized.weights)
        with _stage(4, "parity with the quantized torch model", seconds):
            decoder = Decoder(model_dir)
            parity = compare(quantized.model, decoder, ids[:window])
            if parity.argmax_agreement < MIN_AGREEMENT:
                raise ExportError(f"the exported graph agrees with the torch model on only "
                                  f"{parity.argmax_agreement:.1%} of next tokens", "report this model and settings")
        with _stage(5, "perplexity of the exported graph", seconds):
            after = perplexity(onnx_logits(decoder), ids, window)
        with _stage(6, "bundle", seconds):
            spec = decoder.spec
            weights_bytes = folder_bytes(model_dir)
            kv_bytes = 2 * spec.layers * spec.kv_heads * spec.head_size * context * np.dtype(decoder.kv_dtype).itemsize
            bandwidth = target.capability.get("bandwidth_gbs")
            ceiling = round(bandwidth * 1e9 / weights_bytes, 1) if bandwidth else None
            result = dict(
                target=target.name, model=loaded.ref.name, method=config.method, bits=config.scheme.bits,
                group=config.scheme.group_size, float_bytes=float_bytes, weights_bytes=weights_bytes,
                kv_cache_bytes=kv_bytes, context=context, decode_ceiling_tokens_s=ceiling,
                perplexity_float=round(before.perplexity, 4), perplexity_bundle=round(after.perplexity, 4),
                eval_tokens=before.tokens, parity=asdict(parity))
            sections = {
                "source": {"name": loaded.ref.name, "kind": loaded.ref.kind, "sha256": loaded.ref.sha256},
                "quantization": {**describe(config), "calibration": asdict(used) if used else None,
                                 "modules": modules},
                "export": {"exporter": "builder", **asdict(export)},
                "target": target.record(),
                "memory": {"weights_bytes": weights_bytes, "kv_cache_bytes": kv_bytes, "context": context},
                "evaluation": {"text": EVAL_TEXT, "tokens": before.tokens, "window": window,
                               "perplexity_float": result["perplexity_float"],
                               "perplexity_bundle": result["perplexity_bundle"], "parity": asdict(parity)},
            }
            written = bundle.write(out, model_dir, sections, report(result, target, parity))
    return BuildResult(bundle=str(out), bundle_id=written.id, bundle_bytes=folder_bytes(out), seconds=seconds,
                       **result)


def report(result: dict[str, Any], target: Target, parity: Parity) -> str:
    """REPORT.md: the build's numbers for a human."""
    mb = 1 / 1e6
    lines = [
        f"# {result['model']} for {target.name}", "",
        f"{target.description}.", "",
        "| | |", "|---|---|",
        f"| method | {result['method']}, {result['bits']}-bit, group {result['group']} |",
        f"| weights | {result['weights_bytes'] * mb:.1f} MB (float model {result['float_bytes'] * mb:.1f} MB) |",
        f"| KV cache at {result['context']} tokens | {result['kv_cache_bytes'] * mb:.1f} MB |",
        f"| perplexity, {result['eval_tokens']} tokens of {EVAL_TEXT} | float {result['perplexity_float']:.4f} → "
        f"bundle {result['perplexity_bundle']:.4f} |",
        f"| parity with the quantized torch model | {parity.argmax_agreement:.2%} next-token agreement, "
        f"max relative logit difference {parity.max_rel_diff:.2e} over {parity.tokens} tokens |",
    ]
    if result["decode_ceiling_tokens_s"]:
        lines.append(f"| decode ceiling (bandwidth ÷ weight bytes) | {result['decode_ceiling_tokens_s']} tokens/s |")
    return "\n".join(lines) + "\n"
