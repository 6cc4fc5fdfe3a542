"""FAQ_SPEC.md §4: the tests that pin AWQ's and FAQ's semantics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import TINY, tiny_calibration, tiny_model

from faq_deploy import checkpoint, models
from faq_deploy.architectures import ARCHITECTURES, active_groups, architecture_of, blocks_of
from faq_deploy.data import calibration_rows, eval_tokens, load_corpus
from faq_deploy.perplexity import perplexity
from faq_deploy.quant import make_config, quantize
from faq_deploy.quant.awq import activation_statistics, apply_scale, block_inputs, channel_mean_abs, run_block
from faq_deploy.quant.faq import FaqConfig, mix
from faq_deploy.quant.scheme import QuantScheme

SCHEME = QuantScheme(bits=3, group_size=32)


def test_every_registered_architecture_has_a_tiny_test_model() -> None:
    assert set(TINY) == set(ARCHITECTURES)


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_folding_without_quantization_preserves_the_block(architecture: str) -> None:
    model = tiny_model(architecture)
    arch = architecture_of(model)
    x, kwargs = block_inputs(model, blocks_of(model), tiny_calibration())
    block = blocks_of(model)[0]
    before = run_block(block, x, kwargs, set()).block_out
    generator = torch.Generator().manual_seed(1)
    for group in active_groups(arch, block):
        width = block.get_submodule(group.balance[0]).in_features
        apply_scale(block, group, torch.exp(torch.randn(width, generator=generator) * 0.5))
    after = run_block(block, x, kwargs, set()).block_out
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


def test_gqa_has_no_attn_out_group_and_mha_has_one(real_cache: Path) -> None:
    default = models.load(None).model
    assert [g.name for g in active_groups(architecture_of(default), blocks_of(default)[0])] == \
        ["attn-in", "mlp-in", "mlp-out"]
    mha = tiny_model("Qwen2ForCausalLM")
    assert "attn-out" in [g.name for g in active_groups(architecture_of(mha), blocks_of(mha)[0])]


def _codes(weights: dict) -> dict[str, tuple[torch.Tensor, ...]]:
    return {name: (w.codes, w.scales, w.zeros) for name, w in weights.items()}


def _same(a: dict, b: dict, names: list[str]) -> bool:
    return all(all(torch.equal(x, y) for x, y in zip(a[n], b[n], strict=True)) for n in names)


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_gamma_zero_is_awq_and_the_last_block_never_changes(architecture: str) -> None:
    calibration = tiny_calibration()
    awq = _codes(quantize(tiny_model(architecture), make_config("awq", SCHEME), calibration).weights)
    gamma0 = _codes(quantize(tiny_model(architecture), make_config("faq", SCHEME, gamma=0.0), calibration).weights)
    faq = _codes(quantize(tiny_model(architecture), make_config("faq", SCHEME, gamma=1.0, scope="all"),
                          calibration).weights)
    assert _same(awq, gamma0, list(awq))
    last = [n for n in awq if n.startswith("model.layers.2.")]
    assert _same(awq, faq, last)  # the last block has no future: its scales are AWQ's
    assert not _same(awq, faq, list(awq))  # and FAQ does change the others
    for weights in (awq, faq):
        assert all(int(codes.max()) <= SCHEME.max_code for codes, _, _ in weights.values())


@pytest.mark.parametrize("weights,rho", [("uniform", 0.5), ("geometric", 0.5), ("geometric", 1.0)])
def test_window_weights_sum_to_one_after_truncation(weights: str, rho: float) -> None:
    config = FaqConfig(window=4, window_weights=weights, rho=rho)
    for available in range(1, 5):
        omega = config.window_weights_for(available)
        assert len(omega) == available and sum(omega) == pytest.approx(1.0)
        assert omega == sorted(omega, reverse=True)


def test_mix_follows_the_formula_and_stops_at_the_end() -> None:
    arch = ARCHITECTURES["LlamaForCausalLM"]
    attn_in, mlp_out = arch.groups[0], arch.groups[3]
    stats = {(b, g.name): torch.tensor([1.0, 3.0]) * (b + 1) for b in range(3) for g in arch.groups}
    config = FaqConfig(gamma=0.5, window=3)
    a = stats[0, "attn-in"]
    # f_0 = mean over blocks 1, 2 of unit-mean profiles = [0.5, 1.5]; ã = 0.5·a + 0.5·m(a)·f_0
    assert torch.allclose(mix(config, stats, 0, attn_in), 0.5 * a + 0.5 * 2.0 * torch.tensor([0.5, 1.5]))
    assert torch.equal(mix(config, stats, 2, attn_in), stats[2, "attn-in"])  # no future after the last block
    assert torch.equal(mix(config, stats, 0, mlp_out), stats[0, "mlp-out"])  # out of the residual scope
    assert torch.equal(mix(FaqConfig(gamma=0.0), stats, 0, attn_in), a)


def test_prepass_statistics_equal_the_models_own_forward(real_cache: Path) -> None:
    """The block-by-block FP pass sees exactly the activations of an ordinary model forward."""
    loaded = models.load(None)
    calibration = calibration_rows(loaded.tokenizer.backend_tokenizer, load_corpus("speeches-calib"), 2, 64, 0)
    prepass = activation_statistics(loaded.model, calibration)
    arch = architecture_of(loaded.model)
    seen, handles = {}, []
    for index, block in enumerate(blocks_of(loaded.model)):
        for group in active_groups(arch, block):
            def record(_module, args, index=index, name=group.name):
                seen[index, name] = channel_mean_abs(args[0])
            handles.append(block.get_submodule(group.balance[0]).register_forward_pre_hook(record))
    with torch.inference_mode():
        loaded.model(calibration, use_cache=False)
    for handle in handles:
        handle.remove()
    assert prepass.keys() == seen.keys() and len(seen) == 30 * 3
    for key, a in seen.items():
        assert torch.allclose(prepass[key], a, rtol=1e-5, atol=1e-7), key


def test_awq_and_faq_beat_rtn_end_to_end(real_cache: Path, tmp_path: Path) -> None:
    """The whole algorithm on the default model at a small token budget, w3 g32; the AWQ and FAQ
    checkpoints read back to the same fake-quantized model (same logits)."""
    results = {}
    for method in ("rtn", "awq", "faq"):
        loaded = models.load(None)
        tokenizer = loaded.tokenizer.backend_tokenizer
        calibration = calibration_rows(tokenizer, load_corpus("speeches-calib"), 4, 128, 0)
        quantized = quantize(loaded.model, make_config(method, SCHEME), calibration)
        assert len(quantized.weights) == 210
        ids = eval_tokens(tokenizer, load_corpus("speeches-eval"), 2048)
        results[method] = perplexity(loaded.model, ids).perplexity
        if method != "rtn":
            reread = checkpoint.load(checkpoint.save(quantized, loaded.tokenizer, loaded.ref, tmp_path / method))
            with torch.inference_mode():
                expected = loaded.model(ids[None, :256]).logits
                assert torch.allclose(reread.model(ids[None, :256]).logits, expected, rtol=1e-5, atol=1e-5)
    assert results["awq"] < results["rtn"] and results["faq"] < results["rtn"], results
