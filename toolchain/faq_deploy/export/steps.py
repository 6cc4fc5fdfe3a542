"""The two calls a build makes: `export` runs the chosen exporter, `finish` our passes over its graph."""

from __future__ import annotations

from pathlib import Path

from faq_deploy.checkpoint import Checkpoint
from faq_deploy.errors import ExportError
from faq_deploy.export.builder import export_builder
from faq_deploy.export.dynamo import export_dynamo
from faq_deploy.export.graph import (
    drop_default_zero_points,
    edited_graph,
    set_accuracy_levels,
    set_session_option,
    store_scales_in_float16,
)
from faq_deploy.export.offsets import add_offsets
from faq_deploy.export.options import TABLE_SCHEMES, ExportOptions
from faq_deploy.export.planes import add_planes, planes_problem
from faq_deploy.export.qdq import QDQ_ACCURACY_LEVEL, to_qdq
from faq_deploy.export.tables import fake_quantize_tables, quantize_tables
from faq_deploy.quant.scheme import QuantScheme
from faq_runtime.model import THREADS_OPTION

_EXPORTERS = {"builder": export_builder, "dynamo": export_dynamo}


def export(checkpoint: Path, out: Path, options: ExportOptions) -> Path:
    """The checkpoint as a model folder at `out` (replaced atomically), by `options.exporter`."""
    return _EXPORTERS[options.exporter](checkpoint, out, options)


def finish(model_dir: Path, checkpoint: Checkpoint, options: ExportOptions, blocks: QuantScheme) -> None:
    """Our passes over an exported graph, in one load and one save: the tables (rounding the checkpoint's
    model the same way, for parity), the Linears' per-group offsets, 5-bit codes' second nodes,
    accuracy levels, the QDQ form, zero points left to their default, float16 scales; then the board's
    thread count into genai_config.json. `blocks`: the
    Linears' scheme, whose symmetry and scale precision the tables follow."""
    if any(w.scheme.plane_bits for w in checkpoint.weights.values()) and (problem := planes_problem(options)):
        raise ExportError(problem, "build the CPU MatMulNBits graph, or use --five-bit 8bit (gguf) or --bits 4 or 8")
    with edited_graph(model_dir) as onnx_model:
        if TABLE_SCHEMES.keys() & {options.lm_head, options.embedding}:
            tables = fake_quantize_tables(checkpoint.model, options, blocks, checkpoint.tables)
            quantize_tables(onnx_model.graph, *tables)
        add_offsets(onnx_model.graph, checkpoint.weights)
        add_planes(onnx_model.graph, checkpoint.weights)
        set_accuracy_levels(onnx_model.graph, options)
        if options.weights == "qdq":
            to_qdq(onnx_model, str(model_dir))
            set_session_option(model_dir, QDQ_ACCURACY_LEVEL, str(options.accuracy_level))
        drop_default_zero_points(onnx_model.graph, str(model_dir))
        store_scales_in_float16(onnx_model.graph, str(model_dir))
    if options.threads:
        set_session_option(model_dir, THREADS_OPTION, options.threads)
