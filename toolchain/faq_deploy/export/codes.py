"""Proof that an export carries our integer codes: every MatMulNBits node's packed weights, scales
and zero points compared byte for byte with our packing of the modules it computes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from faq_deploy.errors import ExportError
from faq_deploy.export.graph import MODEL_FILE
from faq_deploy.quant.packing import MatMulNBitsWeights, to_matmulnbits
from faq_deploy.quant.quantizer import QuantizedWeight

# Builder node names → the checkpoint modules each node computes, concatenated along N in order.
_NODE = re.compile(r"/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul")
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_PREFIX = {"attn": "self_attn", "mlp": "mlp"}


def node_modules(node_name: str) -> list[str] | None:
    """The checkpoint modules a MatMulNBits node computes: by the builder's names (q/k/v and gate/up
    fused) or the dynamo exporter's (`<module>/MatMulNBits`); None for the lm_head (`/lm_head/…`)."""
    if match := _NODE.match(node_name):
        layer, part, proj = match.groups()
        return [f"model.layers.{layer}.{_PREFIX[part]}.{p}" for p in _FUSED.get(proj, (proj,))]
    module, _, op = node_name.rpartition("/")
    return [module] if op == "MatMulNBits" and module and not module.startswith("/") else None


def check_codes(folder: Path, weights: dict[str, QuantizedWeight]) -> int:
    """Compare every MatMulNBits initializer with our packing of the same modules, byte for byte.
    Returns the number of modules checked; raises ExportError on the first difference."""
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)  # each tensor read when checked
    init = {t.name: t for t in model.graph.initializer}
    checked: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or (modules := node_modules(node.name)) is None:
            continue
        missing = [m for m in modules if m not in weights]
        if missing:
            raise ExportError(f"{node.name} computes {', '.join(missing)}, which the checkpoint did not quantize")
        packed = [to_matmulnbits(weights[m]) for m in modules]
        expected = MatMulNBitsWeights(
            b=np.concatenate([p.b for p in packed]), scales=np.concatenate([p.scales for p in packed]),
            zero_points=np.concatenate([p.zero_points for p in packed]),
            k=packed[0].k, n=sum(p.n for p in packed), bits=packed[0].bits, block_size=packed[0].block_size)
        inputs = list(node.input) + [""] * 4
        actual = {"B": inputs[1], "scales": inputs[2], "zero_points": inputs[3]}
        for field, name in actual.items():
            want = getattr(expected, "b" if field == "B" else field)
            got = numpy_helper.to_array(init[name], base_dir=str(folder)) if name in init else None
            if got is None or got.size != want.size or not np.array_equal(got.reshape(want.shape), want):
                raise ExportError(f"{node.name}: {field} differs from the checkpoint's codes for "
                                  f"{', '.join(modules)}", "report this: the exporter changed the weights")
        checked.update(modules)
    if unexported := sorted(set(weights) - checked):
        raise ExportError(f"{len(unexported)} quantized modules have no MatMulNBits node, e.g. {unexported[0]}",
                          "report this: the exporter dropped quantized weights")
    return len(checked)
