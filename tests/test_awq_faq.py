"""The tests that pin AWQ's and FAQ's semantics."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import TINY, tiny_calibration, tiny_model

from faq_deploy import checkpoint, models
from faq_deploy.architectures import ARCHITECTURES, active_groups, architecture_of, blocks_of
from faq_deploy.data import calibration_rows, eval_tokens, load_corpus
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.perplexity import perplexity
from faq_deploy.quant import make_config, quantize
from faq_deploy.quant.awq import (
    FINAL,
    AwqConfig,
    activation_statistics,
    apply_scale,
    candidate_scales,
    channel_mean_abs,
    local_loss,
    quantize_awq,
    search_scale,
    weight_profile,
    window_loss,
)
from faq_deploy.quant.blocks import block_inputs, run_block
from faq_deploy.quant.faq import FaqConfig, future, guide, mix
from faq_deploy.quant.quantizer import fake_quantize, quantize_weight
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
    # FAQ's own defaults round by GPTQ after a cheaper search; with AWQ's, γ = 0 is AWQ bit for bit
    as_awq = {"rounding": "nearest", "coarse": 1, "search_rows": AwqConfig.search_rows}
    gamma0 = _codes(quantize(tiny_model(architecture), make_config("faq", SCHEME, gamma=0.0, **as_awq),
                             calibration).weights)
    faq = _codes(quantize(tiny_model(architecture), make_config("faq", SCHEME, gamma=1.0, scope="all", **as_awq),
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
    """The block-by-block FP pass sees exactly the activations of an ordinary model forward, the
    final norm's input included."""
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
    handles.append(loaded.model.model.norm.register_forward_pre_hook(
        lambda _module, args: seen.__setitem__((30, FINAL), channel_mean_abs(args[0]))))
    with torch.inference_mode():
        loaded.model(calibration, use_cache=False)
    for handle in handles:
        handle.remove()
    assert prepass.keys() == seen.keys() and len(seen) == 30 * 3 + 1
    for key, a in seen.items():
        assert torch.allclose(prepass[key], a, rtol=1e-5, atol=1e-7), key


@pytest.mark.heavy
def test_awq_beats_rtn_end_to_end_and_its_checkpoint_reads_back(real_cache: Path, tmp_path: Path) -> None:
    """AWQ's search, clipping and folding on the default model at a small token budget, w3 g32; the
    checkpoint (folded norms included) reads back to the same fake-quantized model. FAQ runs end to end
    in every FAQ build the suite makes (conftest's jetson_bundle), on the same code paths past the scales."""
    results = {}
    for method in ("rtn", "awq"):
        loaded = models.load(None)
        tokenizer = loaded.tokenizer.backend_tokenizer
        calibration = calibration_rows(tokenizer, load_corpus("speeches-calib"), 2, 128, 0)
        config = make_config(method, SCHEME, **({"search_rows": 1} if method == "awq" else {}))
        quantized = quantize(loaded.model, config, calibration)
        assert len(quantized.weights) == 210
        ids = eval_tokens(tokenizer, load_corpus("speeches-eval"), 1024)
        results[method] = perplexity(loaded.model, ids).perplexity
    reread = checkpoint.load(checkpoint.save(quantized, loaded.tokenizer, loaded.ref, tmp_path / "awq"))
    with torch.inference_mode():
        expected = loaded.model(ids[None, :256]).logits
        assert torch.allclose(reread.model(ids[None, :256]).logits, expected, rtol=1e-5, atol=1e-5)
    # measured: 39.1 → 26.5 (1,024 tokens)
    assert results["awq"] < 0.8 * results["rtn"], results


def _scaled_stats(model, calibration: torch.Tensor, first: int, count: int, x: torch.Tensor) -> dict:
    """a_{b,G} of blocks first..first+count−1 of `model` (as it stands) run from x, block `first`'s input."""
    arch, blocks = architecture_of(model), blocks_of(model)
    _, kwargs = block_inputs(model, blocks, calibration)
    found = {}
    for index in range(first, min(first + count, len(blocks))):
        groups = active_groups(arch, blocks[index])
        capture = run_block(blocks[index], x, kwargs, {g.balance[0] for g in groups})
        found.update({(index, g.name): channel_mean_abs(capture.input(g.balance[0])) for g in groups})
        x = capture.block_out
    return found


def test_the_fp_pass_just_ahead_measures_each_block_before_it_changes() -> None:
    """With FP propagation the statistics pass runs lazily, `window` blocks ahead of the quantizer, and
    serves GPTQ's Hessians from the same forward: every statistic the search reads, the future ones
    included, equals the whole pre-pass of the unquantized model."""
    config = FaqConfig(scheme=SCHEME, gamma=0.5, window=2, rounding="gptq")
    calibration = tiny_calibration()
    seen = {}

    def record(stats, index, group):
        seen[index, group.name] = [stats[index, group.name].clone(), *future(config, stats, index, group)]
        return mix(config, stats, index, group)

    quantize_awq(tiny_model("LlamaForCausalLM"), config, calibration, replace(guide(config), statistic=record))
    prepass = activation_statistics(tiny_model("LlamaForCausalLM"), calibration)
    assert {index for index, _ in seen} == {0, 1, 2}
    for (index, name), (own, *ahead) in seen.items():
        assert len(ahead) == 2 - index
        for k, a in enumerate([own, *ahead]):
            assert torch.allclose(a, prepass[index + k, name], rtol=1e-6, atol=1e-7), (index, k, name)


@pytest.mark.parametrize("future_stats", ["prepass", "lookahead"])
def test_quant_propagation_sees_the_quantized_prefix(future_stats: str) -> None:
    """propagate=quant: block b's own statistic comes from the quantized blocks before it; the
    future comes from the FP pre-pass, or (lookahead) from that same input pushed through FP blocks."""
    config = FaqConfig(scheme=SCHEME, gamma=0.5, window=2, propagate="quant", future_stats=future_stats)
    calibration = tiny_calibration()
    seen = {}

    def record(stats, index, group):
        seen[index, group.name] = [stats[index, group.name].clone(), *future(config, stats, index, group)]
        return mix(config, stats, index, group)

    model = tiny_model("LlamaForCausalLM")
    quantize_awq(model, config, calibration, replace(guide(config), statistic=record))
    with torch.no_grad():  # the fake-quantized model is the quantized prefix of every block
        prefix_inputs = model(calibration, output_hidden_states=True).hidden_states
    reference = tiny_model("LlamaForCausalLM")  # the same FP weights
    prepass = activation_statistics(reference, calibration)
    for (index, name), (own, *ahead) in seen.items():
        measured = _scaled_stats(reference, calibration, index, 1 + 2 * (future_stats == "lookahead"),
                                 prefix_inputs[index])
        assert torch.allclose(own, measured[index, name], rtol=1e-5, atol=1e-6), (index, name)
        if index > 0:  # a quantized prefix is seen, not the FP one
            assert not torch.allclose(own, prepass[index, name], rtol=1e-3)
        source = measured if future_stats == "lookahead" else prepass
        expected = [source[index + k, name] for k in range(1, len(ahead) + 1)]
        assert len(ahead) == min(2, 2 - index)
        assert all(torch.allclose(a, e, rtol=1e-5, atol=1e-6) for a, e in zip(ahead, expected, strict=True))


def test_future_switches_the_final_norm_in_only_for_residual_groups_with_virtual() -> None:
    arch = ARCHITECTURES["LlamaForCausalLM"]
    attn_in, mlp_out = arch.groups[0], arch.groups[3]
    stats = {(b, g.name): torch.tensor([1.0, 3.0]) * (b + 1) for b in range(3) for g in arch.groups}
    stats[3, FINAL] = torch.tensor([5.0, 1.0])
    virtual = FaqConfig(window=2, last_blocks="virtual", scope="all")
    assert [f.tolist() for f in future(virtual, stats, 1, attn_in)] == [[3.0, 9.0], [5.0, 1.0]]
    assert [f.tolist() for f in future(virtual, stats, 2, attn_in)] == [[5.0, 1.0]]
    assert future(virtual, stats, 2, mlp_out) == []  # the final norm's input is not a down_proj input
    assert future(replace(virtual, last_blocks="truncate"), stats, 2, attn_in) == []


def test_without_alpha_search_ratio_zero_ignores_the_calibration() -> None:
    """alpha_search=False takes s = (a^r / w̄^(1−r)) for the fixed r: at r = 0 the scales (and, with
    clip off, the codes) depend on the weights alone; the searched scales depend on the data."""
    first, second = tiny_calibration(seed=0), tiny_calibration(seed=1)
    for options, same in (({"alpha_search": False, "ratio": 0.0}, True), ({}, False)):
        config = make_config("awq", SCHEME, clip=False, **options)
        codes = [_codes(quantize(tiny_model("LlamaForCausalLM"), config, rows).weights) for rows in (first, second)]
        assert _same(*codes, list(codes[0])) is same, options


def test_window_loss_is_the_error_at_the_end_of_the_window_and_its_search_minimises_it() -> None:
    model, calibration = tiny_model("LlamaForCausalLM"), tiny_calibration()
    blocks, arch = blocks_of(model), architecture_of(model)
    x, kwargs = block_inputs(model, blocks, calibration)
    with torch.no_grad():
        fp_states = model(calibration, output_hidden_states=True).hidden_states
    loss = window_loss(blocks, 0, 1, x, kwargs)
    assert loss() == 0.0
    group, block = arch.groups[2], blocks[0]  # mlp-in of block 0
    balance = [block.get_submodule(name) for name in group.balance]
    originals = [linear.weight.detach().clone() for linear in balance]

    def errors(s: torch.Tensor) -> tuple[float, float]:
        """With the group quantized at s: the window loss, and the same error through the model."""
        with torch.no_grad():
            for linear, w in zip(balance, originals, strict=True):
                linear.weight.copy_(quantize_weight(w * s, SCHEME).dequantize() / s)
            states = model(calibration, output_hidden_states=True).hidden_states
            window = loss()
            for linear, w in zip(balance, originals, strict=True):
                linear.weight.copy_(w)
        return window, (states[2] - fp_states[2]).pow(2).mean().item()  # block 2's input: blocks 0..1 done

    a = activation_statistics(model, calibration)[0, group.name]
    config = AwqConfig(scheme=SCHEME)
    fp = run_block(block, x, kwargs, {group.inspect}, {group.inspect})
    by_window = search_scale(block, group, a, config, config.scheme, loss)
    by_module = search_scale(block, group, a, config, config.scheme, local_loss(block, group, fp))
    assert not torch.equal(by_window, by_module)
    (window, through_model), (other, _) = errors(by_window), errors(by_module)
    assert window == pytest.approx(through_model, rel=1e-4)
    assert window <= other


@pytest.mark.parametrize(("coarse", "reach", "scored"), [
    (1, 0, list(range(20))), (4, 0, [0, 4, 8, 12, 16, 5, 6, 7, 9, 10, 11]), (4, 2, [0, 4, 8, 12, 16, 6, 7, 9, 10])])
def test_the_search_scores_every_coarse_ratio_then_those_within_reach(coarse: int, reach: int,
                                                                      scored: list[int]) -> None:
    model, calibration = tiny_model("LlamaForCausalLM"), tiny_calibration()
    block, group = blocks_of(model)[0], architecture_of(model).groups[2]  # mlp-in
    a = activation_statistics(model, calibration)[0, group.name]
    config = AwqConfig(scheme=SCHEME, coarse=coarse, reach=reach)
    linear = block.get_submodule(group.balance[0])
    w_bar = weight_profile([block.get_submodule(name).weight for name in group.balance], SCHEME.group_size)
    weights = [fake_quantize(linear.weight * s, SCHEME) / s
               for s in (candidate_scales(a, w_bar, step / config.grid) for step in range(config.grid))]
    seen: list[int] = []

    def loss() -> float:  # least at ratio 9/20; which ratio stands is read off the weight
        seen.append(next(step for step, w in enumerate(weights) if torch.equal(w, linear.weight)))
        return abs(seen[-1] - 9.4)

    s = search_scale(block, group, a, config, SCHEME, loss)
    assert seen == scored and torch.equal(s, candidate_scales(a, w_bar, 9 / config.grid))


@pytest.mark.parametrize("options", [
    {"alpha_search": False}, {"propagate": "quant"}, {"propagate": "quant", "future_stats": "lookahead"},
    {"last_blocks": "virtual"}, {"objective": "window"}])
def test_each_ablation_switch_changes_faq_and_keeps_valid_codes(options: dict) -> None:
    calibration = tiny_calibration()
    default = _codes(quantize(tiny_model("Qwen2ForCausalLM"), make_config("faq", SCHEME), calibration).weights)
    switched = _codes(quantize(tiny_model("Qwen2ForCausalLM"), make_config("faq", SCHEME, **options),
                               calibration).weights)
    assert not _same(default, switched, list(default))
    assert all(int(codes.max()) <= SCHEME.max_code for codes, _, _ in switched.values())


def test_lookahead_without_quant_propagation_is_refused() -> None:
    with pytest.raises(InvalidQuantConfig, match="lookahead.*propagate"):
        FaqConfig(future_stats="lookahead")
