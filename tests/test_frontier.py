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
    """On speeches-eval, whose first 20,480 tokens give the float reference every page quotes (23.14). The
    bench reads its second text through the same tokens-and-windows code, so one text checks the route
    (each 1,024 tokens of the full model cost this test about 5 s on one core)."""
    record = json.loads(FRONTIER.read_text())
    assert (record["texts"]["speeches-eval"], record["window"]) == (20480, 1024)
    ids = eval_tokens(default_model.tokenizer.backend_tokenizer, load_corpus("speeches-eval"), 20480)
    reads = perplexity(default_model.model, ids, record["window"]).perplexity
    assert record["control"]["speeches-eval"] == pytest.approx(reads, rel=2e-4)
    assert reads == pytest.approx(23.1403, abs=0.005)
