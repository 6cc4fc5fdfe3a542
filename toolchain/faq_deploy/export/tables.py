"""The vocabulary tables: the lm_head and the embedding as our codes in the exported graph.

Both exporters leave them float; a build stores each as float or our RTN at 8 or 4 bits
(TABLE_SCHEMES): the head as a MatMulNBits node (the largest weight a decode step reads), the
table as GatherBlockQuantized (a token reads one row, but the whole table is resident). The torch
model gets the same rounding (`fake_quantize_tables`), so parity compares like with like.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from faq_deploy.errors import ExportError
from faq_deploy.export.graph import replace_node
from faq_deploy.export.options import EMBEDDING_NODE, LM_HEAD_NODE, TABLE_SCHEMES, ExportOptions
from faq_deploy.quant.quantizer import QuantizedWeight, quantize_weight
from faq_deploy.quant.scheme import QuantScheme


def _storable(weight: QuantizedWeight | None, lookup: bool) -> bool:
    """Whether given codes fit the table's node: neither node adds offsets or a second node, and the
    lookup (GatherBlockQuantized) takes 4 or 8 bits only."""
    return (weight is not None and not weight.scheme.offsets and not weight.scheme.plane_bits
            and (not lookup or weight.scheme.bits in (4, 8)))


def fake_quantize_tables(model: nn.Module, export: ExportOptions, blocks: QuantScheme | None = None,
                         given: dict[str, QuantizedWeight] | None = None) -> tuple[QuantizedWeight | None, ...]:
    """Give the lm_head and the embedding each the table the export stores, as it stores it, so the
    parity check compares like with like (a tied pair is untied on the way): (head, embedding) codes,
    None where that one stays float. Symmetry and scale precision follow the `blocks`' scheme
    (TensorRT's QDQ form takes no zero points; a float16 graph holds float16 scales); None: the default
    scheme's. `given`: codes the method fixed ("lm_head", "model.embed_tokens": a GGUF's own), taken
    instead of our RTN wherever the table is quantized and its node can store them."""
    blocks = blocks or QuantScheme()
    given = given or {}
    codes: list[QuantizedWeight | None] = []
    tables = ((model.get_output_embeddings(), export.lm_head, "lm_head"),
              (model.get_input_embeddings(), export.embedding, "model.embed_tokens"))
    for module, kind, name in tables:
        if kind not in TABLE_SCHEMES:
            codes.append(None)
            continue
        if _storable(given.get(name), lookup=name != "lm_head"):
            codes.append(given[name])
        else:
            scheme = replace(export.table_scheme(kind), symmetric=blocks.symmetric, scale_dtype=blocks.scale_dtype)
            codes.append(quantize_weight(module.weight.detach(), scheme))
        # a new Parameter, not a copy into the old one: a tied partner keeps its own values, and an
        # untied table is not cloned first (544 MB for Qwen2.5's head)
        module.weight = nn.Parameter(codes[-1].dequantize().to(module.weight.dtype), requires_grad=False)
    return tuple(codes)


def quantize_tables(graph: onnx.GraphProto, head: QuantizedWeight | None, embedding: QuantizedWeight | None
                    ) -> None:
    """Replace the exported float lm_head MatMul by a MatMulNBits node of `head` (at accuracy level 0
    until `set_accuracy_levels`) and the embedding Gather by a GatherBlockQuantized node of `embedding`
    (our codes; None keeps that one float). A tied pair quantized alike is stored once: the lookup
    reads the head's codes, scales and zero points (the onnxruntime-genai builder's shared_embeddings
    form), which saves a whole table, 29.6 MB of the default model's 8-bit bundle."""
    transpose = _tied_transpose(graph)
    if head is not None:  # a tied float lookup keeps the float weight through its Transpose
        node = _find(graph, LM_HEAD_NODE, "MatMul", "--lm-head float")
        replace_node(graph, node, head, "MatMulNBits", "lm_head", [node.input[0]],
                     dict(K=head.shape[1], N=head.shape[0]))
    if embedding is not None:
        node = _find(graph, EMBEDDING_NODE, "Gather", "--embedding float")
        if transpose is not None:  # the float table goes with the last node that reads it
            node.input[0] = transpose.input[0]
            graph.node.remove(transpose)
        shared = _head_initializers(graph) if head is not None and _same_table(head, embedding) else None
        replace_node(graph, node, embedding, "GatherBlockQuantized", "model.embed_tokens", [node.input[1]],
                     dict(gather_axis=0, quantize_axis=1), shared)


def _same_table(head: QuantizedWeight, embedding: QuantizedWeight) -> bool:
    return head.scheme == embedding.scheme and all(
        torch.equal(getattr(head, part), getattr(embedding, part)) for part in ("codes", "scales", "zeros"))


def _head_initializers(graph: onnx.GraphProto) -> list[str]:
    """The head's codes as the lookup's [vocab, blocks·bytes] table (a Reshape onnxruntime folds at
    load), then its scales and zero points."""
    node = _find(graph, LM_HEAD_NODE.replace("MatMul", "MatMulNBits"), "MatMulNBits", "report this")
    init = {t.name: t for t in graph.initializer}
    rows = init[node.input[1]].dims[0]
    shape, flat = f"{node.input[1]}.rows", f"{node.input[1]}.rows/output_0"
    graph.initializer.append(numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), shape))
    graph.node.insert(0, onnx.helper.make_node("Reshape", [node.input[1], shape], [flat], name=f"{shape}/Reshape"))
    return [flat, *node.input[2:4]]


def _tied_transpose(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The Transpose of the head's weight through which the builder's embedding Gather reads a tied
    table, if that is how this graph reads it."""
    head = _find(graph, LM_HEAD_NODE, "MatMul", "report this model's architecture")
    gather = next((n for n in graph.node if n.name == EMBEDDING_NODE and n.op_type == "Gather"), None)
    return next((n for n in graph.node if n.op_type == "Transpose" and n.input[0] == head.input[1]
                 and gather is not None and gather.input[0] == n.output[0]), None)


def _find(graph: onnx.GraphProto, name: str, op_type: str, hint: str) -> onnx.NodeProto:
    node = next((n for n in graph.node if n.name == name and n.op_type == op_type), None)
    if node is None:
        raise ExportError(f"the exported graph has no float {name} node to quantize", hint)
    return node
