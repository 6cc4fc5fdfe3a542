"""GPTQ rounding: on the nearest-rounding grid, the error it leaves at each Linear's output on the
calibration inputs is never larger than nearest rounding's, and it plugs into every method."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY, tiny_calibration, tiny_model

from faq_deploy.architectures import architecture_of, blocks_of
from faq_deploy.data import Calibration
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.quant import make_config, quantize
from faq_deploy.quant.blocks import block_inputs, run_block
from faq_deploy.quant.gptq import gptq_round, input_hessians, inverse_factor
from faq_deploy.quant.quantizer import quantize_weight
from faq_deploy.quant.scheme import QuantScheme


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
