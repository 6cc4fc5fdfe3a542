"""GPTQ rounding: on the nearest-rounding grid, the error it leaves at each Linear's output on the
calibration inputs is never larger than nearest rounding's, and it plugs into every method."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY, tiny_calibration, tiny_model

from faq_deploy.architectures import active_groups, architecture_of, blocks_of
from faq_deploy.data import Calibration
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.quant import make_config, quantize
from faq_deploy.quant.awq import apply_scale
from faq_deploy.quant.blocks import block_inputs, run_block
from faq_deploy.quant.gptq import (
    gptq_round,
    gram,
    input_hessians,
    inverse_factor,
    inverse_factors,
    round_linears_,
    scaled_hessians,
)
from faq_deploy.quant.quantizer import quantize_weight
from faq_deploy.quant.scheme import QuantScheme


@pytest.mark.parametrize("width", [576, 1536, 1537])
def test_the_gram_product_of_halves_equals_the_whole(width: int) -> None:
    x = torch.randn(2048, width, generator=torch.Generator().manual_seed(0))
    product = gram(x)
    torch.testing.assert_close(product, x.T @ x, rtol=1e-5, atol=1e-3)
    assert torch.equal(product, product.T)


def _check_blocks(model, calibration: torch.Tensor, scheme: QuantScheme, blocks: int) -> int:
    """For the first `blocks` blocks, every Linear: GPTQ's output error ≤ nearest rounding's, on the same grid."""
    arch = architecture_of(model)
    x, kwargs = block_inputs(model, blocks_of(model), calibration)
    checked = 0
    for block in list(blocks_of(model))[:blocks]:
        capture = run_block(block, x, kwargs, set(arch.linears))
        hessians, out = input_hessians(block, x, kwargs, set(arch.linears))
        assert torch.allclose(out, capture.block_out, atol=1e-5)
        # Linears fed one input share one Hessian (factored once); the others have their own
        assert hessians[f"{arch.linears[0]}"] is hessians[arch.linears[1]] is hessians[arch.linears[2]]
        assert len({id(h) for h in hessians.values()}) == 4
        for name in arch.linears:
            weight = block.get_submodule(name).weight.detach()
            inputs = capture.input(name).reshape(-1, weight.shape[1])
            nearest = quantize_weight(weight, scheme)
            rounded = gptq_round(weight, inverse_factor(hessians[name]), nearest)
            errors = [(inputs @ (weight - q.dequantize()).T).pow(2).mean().item() for q in (rounded, nearest)]
            assert errors[0] <= errors[1], name
            assert torch.equal(rounded.scales, nearest.scales) and torch.equal(rounded.zeros, nearest.zeros)
            assert int(rounded.codes.max()) <= scheme.max_code and not torch.equal(rounded.codes, nearest.codes)
            checked += 1
        x = capture.block_out
    return checked


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("architecture", sorted(TINY))
def test_gptq_leaves_no_more_output_error_than_nearest_on_every_linear(architecture: str, bits: int) -> None:
    model = tiny_model(architecture)
    assert _check_blocks(model, tiny_calibration(rows=8, seq=64), QuantScheme(bits, 16), blocks=3) == 21


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_leaves_no_more_output_error_on_the_default_models_first_blocks(default_model, bits: int) -> None:
    rows = Calibration(samples=4, seq_len=256).rows(default_model.tokenizer.backend_tokenizer)
    assert _check_blocks(default_model.model, rows, QuantScheme(bits, 32), blocks=2) == 14


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_hessians_after_scaling_follow_from_the_ones_before(architecture: str) -> None:
    """AWQ-style scaling divides the inputs of a group's balance Linears by its s and changes no other
    input, so the scaled block's inputs and Hessians are converted, not measured again."""
    model = tiny_model(architecture)
    arch, block = architecture_of(model), blocks_of(model)[0]
    x, kwargs = block_inputs(model, blocks_of(model), tiny_calibration(rows=8, seq=64))
    before, _ = input_hessians(block, x, kwargs, set(arch.linears))
    fp = run_block(block, x, kwargs, set(arch.linears))
    torch.manual_seed(0)
    balanced = {}
    for group in active_groups(arch, block):
        s = torch.rand(block.get_submodule(group.balance[0]).in_features) + 0.5
        apply_scale(block, group, s)
        balanced.update(dict.fromkeys(group.balance, s))
    after, _ = input_hessians(block, x, kwargs, set(arch.linears))
    scaled = run_block(block, x, kwargs, set(arch.linears))
    converted = scaled_hessians(before, balanced)
    for name in arch.linears:
        assert torch.allclose(converted[name], after[name], rtol=1e-4, atol=1e-6), name
        inputs = fp.input(name) / balanced[name] if name in balanced else fp.input(name)
        assert torch.allclose(inputs, scaled.input(name), rtol=1e-4, atol=1e-5), name
    q, k, v = arch.linears[:3]
    assert converted[q] is converted[k] is converted[v]  # still factored once


def test_linears_sharing_a_factor_and_scheme_round_together_as_they_would_alone() -> None:
    """q/k/v (and gate/up when their schemes agree) go through one column loop over stacked rows."""
    model = tiny_model("LlamaForCausalLM")
    arch, block = architecture_of(model), blocks_of(model)[0]
    x, kwargs = block_inputs(model, blocks_of(model), tiny_calibration(rows=8, seq=64))
    scheme = QuantScheme(4, 16)
    schemes = {name: QuantScheme(8, 16) if name == "mlp.up_proj" else scheme for name in arch.linears}
    factors = inverse_factors(input_hessians(block, x, kwargs, set(arch.linears))[0],
                              make_config("rtn", scheme, rounding="gptq"))
    linears = {name: block.get_submodule(name) for name in arch.linears}
    alone = {name: gptq_round(linear.weight, factors[name], quantize_weight(linear.weight, schemes[name]))
             for name, linear in linears.items()}
    together = round_linears_(linears, schemes, factors)
    assert list(together) == list(arch.linears)
    for name, linear in linears.items():
        assert together[name].scheme == schemes[name] and torch.equal(together[name].codes, alone[name].codes), name
        assert torch.equal(linear.weight, together[name].dequantize()), name


def test_act_order_rounds_on_the_same_grid() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(512, 64)
    weight = torch.randn(32, 64)
    grid = quantize_weight(weight, QuantScheme(4, 16))
    plain, ordered = (gptq_round(weight, inverse_factor(x.T @ x / len(x), act_order=order), grid)
                      for order in (False, True))
    assert torch.equal(ordered.scales, grid.scales) and not torch.equal(ordered.codes, plain.codes)
    errors = [(x @ (weight - q.dequantize()).T).pow(2).mean().item() for q in (plain, ordered, grid)]
    assert max(errors[:2]) < 0.5 * errors[2]


@pytest.mark.parametrize("method", ["rtn", "awq", "faq"])
def test_every_method_takes_gptq_rounding_and_its_model_carries_the_codes(method: str) -> None:
    model = tiny_model("LlamaForCausalLM")
    config = make_config(method, QuantScheme(4, 16), rounding="gptq")
    assert config.needs_calibration
    result = quantize(model, config, tiny_calibration(rows=4, seq=32))
    assert len(result.weights) == 21
    for name, weight in result.weights.items():
        assert torch.equal(model.get_submodule(name).weight, weight.dequantize()), name


def test_rtn_with_gptq_needs_calibration_and_bad_settings_are_refused() -> None:
    with pytest.raises(InvalidQuantConfig, match="needs calibration"):
        quantize(tiny_model("LlamaForCausalLM"), make_config("rtn", QuantScheme(4, 16), rounding="gptq"))
    with pytest.raises(InvalidQuantConfig, match="rounding"):
        make_config("awq", QuantScheme(), rounding="stochastic")
    with pytest.raises(InvalidQuantConfig, match="damp"):
        make_config("rtn", QuantScheme(), rounding="gptq", damp=0.0)


def test_faq_rounds_by_gptq_by_default_and_the_baselines_to_nearest() -> None:
    assert make_config("faq", QuantScheme()).rounding == "gptq"
    assert make_config("awq", QuantScheme()).rounding == "nearest"
    assert not make_config("rtn", QuantScheme()).needs_calibration
