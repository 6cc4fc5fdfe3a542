"""Build-time checks of a model and scheme against a target: can the board run it, will it fit, how fast
can it go at most.

`estimate` predicts the exported graph's footprint from the torch model before any quantization, so a
build that cannot work fails in seconds; `measure` reads the real one after export. `assess` turns
either into the fit per RAM size, the decode-speed ceiling and the problems, each with its fix.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from faq_deploy.architectures import block_linears, head_size
from faq_deploy.errors import TargetError
from faq_deploy.export.builder import BUILDER_BITS
from faq_deploy.export.options import TABLE_SCHEMES, ExportOptions
from faq_deploy.export.planes import planes_problem
from faq_deploy.quant.packing import stored_bytes
from faq_deploy.quant.scheme import MethodConfig, QuantScheme
from faq_deploy.registry import Target
from faq_runtime.compat import ONNXRUNTIME_MIN, PYTHON_MIN, version
from faq_runtime.files import folder_bytes
from faq_runtime.fit import GIB, RUNTIME_OVERHEAD, kv_cache_bytes

_DTYPE_BYTES = {"float32": 4, "float16": 2}


@dataclass(frozen=True)
class Footprint:
    """Memory a bundle needs on the device at `context` tokens."""

    weights_bytes: int
    kv_cache_bytes: int
    context: int
    overhead_bytes: int = RUNTIME_OVERHEAD

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes


@dataclass(frozen=True)
class Problem:
    cause: str
    fix: str
    forceable: bool  # --force may override: the device-side checks still guard the board


@dataclass(frozen=True)
class Assessment:
    target: str
    footprint: Footprint
    fits_gb: tuple[float, ...]          # RAM sizes of the board the bundle fits
    too_small_gb: tuple[float, ...]     # and those it does not
    decode_ceiling_tokens_s: float | None  # bandwidth ÷ bytes read per token (weights + full KV cache)
    problems: tuple[Problem, ...]


# The graph's own structure (nodes, names, attributes) in model.onnx: 1.4 KB per block Linear on the
# default model; counted at 4 KB so that a byte budget holds whatever the layout.
GRAPH_BYTES_PER_LINEAR = 4096


def other_weight_bytes(model: nn.Module, export: ExportOptions, scale_dtype: str) -> int:
    """The exported weight files (model.onnx and its data) less the block Linears: the lm_head and the
    embedding as `export` stores them (a tied pair quantized alike is stored once; a tied pair with one
    of them float keeps one float copy), every other tensor and the rotary cos/sin tables in the graph's
    float type, and the graph's structure."""
    act = _DTYPE_BYTES[export.activation_dtype]
    linears = list(block_linears(model).values())
    covered = {id(linear.weight) for linear in linears}
    head, table = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    packed = [(weight, replace(export.table_scheme(kind), scale_dtype=scale_dtype))
              for weight, kind in ((head, export.lm_head), (table, export.embedding)) if kind in TABLE_SCHEMES]
    stored_once = head is table and export.lm_head == export.embedding
    tables = sum(stored_bytes(*weight.shape, scheme) for weight, scheme in packed[: 1 if stored_once else 2])
    if head is not table or len(packed) == 2:
        covered.update(id(weight) for weight, _ in packed)
    floats = sum(p.numel() for p in model.parameters() if id(p) not in covered)
    config = model.config
    rotary = 2 * config.max_position_embeddings * (head_size(config) // 2)
    return tables + (floats + rotary) * act + GRAPH_BYTES_PER_LINEAR * len(linears)


def estimate(model: nn.Module, config: MethodConfig, context: int, export: ExportOptions = ExportOptions()
             ) -> Footprint:
    """The footprint of the exported graph before it exists: every block Linear packed in its own scheme
    (`config.scheme_for`), plus `other_weight_bytes`. The exported weight files of the default model
    come out 0.3% under it; the model folder also holds the tokenizer (3.5 MB there)."""
    linears = block_linears(model)
    quantized = sum(stored_bytes(*linear.weight.shape, config.scheme_for(name)) for name, linear in linears.items())
    other = other_weight_bytes(model, export, config.scheme.scale_dtype)
    spec = model.config
    kv = kv_cache_bytes(spec.num_hidden_layers, spec.num_key_value_heads, head_size(spec), context,
                        _DTYPE_BYTES[export.activation_dtype])
    return Footprint(quantized + other, kv, context)


def measure(model_dir: Path, layers: int, kv_heads: int, head_size: int, kv_dtype_bytes: int,
            context: int) -> Footprint:
    """The footprint of an exported model folder (its files are the weights the runtime maps)."""
    return Footprint(folder_bytes(model_dir), kv_cache_bytes(layers, kv_heads, head_size, context, kv_dtype_bytes),
                     context)


def _software_problems(target: Target, scheme: QuantScheme, export: ExportOptions) -> list[Problem]:
    build, software = target.build, target.software
    found = []
    if export.exporter == "builder" and scheme.bits not in BUILDER_BITS:
        found.append(Problem(f"the builder does not carry {scheme.bits}-bit weights into MatMulNBits",
                             f"use --bits {' or '.join(map(str, BUILDER_BITS))}, or --exporter dynamo", False))
    if scheme.plane_bits and (problem := planes_problem(export)):
        found.append(Problem(problem, "use --bits 4 or 8, or build for the CPU provider", False))
    if export.provider == "cuda" and "CUDA" not in software.execution_providers:
        found.append(Problem(f"{target.name} has no CUDA execution provider for a CUDA graph",
                             "drop --provider cuda", False))
    first = build.providers[0] if build.providers else "CPU"
    if first == "TensorRT" and (export.weights != "qdq" or not scheme.symmetric):
        found.append(Problem("TensorRT runs no MatMulNBits and takes signed codes with no zero point",
                             "build with --weights qdq --symmetric", False))
    ceiling = software.onnxruntime_max
    python = software.python
    if (ceiling and version(ceiling) < version(ONNXRUNTIME_MIN)) or (python and version(python) < version(PYTHON_MIN)):
        found.append(Problem(
            f"{target.name} runs Python {python or '?'}, whose newest onnxruntime is {ceiling or '?'}; bundles need "
            f"onnxruntime ≥ {ONNXRUNTIME_MIN}, which PyPI ships for Python ≥ {PYTHON_MIN} only",
            f"install Python {PYTHON_MIN}+ on the board and describe it in a target file of your own "
            f"(--targets-dir) with its python and onnxruntime_max", False))
    return found


def assess(target: Target, scheme: QuantScheme, footprint: Footprint,
           export: ExportOptions = ExportOptions()) -> Assessment:
    """What `target` makes of a bundle of `scheme` weights exported with `export` and `footprint`."""
    cap = target.capability
    usable = {gb: (gb - target.software.reserved_gb) * GIB for gb in cap.ram_gb}
    fits = tuple(gb for gb, room in usable.items() if footprint.total_bytes <= room)
    too_small = tuple(gb for gb in cap.ram_gb if gb not in fits)
    problems = _software_problems(target, scheme, export)
    if cap.ram_gb and not fits:
        largest = max(cap.ram_gb)
        problems.append(Problem(
            f"needs {footprint.total_bytes / GIB:.2f} GiB at {footprint.context} tokens of context, more than the "
            f"{usable[largest] / GIB:.2f} GiB the {largest:g} GB {target.name} leaves free",
            "use fewer bits, a smaller model or a shorter --context", True))
    bandwidth = cap.bandwidth_gbs
    per_token = footprint.weights_bytes + footprint.kv_cache_bytes
    ceiling = round(bandwidth * 1e9 / per_token, 1) if bandwidth else None
    return Assessment(target.name, footprint, fits, too_small, ceiling, tuple(problems))


def enforce(assessment: Assessment, force: bool) -> list[str]:
    """Raise TargetError listing the problems that stop the build; return the ones forced past."""
    blocking = [p for p in assessment.problems if not (force and p.forceable)]
    if blocking:
        cause = "; ".join(p.cause for p in blocking)
        fixes = "; ".join(p.fix for p in blocking)
        if all(p.forceable for p in blocking):
            fixes += " (or --force to build anyway)"
        raise TargetError(cause, fixes)
    return [p.cause for p in assessment.problems]


def requirements(target: Target, footprint: Footprint, export: ExportOptions,
                 wheels: dict[str, str] | None = None) -> dict[str, object]:
    """The manifest's compatibility record: what faq_runtime.compat.check holds a device to, and the
    runtime's provider order (a CUDA graph tries CUDA first, whatever the target prefers). `wheels` is
    the line of the bundle's wheelhouse, whose Python the device must then run."""
    providers = list(target.build.providers)
    if export.provider == "cuda":
        providers = ["CUDA", *(p for p in providers if p != "CUDA")]
    return {"machine": target.identity.machine, "isa_tier": target.capability.isa_tier,
            "l4t_major": target.identity.l4t_major, "python_min": PYTHON_MIN, "onnxruntime_min": ONNXRUNTIME_MIN,
            "wheels_python": wheels["python"] if wheels else None,
            "memory_bytes": footprint.total_bytes, "providers": providers}
