"""The TensorRT form of the weights (DequantizeLinear → MatMul), run by real onnxruntime sessions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from test_packing import matmulnbits_model, run_model

from faq_deploy.errors import ExportError
from faq_deploy.export.qdq import QDQ_ACCURACY_LEVEL, to_qdq
from faq_deploy.quant.packing import to_matmulnbits
from faq_deploy.quant.quantizer import quantize_weight
from faq_deploy.quant.scheme import QuantScheme


def quantized_model(bits: int, symmetric: bool, k: int = 200) -> tuple[onnx.ModelProto, np.ndarray]:
    """A one-node MatMulNBits model of a random weight, and that weight dequantized ([N, K])."""
    torch.manual_seed(bits)
    weight = quantize_weight(torch.randn(48, k), QuantScheme(bits=bits, group_size=32, symmetric=symmetric))
    return matmulnbits_model(k, to_matmulnbits(weight)), weight.dequantize().double().numpy()


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_the_rewrite_computes_the_same_matmul_from_the_same_codes(bits: int, symmetric: bool) -> None:
    model, dense = quantized_model(bits, symmetric)
    assert to_qdq(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    weight = next(t for t in model.graph.initializer if t.name.endswith(".weight"))
    # symmetric codes carry no zero point, in the signed type TensorRT takes
    signed = {4: TensorProto.INT4, 8: TensorProto.INT8}[max(bits, 4)]
    unsigned = {4: TensorProto.UINT4, 8: TensorProto.UINT8}[max(bits, 4)]
    assert weight.data_type == (signed if symmetric else unsigned)
    assert len(model.graph.node[0].input) == (2 if symmetric else 3)
    if symmetric:  # the stored values are the codes less their one zero point
        scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name.endswith(".scale")))
        decoded = numpy_helper.to_array(weight).astype(np.float64) * np.repeat(scale, 32, axis=0)[:200]
        np.testing.assert_allclose(decoded, dense.T, rtol=1e-6)
    a = np.random.default_rng(1).standard_normal((5, 200)).astype(np.float32)
    expected = a.astype(np.float64) @ dense.T
    exact = run_model(model, a, **{QDQ_ACCURACY_LEVEL: "0"})
    assert np.abs(exact - expected).max() <= 1e-5 * np.abs(expected).max()


def test_onnxruntime_cpu_fuses_the_pair_back_with_int8_activations_by_default() -> None:
    """Why the level is a session option for these graphs: unset, the CPU provider runs the fused
    MatMulNBits at accuracy level 4."""
    model, dense = quantized_model(4, True)
    to_qdq(model)
    a = np.random.default_rng(2).standard_normal((5, 200)).astype(np.float32)
    expected = a.astype(np.float64) @ dense.T
    error = np.abs(run_model(model, a) - expected).max() / np.abs(expected).max()
    assert 1e-5 < error < 2e-2


def test_two_bit_nodes_and_old_opsets_are_refused() -> None:
    two_bit, _ = quantized_model(2, True)
    with pytest.raises(ExportError, match="only 4- and 8-bit"):
        to_qdq(two_bit)
    old, _ = quantized_model(4, True)
    old.opset_import[0].version = 20
    with pytest.raises(ExportError, match="opset 20"):
        to_qdq(old)
