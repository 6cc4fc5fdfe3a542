"""The MatMulNBits layout, checked against a real onnxruntime MatMulNBits node."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from faq_deploy.export.graph import store_scales_in_float16
from faq_deploy.quant.packing import MatMulNBitsWeights, from_matmulnbits, pack, to_matmulnbits, unpack
from faq_deploy.quant.quantizer import quantize_weight
from faq_deploy.quant.scheme import QuantScheme


def matmulnbits_model(k: int, w: MatMulNBitsWeights, accuracy_level: int = 0) -> onnx.ModelProto:
    """One MatMulNBits node, Y = A · Wᵀ, for any number of rows of A."""
    node = helper.make_node(
        "MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], name="/proj/MatMulNBits", domain="com.microsoft",
        K=w.k, N=w.n, bits=w.bits, block_size=w.block_size, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "one_matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", w.n])],
        initializer=[numpy_helper.from_array(w.b, "B"), numpy_helper.from_array(w.scales, "scales"),
                     numpy_helper.from_array(w.zero_points, "zero_points")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return model


def run_model(model: onnx.ModelProto, a: np.ndarray, **config: str) -> np.ndarray:
    options = ort.SessionOptions()
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"A": a})[0]


def run_matmulnbits(a: np.ndarray, w: MatMulNBitsWeights, accuracy_level: int = 0) -> np.ndarray:
    return run_model(matmulnbits_model(a.shape[1], w, accuracy_level), a)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_pack_unpack_are_inverses(bits: int, n: int) -> None:
    rng = np.random.default_rng(n)
    codes = rng.integers(0, 2**bits, size=(3, 5, n), dtype=np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, -(-n * bits // 8))
    np.testing.assert_array_equal(unpack(packed, bits, n), codes)


def test_four_bit_codes_fill_the_low_nibble_first() -> None:
    np.testing.assert_array_equal(pack(np.array([[1, 2, 3]], dtype=np.uint8), 4), [[0x21, 0x03]])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("k", [256, 200])  # 200: K not a multiple of the block
@pytest.mark.parametrize("symmetric", [False, True])
def test_matmulnbits_node_reproduces_the_dequantized_matmul(bits: int, block: int, k: int,
                                                            symmetric: bool) -> None:
    torch.manual_seed(bits + block + k)
    weight = torch.randn(48, k)
    quantized = quantize_weight(weight, QuantScheme(bits=bits, group_size=block, symmetric=symmetric))
    a = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)

    y = run_matmulnbits(a, to_matmulnbits(quantized))
    expected = a.astype(np.float64) @ quantized.dequantize().double().numpy().T
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("symmetric", [False, True])
def test_three_bit_codes_in_a_four_bit_node_are_exact(symmetric: bool) -> None:
    torch.manual_seed(3)
    weight = torch.randn(32, 200)
    scheme = QuantScheme(bits=3, group_size=32, symmetric=symmetric)
    quantized = quantize_weight(weight, scheme)
    packed = to_matmulnbits(quantized)
    assert packed.bits == 4

    back = from_matmulnbits(packed, scheme)
    assert torch.equal(back.codes, quantized.codes) and torch.equal(back.zeros, quantized.zeros)
    a = np.random.default_rng(1).standard_normal((4, 200)).astype(np.float32)
    expected = a.astype(np.float64) @ quantized.dequantize().double().numpy().T
    assert np.abs(run_matmulnbits(a, packed) - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("symmetric", [False, True])
def test_five_bit_codes_as_a_four_bit_and_a_two_bit_node_are_exact(symmetric: bool) -> None:
    """Every zero point 0..31 (asymmetric) or 16 (symmetric, both nodes at their default zero point)."""
    torch.manual_seed(6)
    scheme = QuantScheme(bits=5, group_size=32, symmetric=symmetric)
    quantized = quantize_weight(torch.randn(40, 256) + torch.linspace(-2, 2, 40)[:, None], scheme)
    assert quantized.zeros.unique().tolist() == [16] if symmetric else len(quantized.zeros.unique()) > 20
    packed = to_matmulnbits(quantized)
    assert (packed.bits, packed.plane.bits) == (4, 2)
    back = from_matmulnbits(packed, scheme)
    assert torch.equal(back.codes, quantized.codes) and torch.equal(back.zeros, quantized.zeros)
    if symmetric:
        assert np.all(unpack(packed.zero_points, 4, 8) == 8) and np.all(unpack(packed.plane.zero_points, 2, 8) == 2)
    a = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    expected = a.astype(np.float64) @ quantized.dequantize().double().numpy().T
    y = run_matmulnbits(a, packed) + run_matmulnbits(a, packed.plane)
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()


def test_fast_int8_path_agrees_closely() -> None:
    """accuracy_level 4 (int8 activations) is the CPU deployment path: close, not exact."""
    torch.manual_seed(4)
    quantized = quantize_weight(torch.randn(64, 576), QuantScheme(bits=4, group_size=32))
    a = np.random.default_rng(2).standard_normal((8, 576)).astype(np.float32)
    exact = run_matmulnbits(a, to_matmulnbits(quantized), accuracy_level=0)
    fast = run_matmulnbits(a, to_matmulnbits(quantized), accuracy_level=4)
    assert np.abs(fast - exact).max() <= 2e-2 * np.abs(exact).max()


@pytest.mark.parametrize("level", [0, 4])
def test_scales_stored_in_float16_give_the_same_products(level: int) -> None:
    """Scales chosen in float16 travel as float16 behind a Cast: half the bytes, the same kernel inputs."""
    torch.manual_seed(5)
    weight = torch.randn(64, 576)
    exact = to_matmulnbits(quantize_weight(weight, QuantScheme(4, 32, scale_dtype="float16")))
    inexact = to_matmulnbits(quantize_weight(weight, QuantScheme(4, 32)))
    a = np.random.default_rng(3).standard_normal((8, 576)).astype(np.float32)
    for packed, halved in ((exact, True), (inexact, False)):
        model = matmulnbits_model(576, packed, level)
        expected = run_model(model, a)
        saved = store_scales_in_float16(model.graph)
        kinds = {t.name: t.data_type for t in model.graph.initializer}
        assert (saved == packed.scales.size * 2) == halved and ("scales" in kinds) != halved
        assert halved == (kinds.get("scales.float16") == TensorProto.FLOAT16)
        onnx.checker.check_model(model)
        np.testing.assert_array_equal(run_model(model, a), expected)
