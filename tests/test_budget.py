"""Mixed precision under a byte budget: the knapsack is exact, the budget holds to the byte in a real
build, and the choice beats spending the same bytes evenly along the network."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest
import torch
from commands import FAQ_DEPLOY
from genai import genai_greedy

from faq_deploy import models
from faq_deploy.architectures import packed_units
from faq_deploy.data import Calibration, eval_tokens, load_corpus
from faq_deploy.export.graph import weight_files_bytes
from faq_deploy.perplexity import perplexity
from faq_deploy.quant import budget, make_config, quantize
from faq_deploy.quant.budget import Choice
from faq_deploy.quant.scheme import QuantScheme
from faq_runtime.bundle import MANIFEST
from faq_runtime.load import LoadOptions, load

SCHEME = QuantScheme(4, 32, scale_dtype="float16")


@pytest.mark.parametrize("seed", range(5))
def test_the_knapsack_finds_the_least_damage_that_fits(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)

    def options() -> list[Choice]:  # a small, damaging base and two larger, better upgrades
        sizes = [int(torch.randint(low, high, (), generator=generator)) * budget.BYTES_STEP
                 for low, high in ((1, 8), (8, 20), (8, 30))]
        damages = sorted(torch.rand(3, generator=generator).tolist(), reverse=True)
        return [Choice(SCHEME, size, damage) for size, damage in zip(sizes, damages, strict=True)]
    table = [options() for _ in range(5)]
    capacity = 60 * budget.BYTES_STEP
    fitting = [(sum(table[u][i].damage for u, i in enumerate(p)), p) for p in itertools.product(range(3), repeat=5)
               if sum(table[u][i].bytes for u, i in enumerate(p)) <= capacity]
    picks = budget.solve(table, capacity)
    assert sum(table[u][i].bytes for u, i in enumerate(picks)) <= capacity
    assert sum(table[u][i].damage for u, i in enumerate(picks)) == pytest.approx(min(fitting)[0])


def test_a_budget_below_the_smallest_choice_is_refused_with_the_need() -> None:
    table = [[Choice(SCHEME, 10 * budget.BYTES_STEP, 1.0)]]
    with pytest.raises(Exception, match="need at least"):
        budget.solve(table, 5 * budget.BYTES_STEP)


def test_options_are_the_scheme_and_its_8_bit_upgrades_in_whole_groups() -> None:
    assert [(o.bits, o.group_size) for o in budget.options_for(SCHEME, {576})] == [(4, 32), (8, 32)]
    assert [(o.bits, o.group_size) for o in budget.options_for(SCHEME, {1536})] == [(4, 32), (8, 128), (8, 32)]
    assert all(o.scale_dtype == "float16" for o in budget.options_for(SCHEME, {1536}))
    assert budget.options_for(QuantScheme(8, 32), {1536}) == [QuantScheme(8, 32)]


@pytest.mark.heavy
def test_the_choice_beats_the_same_bytes_spent_evenly(default_model) -> None:
    """RTN on the default model, 3 MB over uniform w4 g32: the knapsack's upgrades against as many bytes of
    upgrades to every third unit along the network, on the calibration domain's held-out 1990s."""
    tokenizer = default_model.tokenizer.backend_tokenizer
    rows = Calibration("speeches:1790-1989", 4, 256, 0).rows(tokenizer)
    held_out = eval_tokens(tokenizer, load_corpus("speeches:1990-1999"), 2048)
    table = budget.choices(default_model.model, SCHEME, rows)
    units = packed_units(default_model.model)
    capacity = sum(options[0].bytes for options in table) + 3_000_000
    chosen = {name: table[u][i].scheme for u, i in enumerate(budget.solve(table, capacity)) for name in units[u] if i}
    evenly, spent = {}, sum(options[0].bytes for options in table)
    for u in [*range(0, len(units), 3), *(u for u in range(len(units)) if u % 3)]:
        extra = table[u][-1].bytes - table[u][0].bytes
        if spent + extra <= capacity:
            spent += extra
            evenly.update({name: table[u][-1].scheme for name in units[u]})
    scores = {}
    for label, overrides in (("knapsack", chosen), ("evenly", evenly)):
        model = models.load(None).model
        config = make_config("rtn", SCHEME, overrides=overrides)
        quantize(model, config)
        scores[label] = perplexity(model, held_out).perplexity
    assert scores["knapsack"] < scores["evenly"], scores


@pytest.mark.heavy
def test_a_budget_build_holds_to_the_byte_and_both_runtimes_run_it(real_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed"
    done = subprocess.run([*FAQ_DEPLOY, "build", "--target", "x86", "--method", "rtn", "--budget", "98",
                           "--samples", "4", "--seq-len", "256", "--eval-tokens", "256", "--out", str(out), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    written = weight_files_bytes(out / "model")
    assert 97_000_000 < written <= 98_000_000  # filled, never over
    quantization = json.loads((out / MANIFEST).read_text())["quantization"]
    assert quantization["budget_bytes"] == 98_000_000
    widths = {(o["bits"], o["group_size"]) for o in quantization["overrides"].values()}
    assert widths and widths <= {(8, 32), (8, 128)}
    assert json.loads(done.stdout)["parity"]["argmax_agreement"] > 0.93
    generator = load(out, LoadOptions(check_device=False, speculate=False))  # genai decodes a token a forward
    ids = generator.encode("My fellow citizens,")
    ours = list(generator.tokens(ids, 16))
    assert len(set(ours)) > 4 and ours == genai_greedy(out / "model", ids, 16)
