"""5-bit codes as two MatMulNBits nodes: the exporter's node holds each code's low four bits, and a
2-bit node beside it over the same input holds the fifth (faq_deploy.quant.packing); their outputs add.

MatMulNBits runs 2, 4 and 8 bits. A GGUF's Q5_0 blocks in one 8-bit container take 8.5 bits a weight
with their float16 scales; as 4 + 2 bits, 7. onnxruntime's 2-bit CPU kernel is its slowest, so the pair
costs speed beside one 8-bit node: on Qwen2.5-Coder-0.5B, 14% of decode and half of prefill on 2 x86
cores (docs/results/qwen2.5-coder-0.5b/frontier.md).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from faq_deploy.errors import ExportError
from faq_deploy.export.codes import node_modules
from faq_deploy.export.graph import add_to_output
from faq_deploy.export.options import ExportOptions
from faq_deploy.quant.packing import to_matmulnbits
from faq_deploy.quant.quantizer import QuantizedWeight


def planes_problem(options: ExportOptions) -> str | None:
    """Why a graph of these options cannot hold 5-bit codes' second nodes, if it cannot: TensorRT's QDQ
    form has no 2-bit DequantizeLinear, and the 2-bit node has not been run on CUDA here."""
    if options.weights == "qdq" or options.provider != "cpu":
        return f"5-bit codes need a 2-bit MatMulNBits node, which a {options.provider} {options.weights} graph lacks"
    return None


def add_planes(graph: onnx.GraphProto, weights: dict[str, QuantizedWeight]) -> int:
    """Give every MatMulNBits node whose modules have 5-bit codes its 2-bit node and the Add. Returns
    the number of nodes given one."""
    init = {t.name: t for t in graph.initializer}
    done = 0
    for node in [n for n in graph.node if n.op_type == "MatMulNBits"]:
        parts = [weights[m] for m in node_modules(node.name) or [] if m in weights]
        if not any(p.scheme.plane_bits for p in parts):
            continue
        if not all(p.scheme.plane_bits for p in parts):
            raise ExportError(f"{node.name} packs 5-bit codes with codes of another width",
                              "report this: the method should have widened them alike")
        planes = [to_matmulnbits(p).plane for p in parts]
        prefix = node.name.rsplit("/", 1)[0] + "/plane"
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init[node.input[2]].data_type)  # the graph's float type
        names = [f"{prefix}.{part}" for part in ("qweight", "scales", "qzeros")]
        arrays = (np.concatenate([p.b for p in planes]), np.concatenate([p.scales for p in planes]).astype(dtype),
                  np.concatenate([p.zero_points for p in planes]))
        graph.initializer.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays, names, strict=True))
        attributes = {a.name: a.i for a in node.attribute}
        plane = onnx.helper.make_node(
            "MatMulNBits", [node.input[0], *names], [f"{prefix}/MatMulNBits/output_0"], name=f"{prefix}/MatMulNBits",
            domain="com.microsoft", K=attributes["K"], N=attributes["N"], bits=planes[0].bits,
            block_size=planes[0].block_size, accuracy_level=attributes.get("accuracy_level", 0))
        add_to_output(graph, node, [plane], prefix)
        done += 1
    return done
