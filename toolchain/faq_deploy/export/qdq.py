"""TensorRT's form of the quantized weights: TensorRT runs no MatMulNBits, so each
node becomes the standard DequantizeLinear (blocks along K) → MatMul over the same codes.

Symmetric codes (one zero point for the whole weight) become signed INT4/INT8 with no zero point,
the only form TensorRT's dequantize takes. Asymmetric codes keep their zero points as UINT4/UINT8:
valid ONNX that onnxruntime runs everywhere, which TensorRT refuses (build TensorRT bundles with
--symmetric). Where onnxruntime's CPU provider runs the graph it fuses DequantizeLinear → MatMul back
into MatMulNBits, with int8 activations unless the session option QDQ_ACCURACY_LEVEL says 0: the
graph's accuracy level goes into genai_config.json (graph.set_session_option), where both faq_runtime and
onnxruntime-genai read it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from faq_deploy.errors import ExportError
from faq_deploy.quant.packing import pack, unpack

QDQ_ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"
MIN_OPSET = 21  # DequantizeLinear with 4-bit types and block_size
_TYPES = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
          (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}


def to_qdq(model: onnx.ModelProto, base_dir: str = "") -> int:
    """Replace every MatMulNBits node of `model` by DequantizeLinear → MatMul; the number replaced.
    `base_dir`: where tensors still in a data file are read from (edited_graph's folder)."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ExportError(f"the graph's opset {opset} has no blocked 4-bit DequantizeLinear (opset {MIN_OPSET})",
                          "re-export with a newer exporter")
    init = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    for node in nodes:
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for new in reversed(_dequantize_matmul(node, init, graph, base_dir)):
            graph.node.insert(at, new)
    used = {name for n in graph.node for name in n.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
    return len(nodes)


def _dequantize_matmul(node: onnx.NodeProto, init: dict[str, TensorProto], graph: onnx.GraphProto,
                       base_dir: str) -> list[onnx.NodeProto]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    if bits not in (4, 8) or len(node.input) < 4 or any(node.input[4:]):
        raise ExportError(f"{node.name}: only 4- and 8-bit MatMulNBits with zero points and no g_idx or bias "
                          "have a DequantizeLinear form", "build with --bits 3, 4 or 8")
    array = {role: numpy_helper.to_array(init[name], base_dir)
             for role, name in zip("bsz", node.input[1:4], strict=True)}
    blocks = -(-k // block)
    # The builder stores zero points flat: every array is shaped by the node's attributes.
    codes = unpack(array["b"].reshape(n, blocks, -1), bits, block).reshape(n, -1)[:, :k].T  # [K, N]: MatMul's B
    zeros = unpack(array["z"].reshape(n, -1), bits, blocks)  # [N, blocks]
    scales = array["s"].reshape(n, blocks).T                  # [blocks, N]
    shifted, half = codes.astype(np.int16) - zeros.flat[0], 1 << (bits - 1)
    signed = bool((zeros == zeros.flat[0]).all()) and -half <= shifted.min() and shifted.max() < half
    prefix = node.name.rsplit("/", 1)[0]
    names = [f"{prefix}/DequantizeLinear.{part}" for part in ("weight", "scale", "zero_point")]
    tensors = [_tensor(names[0], shifted if signed else codes, bits, signed),
               numpy_helper.from_array(np.ascontiguousarray(scales), names[1])]
    if not signed:
        tensors.append(_tensor(names[2], zeros.T, bits, signed=False))
    graph.initializer.extend(tensors)
    dense = f"{prefix}/DequantizeLinear/output_0"
    return [onnx.helper.make_node("DequantizeLinear", [t.name for t in tensors], [dense],
                                  name=f"{prefix}/DequantizeLinear", axis=0, block_size=block),
            onnx.helper.make_node("MatMul", [node.input[0], dense], list(node.output), name=f"{prefix}/MatMul")]


def _tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> TensorProto:
    """An initializer of `values` ([rows, cols] integers) as ONNX's (U)INT4/(U)INT8: 4-bit elements
    two to a byte, the first in the low nibble, over the row-major flattening."""
    kind = _TYPES[bits, signed]
    if bits == 8:
        return numpy_helper.from_array(np.ascontiguousarray(values, np.int8 if signed else np.uint8), name)
    nibbles = (np.ascontiguousarray(values).reshape(-1) & 0xF).astype(np.uint8)
    return onnx.helper.make_tensor(name, kind, list(values.shape), pack(nibbles, 4).tobytes(), raw=True)
