"""Per-group float offsets beside MatMulNBits: W = (q − z)·s + o, so A·Wᵀ = MatMulNBits(A) + S(A)·oᵀ,
where S(A) [.., K/g] sums each group of g inputs.

MatMulNBits takes an integer zero point per block; its float zero point form runs 40-50x slower on
onnxruntime's CPU kernels (a 576 x 1536 node: 3.3-4.0 ms against 82 µs). GGUF blocks with a minimum
(Q4_1, Q5_1, the K-quants) need one, so the offsets' share of the product is computed beside the
node: a [.., K/g] x [K/g, N] MatMul, 1/g of the node's multiply-adds, and an Add, on group sums
computed once per input (nodes that read one input share them).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from faq_deploy.errors import ExportError
from faq_deploy.export.codes import node_modules
from faq_deploy.export.graph import OFFSETS_MATMUL, add_to_output
from faq_deploy.quant.quantizer import QuantizedWeight

SUFFIX = OFFSETS_MATMUL.removesuffix("/MatMul")  # the offsets table's name ends in it


def add_offsets(graph: onnx.GraphProto, weights: dict[str, QuantizedWeight]) -> int:
    """Add the offsets' term to every MatMulNBits node whose modules carry offsets (modules fused into
    one node without them add zeros). Returns the number of nodes given one."""
    init = {t.name: t for t in graph.initializer}
    sums: dict[tuple[str, int], str] = {}
    done = 0
    for node in [n for n in graph.node if n.op_type == "MatMulNBits"]:
        modules = node_modules(node.name) or []
        parts = [weights[m] for m in modules if m in weights]
        if not any(p.offsets is not None for p in parts):
            continue
        attributes = {a.name: a.i for a in node.attribute}
        k, group = attributes["K"], attributes["block_size"]
        if k % group:
            raise ExportError(f"{node.name}: offsets need whole groups, and K={k} is not a multiple of {group}",
                              "report this model")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init[node.input[2]].data_type)  # the graph's float type
        offsets = np.concatenate([np.zeros(p.scales.shape, np.float32) if p.offsets is None else p.offsets.numpy()
                                  for p in parts])
        name = node.name.rsplit("/", 1)[0] + SUFFIX
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(offsets.T.astype(dtype)), name))
        key = (node.input[0], group)
        if key not in sums:
            sums[key] = _group_sums(graph, init, node, k, group, dtype)
        add_to_output(graph, node, [onnx.helper.make_node("MatMul", [sums[key], name], [f"{name}/MatMul/output_0"],
                                                          name=f"{name}/MatMul")], name)
        done += 1
    return done


def _group_sums(graph: onnx.GraphProto, init: dict[str, onnx.TensorProto], node: onnx.NodeProto, k: int,
                group: int, dtype: np.dtype) -> str:
    """A MatMul before `node` that sums its input A [.., K] in groups: A times a 0/1 matrix [K, K/g] (one
    per width in the graph). One node whatever A's rank (a Reshape and ReduceSum need A's rank, or three
    more nodes to read it, and at one token per step each node costs microseconds); `init`, the graph's
initializers by name, gains it. Returns the sums' name."""
    indicator = f"group_sums/{k}x{group}"
    if indicator not in init:
        matrix = np.arange(k)[:, None] // group == np.arange(k // group)[None, :]
        init[indicator] = numpy_helper.from_array(matrix.astype(dtype), indicator)
        graph.initializer.append(init[indicator])
    name = f"{node.input[0]}/group_sums_{group}"
    graph.node.insert(list(graph.node).index(node),
                      onnx.helper.make_node("MatMul", [node.input[0], indicator], [name], name=f"{name}/MatMul"))
    return name
