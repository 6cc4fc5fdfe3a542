"""Prompt-lookup speculative decoding: the drafter, the acceptance rule, and on real level-0 graphs of
the default model (both exporters: the shared-buffer cache and the grown one) the same greedy tokens
as plain decoding and a cache that forgets a rejected draft."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from commands import FAQ_RUN
from conftest import Exports

from faq_deploy.export.options import EXPORTERS
from faq_runtime.load import LoadOptions, load
from faq_runtime.lookup import PromptLookup
from faq_runtime.model import Decoder
from faq_runtime.sampling import Sampler, Sampling

PARAGRAPH = ("The President said that the nation must invest in its roads, its schools and its workers, because "
             "a country that builds is a country that grows. He asked Congress to pass the budget this year.")
PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    f"{PARAGRAPH}\nQuestion: What did the President ask Congress to do?\nAnswer, in the text's words:",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\n# the same two functions again:\n",
)


def test_the_latest_occurrence_of_the_longest_ngram_proposes_what_followed() -> None:
    drafter = PromptLookup(max_ngram=3, min_ngram=1, first_draft=4).start([1, 2, 3, 9, 8, 2, 3, 7, 6, 5, 2, 3])
    # (2, 3) ends the sequence; its latest earlier occurrence was followed by 7, 6, 5, 2
    assert drafter.propose(10) == [7, 6, 5, 2]
    assert drafter.propose(2) == [7, 6]
    drafter.extend([4])
    assert drafter.propose(4) == []  # no earlier 4
    drafter.extend([1, 2, 3])  # (1, 2, 3) occurred at the start: the 3-gram wins over (2, 3)
    assert drafter.propose(4) == [9, 8, 2, 3]


def test_the_draft_grows_while_accepted_and_shrinks_after_a_rejection() -> None:
    drafter = PromptLookup(max_draft=6, first_draft=2).start([])
    drafter.feedback(2, 2)
    drafter.feedback(4, 4)
    assert drafter.length == 6  # capped
    drafter.feedback(6, 1)
    drafter.feedback(5, 0)
    assert drafter.length == 4
    for _ in range(10):
        drafter.feedback(1, 0)
    assert drafter.length == 1


@pytest.mark.parametrize("drafted", [0, 3, 5])  # the likeliest token, a middling one, one the top-k cut drops
def test_a_checked_draft_leaves_the_sampled_distribution_unchanged(drafted: int) -> None:
    logits = np.array([2.0, 1.5, 1.2, 1.0, 0.3, -1.0, 0.8, -0.5], np.float32)
    sampling = Sampling(temperature=0.8, top_k=6, top_p=0.97, repetition_penalty=1.3, seed=11)
    seen = [1, 6]
    exact = Sampler(sampling)._probabilities(logits, seen)
    assert exact[5] == 0 and exact[7] == 0  # cut by top-k
    draws = 40_000
    plain, checked = Sampler(sampling), Sampler(replace(sampling, seed=12))
    plain_counts = np.bincount([plain(logits, seen) for _ in range(draws)], minlength=8) / draws
    results = [checked.verify(logits, seen, drafted) for _ in range(draws)]
    counts = np.bincount([token for token, _ in results], minlength=8) / draws
    kept = np.mean([accepted for _, accepted in results])
    # 4.5 standard deviations of a frequency near 0.3 over 40,000 draws is 0.010
    assert np.abs(plain_counts - exact).max() < 0.01
    assert np.abs(counts - exact).max() < 0.01, (counts, exact)
    assert abs(kept - exact[drafted]) < 0.01  # the draft is kept with its own probability
    assert all(accepted == (token == drafted) for token, accepted in results)


def test_a_greedy_check_keeps_the_draft_only_when_it_is_the_argmax() -> None:
    logits = np.array([0.1, 3.0, 2.9], np.float32)
    greedy = Sampler(Sampling())
    assert greedy.verify(logits, [], 1) == (1, True)
    assert greedy.verify(logits, [], 2) == (1, False)
    # the repetition penalty applies as in plain greedy: 3.0 / 1.1 < 2.9
    assert Sampler(Sampling(repetition_penalty=1.1)).verify(logits, [1], 2) == (2, True)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_speculative_greedy_equals_plain_greedy(exports: Exports, exporter: str) -> None:
    """On a level-0 graph a row's logits do not depend on how many rows run with it (measured: equal
    to the bit), so a checked draft must give exactly the tokens of one-at-a-time decoding."""
    folder = exports.level0(4, exporter)
    plain = load(folder, LoadOptions(check_device=False, speculate=False))
    fast = load(folder, LoadOptions(check_device=False))
    drafted = accepted = 0
    for prompt in PROMPTS:
        ids = plain.encode(prompt)
        expected = plain.complete(ids, 40)
        done = fast.complete(ids, 40)
        assert done.tokens == expected.tokens, prompt
        assert done.text == expected.text and done.finish_reason == expected.finish_reason
        drafted, accepted = drafted + done.drafts.drafted, accepted + done.drafts.accepted
        assert expected.drafts.drafted == 0
    assert 0 < accepted < drafted  # drafts were kept and drafts were rejected (so the cache was rewound)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_the_cache_after_a_rejected_draft_equals_one_token_at_a_time(exports: Exports, exporter: str) -> None:
    decoder = Decoder(exports.level0(4, exporter))
    ids = load(decoder.folder, LoadOptions(check_device=False)).encode(PARAGRAPH)
    prompt, accepted, rejected = ids[:20], ids[20:23], [17, 4242, 99]
    one_by_one = decoder.new_cache(64)
    decoder.step(prompt, one_by_one)
    for token in accepted:
        decoder.step([token], one_by_one)
    drafted = decoder.new_cache(64)
    decoder.step(prompt, drafted)
    decoder.rows(accepted + rejected, drafted)
    drafted.rewind(len(prompt) + len(accepted))
    assert drafted.length == one_by_one.length == 23
    for kept, reference in zip(drafted.values, one_by_one.values, strict=True):
        kept, reference = kept.numpy()[:, :, :23], reference.numpy()[:, :, :23]
        assert np.abs(kept - reference).max() <= 1e-4 * np.abs(reference).max()
    # and the next step sees only the kept positions
    after_draft, after_steps = decoder.step([ids[23]], drafted), decoder.step([ids[23]], one_by_one)
    assert np.abs(after_draft - after_steps).max() <= 1e-4 * np.abs(after_steps).max()


def test_generate_reports_drafts_in_json_and_can_turn_them_off(x86_bundle: Path) -> None:
    def generate(*flags: str) -> dict:
        done = subprocess.run([*FAQ_RUN, "generate", str(x86_bundle), "--prompt", PROMPTS[2], "--max-tokens", "24",
                               "--json", *flags], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    on, off = generate(), generate("--no-speculate")
    assert on["drafts"]["drafted"] > 0 and 0 <= on["drafts"]["accepted"] <= on["drafts"]["drafted"]
    assert off["drafts"] == {"drafted": 0, "accepted": 0, "acceptance": 0.0}
