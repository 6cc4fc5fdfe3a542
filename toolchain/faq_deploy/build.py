"""`faq-deploy build`: model → calibration → quantization → export → parity → bundle, in one job.

Every stage's output feeds the next and nothing is written at `out` until the bundle is whole.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faq_deploy import bundle, checkpoint, checks, emulate, forked, models, wheelhouse
from faq_deploy.data import Calibration, eval_tokens, load_corpus
from faq_deploy.errors import EmulationError, ExportError
from faq_deploy.export.codes import check_codes
from faq_deploy.export.graph import weight_files_bytes
from faq_deploy.export.options import ExportOptions
from faq_deploy.export.parity import Parity, compare, compare_logits, onnx_logits, reference_logits
from faq_deploy.export.steps import export, finish
from faq_deploy.jobs import quantize_loaded
from faq_deploy.models import DEFAULT_MODEL, LoadedModel, ModelRef
from faq_deploy.perplexity import WINDOW, Logits, Perplexity, perplexity
from faq_deploy.quant import QuantizedWeight, describe
from faq_deploy.quant.gguf import GgufConfig
from faq_deploy.quant.scheme import MethodConfig
from faq_deploy.registry import Target
from faq_runtime.files import folder_bytes
from faq_runtime.fit import GIB
from faq_runtime.model import Decoder

EVAL_TEXT = "speeches-eval"
STAGES = 7
# Next-token agreement below this means a broken export, not rounding: level 0 agrees on 100%, and
# level 4's int8 activations on 94.7-97% (default model, RTN w3/w4 g32, both exporters, 1,000 tokens;
# perplexity within 0.2%). It is measured on PARITY_TOKENS whatever --eval-tokens asks: on 256 tokens
# a dozen tokens decide it (one build read 93%).
MIN_AGREEMENT = 0.93
PARITY_TOKENS = 1024


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
    memory_bytes: int            # weights + KV cache at `context` + runtime overhead
    context: int
    fits_gb: list[float]         # the target's RAM sizes that hold `memory_bytes`, and those that do not
    too_small_gb: list[float]
    decode_ceiling_tokens_s: float | None
    warnings: list[str]          # problems --force built past
    notes: list[str]             # modules the method treated apart from its rule, and why (a GGUF's fallbacks)
    tar: str | None              # <bundle>.tar when asked for
    perplexity_float: float
    perplexity_bundle: float
    eval_tokens: int
    parity: dict[str, float]
    parity_emulated: dict[str, Any] | None  # on the target's CPU architecture, emulated (--emulated-parity)
    seconds: dict[str, float]
    peak_rss_bytes: dict[str, int]  # per stage (Stages says how it is counted)


def _own_peak_rss() -> int:
    """This process's peak resident bytes since the last reset (VmHWM; ru_maxrss where /proc lacks it)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _children_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _release_memory() -> None:
    """Hand freed memory back to the system: glibc keeps the pages of freed tensors in its heaps (on
    Qwen2.5-0.5B: 1.1 GB of the dropped model, 1.3 GB after the graph edits), which would count
    against the exporter beside us and the next stage's peak."""
    gc.collect()
    with suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(None).malloc_trim(0)


@dataclass
class Stages:
    """Announces each stage on stderr and records its seconds and peak memory: this process's peak in
    the stage plus what a helper added, which bounds what the stage held at once. A forked helper (the
    builder) reports what it added itself (faq_deploy.forked); a child process otherwise counts when
    it set a new peak among our children in the stage (pip, the emulator)."""

    total: int = STAGES
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"[{len(self.seconds) + 1}/{self.total}] {name}", file=sys.stderr, flush=True)
        _release_memory()  # each stage starts from what the last one left alive
        with suppress(OSError):  # Linux: restart VmHWM from the current RSS, so the peak is this stage's
            Path("/proc/self/clear_refs").write_text("5")
        children, mark, start = _children_peak_rss(), forked.runs(), time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        child = _children_peak_rss()
        added = forked.added_peak(mark)
        self.peak_rss_bytes[name] = _own_peak_rss() + (added if added is not None else
                                                       child if child > children else 0)


def _checked(target: Target, config: MethodConfig, export: ExportOptions, footprint: checks.Footprint,
             force: bool) -> checks.Assessment:
    assessment = checks.assess(target, config.scheme, footprint, export)
    for warning in checks.enforce(assessment, force):
        print(f"warning: {warning} (--force)", file=sys.stderr)
    return assessment


def _load(model_spec: str | None, config: MethodConfig, target: Target, options: ExportOptions, context: int,
          force: bool) -> tuple[LoadedModel, ExportOptions]:
    """The model, with the export options it decides, once the target's checks pass on an estimate."""
    loaded = models.load(model_spec)
    options = options.for_model(loaded.model)
    _checked(target, config, options, checks.estimate(loaded.model, config, context, options), force)
    return loaded, options


def _emulation_checked(target: Target, options: ExportOptions, wheels: bool) -> None:
    """What --emulated-parity needs, checked before the long work."""
    if not wheels:
        raise EmulationError("--emulated-parity installs the runtime in the emulated board from the bundle's wheels",
                             "add --wheelhouse")
    if options.provider != "cpu":
        raise EmulationError(f"the emulated board runs onnxruntime's CPU provider, not this {options.provider} graph's",
                             "drop --emulated-parity, or build with --provider cpu")
    emulate.core_for(target)
    emulate.check_host()


def _emulated_parity(target: Target, expected: torch.Tensor, decoder: Decoder, ids: torch.Tensor, work: Path,
                     wheels: Path) -> dict[str, Any]:
    """Parity and perplexity (one window of `ids`) of the graph as the target's CPU architecture computes
    it, beside this machine's: the build's gate stays this machine's figure."""
    core = emulate.core_for(target)
    board = torch.from_numpy(emulate.emulated_logits(target, decoder.folder, wheels, ids.tolist(), work))
    host = torch.from_numpy(decoder.logits(ids.tolist()))

    def window(logits: torch.Tensor) -> float:
        return round(perplexity(lambda _row: logits, ids, len(ids)).perplexity, 4)

    return {"machine": target.identity.machine, "emulated": f"qemu-user {core.qemu}, Debian {emulate.SUITE}",
            **asdict(compare_logits(expected, board)),
            "agreement_with_host": float((board.argmax(-1) == host.argmax(-1)).float().mean()),
            "perplexity": window(board), "perplexity_host": window(host), "perplexity_torch": window(expected)}


def _checked_parity(expected: torch.Tensor, decoder: Decoder, ids: torch.Tensor) -> Parity:
    parity = compare(expected, decoder, ids)
    if parity.argmax_agreement < MIN_AGREEMENT:
        raise ExportError(f"the exported graph agrees with the torch model on only {parity.argmax_agreement:.1%} "
                          "of next tokens", "report this model and settings")
    return parity


def default_out(model_spec: str | None, target: Target) -> Path:
    """build/<model>-<target>: where a build goes when no --out is given."""
    name = model_spec.rstrip("/").split("/")[-1].removesuffix(".gguf") if model_spec else DEFAULT_MODEL.key
    return Path("build") / f"{name.lower()}-{target.name}"


@dataclass(frozen=True)
class _HeldOut:
    """The held-out tokens a build checks the bundle on, and the float model's score there."""

    ids: torch.Tensor        # parity reads the first PARITY_TOKENS, perplexity the first `scored`
    scored: int
    before: Perplexity       # the float model's
    float_bytes: int

    @property
    def parity_ids(self) -> torch.Tensor:
        return self.ids[:PARITY_TOKENS]

    def score(self, logits: Logits) -> Perplexity:
        return perplexity(logits, self.ids[:self.scored], self.before.window)


def _held_out(loaded: LoadedModel, n_eval: int) -> _HeldOut:
    ids = eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus(EVAL_TEXT), max(n_eval, PARITY_TOKENS))
    return _HeldOut(ids, n_eval, perplexity(loaded.model, ids[:n_eval], min(WINDOW, n_eval)),
                    sum(p.numel() * p.element_size() for p in loaded.model.parameters()))


@dataclass(frozen=True)
class _Quantized:
    """What the quantize stage leaves on disk, and how it was made."""

    checkpoint: Path
    config: MethodConfig                # with the budget's schemes
    calibration: Calibration | None     # None where the method used no calibration text
    source: ModelRef


def _quantize(loaded: LoadedModel, config: MethodConfig, calibration: Calibration, budget_bytes: int | None,
              options: ExportOptions, folder: Path) -> tuple[_Quantized, dict[str, QuantizedWeight]]:
    """The quantized checkpoint, and the packed codes the export is checked against."""
    quantized = quantize_loaded(loaded, config, calibration, budget_bytes, options)
    used = calibration if quantized.config.needs_calibration or budget_bytes else None
    path = checkpoint.save(quantized, loaded.tokenizer, loaded.ref, folder, used)
    return _Quantized(path, quantized.config, used, loaded.ref), quantized.weights


def _finish(model_dir: Path, quantized: _Quantized, options: ExportOptions,
            budget_bytes: int | None) -> torch.nn.Module:
    """Edit the exported graph into the bundle's (tables, accuracy levels, scales); returns the torch
    model the edits agree with, read back from the checkpoint."""
    read = checkpoint.load(quantized.checkpoint)
    finish(model_dir, read, options, quantized.config.scheme)
    if budget_bytes and (written := weight_files_bytes(model_dir)) > budget_bytes:
        raise ExportError(f"the weight files hold {written:,} bytes, over the budget of {budget_bytes:,}",
                          "report this (the estimate missed); a slightly lower --budget builds")
    return read.model


def _sections(quantized: _Quantized, target: Target, options: ExportOptions, footprint: checks.Footprint,
              fit: checks.Assessment, result: dict[str, Any], window: int, modules: int,
              budget_bytes: int | None, wheel_line: str | None) -> dict[str, Any]:
    """manifest.json's sections beside the files: where the model came from, how it was quantized and
    exported, what the target needs, what it holds in memory, and what the build measured."""
    source = quantized.source
    return {
        "source": {"name": source.name, "kind": source.kind, "sha256": source.sha256,
                   "license": source.license, "upstream": source.upstream},
        "quantization": {**describe(quantized.config),
                         "calibration": asdict(quantized.calibration) if quantized.calibration else None,
                         "modules": modules, "budget_bytes": budget_bytes},
        "export": asdict(options),
        "target": {"name": target.name, "description": target.description,
                   "compatibility": checks.requirements(target, footprint, options, wheel_line)},
        "memory": {"weights_bytes": footprint.weights_bytes, "kv_cache_bytes": footprint.kv_cache_bytes,
                   "overhead_bytes": footprint.overhead_bytes, "total_bytes": footprint.total_bytes,
                   "context": result["context"], "fits_gb": list(fit.fits_gb),
                   "decode_ceiling_tokens_s": fit.decode_ceiling_tokens_s},
        "evaluation": {"text": EVAL_TEXT, "tokens": result["eval_tokens"], "window": window,
                       "perplexity_float": result["perplexity_float"],
                       "perplexity_bundle": result["perplexity_bundle"], "parity": result["parity"],
                       **({"parity_emulated": result["parity_emulated"]} if result["parity_emulated"] else {})},
    }


def run_build(model_spec: str | None, config: MethodConfig, calibration: Calibration, target: Target, out: Path,
              options: ExportOptions, n_eval: int, context: int, *, force: bool = False, wheels: bool = False,
              tar: bool = False, budget_bytes: int | None = None, emulated_parity: bool = False) -> BuildResult:
    """Build a bundle of `model_spec` for `target`. The target's checks run on an estimate right after
    loading (so a build that cannot work stops in seconds) and again on the exported files. `wheels`
    adds the runtime's wheelhouse for the target (fetched in stage 1, before the long work); `tar` also
    writes `<out>.tar`; `budget_bytes` caps the weight files by mixed precision (jobs.quantize_loaded);
    `emulated_parity` measures parity again on the target's CPU architecture under emulation (emulate.py).

    Each stage is one or two calls; what one stage hands the next is named here, and the big objects
    (the float model, the packed codes, the torch reference) are dropped as soon as the next stage no
    longer needs them, since each stage's peak memory is measured and reported."""
    if emulated_parity:
        _emulation_checked(target, options, wheels)
    stage = Stages(STAGES + emulated_parity)
    # quantize for the scales the graph holds, so codes, torch model and graph all agree on them
    config = replace(config, scheme=replace(config.scheme, scale_dtype=options.scale_dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-work-") as tmp:
        work = Path(tmp)
        wheel_dir = work / "wheels" if wheels else None
        with stage("load model and held-out text" + (", download wheels" if wheels else "")):
            loaded, options = _load(model_spec, config, target, options, context, force)
            wheel_line = wheelhouse.download(target, wheel_dir) if wheel_dir else None
            text = _held_out(loaded, n_eval)
        with stage(f"quantize ({config.method})"):
            quantized, weights = _quantize(loaded, config, calibration, budget_bytes, options, work / "checkpoint")
            # The exporter holds the whole model again in its own process: ours goes meanwhile (freed as
            # the next stage starts) and comes back from the checkpoint, the same values, for the edits
            # and parity. On Qwen2.5-Coder-0.5B the build's peak went from 12.7 to 5.5 GB.
            del loaded
        with stage(f"export ({options.exporter})"):
            model_dir = export(quantized.checkpoint, work / "model", options)
            modules = check_codes(model_dir, weights)
            del weights
        with stage("edit tables, accuracy levels and scales"):
            model = _finish(model_dir, quantized, options, budget_bytes)
        with stage("parity with the quantized torch model"):
            expected = reference_logits(model, text.parity_ids)
            del model  # before the graph loads: the two at once were the build's peak (7.1 GB on Qwen2.5-0.5B)
            decoder = Decoder(model_dir)
            parity = _checked_parity(expected, decoder, text.parity_ids)
        with stage("perplexity of the exported graph"):
            after = text.score(onnx_logits(decoder))
        emulated = None
        if emulated_parity:
            with stage(f"parity on {target.identity.machine}, emulated"):
                emulated = _emulated_parity(target, expected, decoder, text.parity_ids, work / "emulated",
                                            work / "wheels")
        del expected
        with stage("bundle"):
            spec = decoder.spec
            footprint = checks.measure(model_dir, spec.layers, spec.kv_heads, spec.head_size,
                                       np.dtype(decoder.kv_dtype).itemsize, context)
            config = quantized.config
            fit = _checked(target, config, options, footprint, force)
            result = dict(
                target=target.name, model=quantized.source.name, method=config.method, bits=config.scheme.bits,
                group=config.scheme.group_size, float_bytes=text.float_bytes, weights_bytes=footprint.weights_bytes,
                kv_cache_bytes=footprint.kv_cache_bytes, memory_bytes=footprint.total_bytes, context=context,
                fits_gb=list(fit.fits_gb), too_small_gb=list(fit.too_small_gb),
                decode_ceiling_tokens_s=fit.decode_ceiling_tokens_s,
                warnings=[p.cause for p in fit.problems], notes=config.notes,
                perplexity_float=round(text.before.perplexity, 4), perplexity_bundle=round(after.perplexity, 4),
                eval_tokens=text.before.tokens, parity=asdict(parity), parity_emulated=emulated)
            sections = _sections(quantized, target, options, footprint, fit, result, text.before.window, modules,
                                 budget_bytes, wheel_line)
            written = bundle.write(out, model_dir, sections, report(result, target, parity), wheel_dir)
            packed = bundle.write_tar(out) if tar else None
    return BuildResult(bundle=str(out), bundle_id=written.id, bundle_bytes=folder_bytes(out), seconds=stage.seconds,
                       peak_rss_bytes=stage.peak_rss_bytes, tar=str(packed) if packed else None, **result)


def summary(result: BuildResult, target: Target) -> list[str]:
    """The build's outcome as the lines `faq-deploy build` prints."""
    mb = 1e6
    seconds = ", ".join(f"{k.split(' ')[0]} {v:.0f} s" for k, v in result.seconds.items())
    peaks = ", ".join(f"{k.split(' ')[0]} {v / 1e9:.2f}" for k, v in result.peak_rss_bytes.items())
    return [
        f"bundle     {result.bundle}  (id {result.bundle_id})",
        *([f"tar        {result.tar}"] if result.tar else []),
        f"target     {result.target}",
        f"model      {result.model}: {method_words(asdict(result))}",
        f"size       {result.bundle_bytes / mb:.1f} MB (float model {result.float_bytes / mb:.1f} MB)",
        *(f"{key:<10} {line}" for key, line in fit_lines(asdict(result), target).items()),
        f"perplexity {result.perplexity_float:.4f} float → {result.perplexity_bundle:.4f} bundle "
        f"({result.eval_tokens} tokens)",
        f"parity     {result.parity['argmax_agreement']:.2%} next-token agreement with the torch model",
        *([f"{result.parity_emulated['machine']:<10} {emulated_words(result.parity_emulated)}"]
          if result.parity_emulated else []),
        f"time       {sum(result.seconds.values()):.0f} s ({seconds})",
        f"rss        {max(result.peak_rss_bytes.values()) / 1e9:.2f} GB at the build's peak ({peaks})",
        *(f"note       {note}" for note in result.notes),
    ]


def report(result: dict[str, Any], target: Target, parity: Parity) -> str:
    """REPORT.md: the build's numbers for a human."""
    mb = 1 / 1e6
    lines = [
        f"# {result['model']} for {target.name}", "",
        f"{target.description}.", "",
        "| | |", "|---|---|",
        f"| method | {method_words(result)} |",
        f"| weights | {result['weights_bytes'] * mb:.1f} MB (float model {result['float_bytes'] * mb:.1f} MB) |",
        f"| KV cache at {result['context']} tokens | {result['kv_cache_bytes'] * mb:.1f} MB |",
        f"| perplexity, {result['eval_tokens']} tokens of {EVAL_TEXT} | float {result['perplexity_float']:.4f} → "
        f"bundle {result['perplexity_bundle']:.4f} |",
        f"| parity with the quantized torch model | {parity.argmax_agreement:.2%} next-token agreement, "
        f"max relative logit difference {parity.max_rel_diff:.2e} over {parity.tokens} tokens |",
    ]
    if emulated := result["parity_emulated"]:
        lines.append(f"| parity on {emulated['machine']} (measured there, emulated) | {emulated_words(emulated)} |")
    lines += [f"| {key} | {value} |" for key, value in fit_lines(result, target).items()]
    if result["notes"]:
        lines += ["", "## Notes", "", *(f"- {note}" for note in result["notes"])]
    return "\n".join(lines) + "\n"


def emulated_words(emulated: dict[str, Any]) -> str:
    """The emulated parity record, worded for the summary and REPORT.md."""
    return (f"{emulated['argmax_agreement']:.2%} next-token agreement with the torch model over {emulated['tokens']} "
            f"tokens ({emulated['agreement_with_host']:.2%} with this machine's graph); perplexity of one "
            f"{emulated['tokens']}-token window {emulated['perplexity']:.4f} against {emulated['perplexity_host']:.4f} "
            f"here and {emulated['perplexity_torch']:.4f} in torch ({emulated['emulated']})")


def method_words(result: dict[str, Any]) -> str:
    """The method as the summary and REPORT.md name it: a GGUF's codes have the file's widths, not one."""
    if result["method"] == GgufConfig.method:
        return "gguf, the file's own blocks carried over exactly"
    return f"{result['method']} w{result['bits']} g{result['group']}"


def fit_lines(result: dict[str, Any], target: Target) -> dict[str, str]:
    """The memory fit and the speed ceiling on the target, worded for the summary and REPORT.md."""
    lines = {}
    mb = 1e6
    need = (f"{result['memory_bytes'] / GIB:.2f} GiB at {result['context']} tokens (weights "
            f"{result['weights_bytes'] / mb:.0f} MB + KV cache {result['kv_cache_bytes'] / mb:.0f} MB + runtime "
            f"{(result['memory_bytes'] - result['weights_bytes'] - result['kv_cache_bytes']) / mb:.0f} MB)")
    if result["fits_gb"] or result["too_small_gb"]:
        sizes = f"fits {', '.join(f'{gb:g}' for gb in result['fits_gb']) or 'no'} GB"
        if result["too_small_gb"]:
            sizes += f", not {', '.join(f'{gb:g}' for gb in result['too_small_gb'])} GB"
        lines["fit"] = f"{need}: {sizes} {target.name}"
    else:
        lines["fit"] = f"{need}: not checked ({target.name} does not state its RAM; the device checks at push)"
    if result["decode_ceiling_tokens_s"]:
        lines["ceiling"] = (f"≤ {result['decode_ceiling_tokens_s']} tokens/s decode at full context "
                            f"({target.capability.bandwidth_gbs:g} GB/s ÷ bytes read per token)")
    if result["warnings"]:
        lines["forced past"] = "; ".join(result["warnings"])
    return lines
