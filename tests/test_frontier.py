"""The frontier bench (scripts/bench_frontier.py) scores every engine the same way: its control, the
float model converted to an F32 GGUF and scored through llama-cpp-python's logits, must read what the
torch float model reads on the same tokens and windows. A scorer off by a token, a BOS or a window
would move it by far more than float rounding does. The same run checks the float model's published
reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from faq_deploy.data import eval_tokens, load_corpus
from faq_deploy.perplexity import perplexity

FRONTIER = Path(__file__).resolve().parents[1] / "docs" / "results" / "frontier.json"


@pytest.mark.heavy
def test_the_benchs_llama_cpp_route_scores_as_torch_does(default_model) -> None:
    """Also the float reference every page quotes: 23.14 on the first 20,480 tokens of speeches-eval."""
    record = json.loads(FRONTIER.read_text())
    torch_reads = {}
    for text, tokens in record["texts"].items():
        ids = eval_tokens(default_model.tokenizer.backend_tokenizer, load_corpus(text), tokens)
        torch_reads[text] = perplexity(default_model.model, ids, record["window"]).perplexity
        assert record["control"][text] == pytest.approx(torch_reads[text], rel=2e-4), text
    assert (record["texts"]["speeches-eval"], record["window"]) == (20480, 1024)
    assert torch_reads["speeches-eval"] == pytest.approx(23.1403, abs=0.005)
