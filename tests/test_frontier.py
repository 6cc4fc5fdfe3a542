"""The frontier bench (scripts/bench_frontier.py) scores every engine the same way: its control, the
float model converted to an F32 GGUF and scored through llama-cpp-python's logits, must read what the
torch float model reads on the same tokens and windows. A scorer off by a token, a BOS or a window
would move it by far more than float rounding does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faq_deploy.data import eval_tokens, load_corpus
from faq_deploy.perplexity import perplexity

FRONTIER = Path(__file__).resolve().parents[1] / "docs" / "results" / "frontier.json"


@pytest.mark.heavy
def test_the_benchs_llama_cpp_route_scores_as_torch_does(default_model) -> None:
    record = json.loads(FRONTIER.read_text())
    for text, tokens in record["texts"].items():
        ids = eval_tokens(default_model.tokenizer.backend_tokenizer, load_corpus(text), tokens)
        expected = perplexity(default_model.model, ids, record["window"]).perplexity
        assert record["control"][text] == pytest.approx(expected, rel=2e-4), text
