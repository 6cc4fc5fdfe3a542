"""The per-group quantizer, checked with a per-group numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.quant.quantizer import ROWS_PER_SLICE, fake_quantize, quantize_weight
from faq_deploy.quant.scheme import QuantScheme


def reference(w: np.ndarray, bits: int, group: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Codes and dequantized weight, one group at a time, straight from the spec's formulas."""
    codes = np.zeros(w.shape, dtype=np.int64)
    deq = np.zeros(w.shape, dtype=np.float32)
    top = 2**bits - 1
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[row, start:start + group]
            if symmetric:
                scale = max(np.float32(np.abs(g).max()) / np.float32(2 ** (bits - 1) - 1), np.float32(1e-5))
                zero = 2 ** (bits - 1)
            else:
                scale = max((np.float32(g.max()) - np.float32(g.min())) / np.float32(top), np.float32(1e-5))
                zero = int(np.clip(np.round(-g.min() / scale), 0, top))
            q = np.clip(np.round(g / scale) + zero, 0, top)
            codes[row, start:start + group] = q
            deq[row, start:start + group] = (q - zero) * scale
    return codes, deq


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k", [64, 100])  # 100: a partial last group
def test_codes_match_reference(bits: int, symmetric: bool, k: int) -> None:
    torch.manual_seed(bits * 7 + k)
    w = torch.randn(24, k) * torch.rand(24, 1)
    scheme = QuantScheme(bits=bits, group_size=32, symmetric=symmetric)
    q = quantize_weight(w, scheme)

    assert q.codes.dtype == torch.uint8 and q.codes.shape == (24, k)
    assert q.scales.shape == q.zeros.shape == (24, math.ceil(k / 32))
    assert int(q.codes.max()) <= 2**bits - 1
    codes, deq = reference(w.numpy(), bits, 32, symmetric)
    np.testing.assert_array_equal(q.codes.numpy(), codes)
    np.testing.assert_allclose(q.dequantize().numpy(), deq, rtol=1e-6, atol=1e-7)
    assert torch.equal(fake_quantize(w, scheme), q.dequantize())  # the searches' shortcut, to the bit


def test_zero_points_follow_the_formula() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64) + 0.5
    q = quantize_weight(w, QuantScheme(bits=4, group_size=16))
    mins = w.view(8, 4, 16).amin(-1)
    expected = torch.round(-mins / q.scales).clamp(0, 15)
    assert torch.equal(q.zeros.float(), expected)


def test_error_is_at_most_half_a_step_inside_the_range() -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    q = quantize_weight(w, QuantScheme(bits=4, group_size=32))
    step = q.scales.repeat_interleave(32, dim=1)
    # A zero point rounded to an integer can push the group's edges up to half a step outside.
    assert bool(((q.dequantize() - w).abs() <= step + 1e-6).all())
    assert float((q.dequantize() - w).abs().mean()) < 0.3 * float(step.mean())


@pytest.mark.parametrize("symmetric", [False, True])
def test_float16_scales_are_exact_in_float16_and_the_codes_are_chosen_for_them(symmetric: bool) -> None:
    """A float16 graph stores float16 scales: the codes must be the nearest for the rounded scales."""
    torch.manual_seed(3)
    w = torch.randn(24, 96)
    q = quantize_weight(w, QuantScheme(bits=3, group_size=32, symmetric=symmetric, scale_dtype="float16"))
    assert torch.equal(q.scales.half().float(), q.scales)
    assert not torch.equal(quantize_weight(w, QuantScheme(bits=3, symmetric=symmetric)).scales, q.scales)
    nearest = torch.round(w.view(24, 3, 32) / q.scales[..., None]) + q.zeros[..., None].float()
    assert torch.equal(q.codes.float(), nearest.clamp(0, 7).view(24, 96))


def test_scheme_rejects_an_unknown_scale_dtype() -> None:
    with pytest.raises(InvalidQuantConfig, match="bfloat16"):
        QuantScheme(scale_dtype="bfloat16")


@pytest.mark.parametrize("bits,group", [(6, 32), (1, 32), (4, 24), (4, 8), (4, 0)])
def test_scheme_rejects_out_of_range(bits: int, group: int) -> None:
    with pytest.raises(InvalidQuantConfig):
        QuantScheme(bits=bits, group_size=group)


def test_three_bits_travel_in_a_four_bit_container() -> None:
    assert QuantScheme(bits=3).container_bits == 4
    assert QuantScheme(bits=2).container_bits == 2


def test_a_table_taller_than_one_slice_of_rows_matches_the_reference_and_dequantizes_in_place() -> None:
    """Vocabulary tables are quantized a slice of rows at a time; the codes must not notice."""
    torch.manual_seed(4)
    w = torch.randn(ROWS_PER_SLICE + 5, 64)
    q = quantize_weight(w, QuantScheme(bits=4, group_size=32))
    codes, deq = reference(w.numpy(), 4, 32, symmetric=False)
    np.testing.assert_array_equal(q.codes.numpy(), codes)
    out = torch.full(w.shape, math.nan)
    assert q.dequantize(out=out) is out
    np.testing.assert_allclose(out.numpy(), deq, rtol=1e-6, atol=1e-7)
    assert torch.equal(out, q.dequantize())
