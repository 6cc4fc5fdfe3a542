"""The perplexity harness on the real default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from faq_deploy.data import eval_tokens, load_corpus
from faq_deploy.errors import TextError
from faq_deploy.models import LoadedModel
from faq_deploy.perplexity import perplexity
from faq_deploy.quant import make_config, quantize
from faq_deploy.quant.scheme import QuantScheme


def _ids(loaded: LoadedModel, n: int) -> torch.Tensor:
    return eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus("speeches-eval"), n)


def test_windows_and_remainder(default_model: LoadedModel) -> None:
    result = perplexity(default_model.model, _ids(default_model, 600), window=256)
    assert (result.tokens, result.predicted, result.window) == (512, 510, 256)
    assert 5 < result.perplexity < 100


def test_too_few_tokens_for_one_window(default_model: LoadedModel) -> None:
    with pytest.raises(TextError, match="one 1024-token window"):
        perplexity(default_model.model, _ids(default_model, 100), window=1024)


@pytest.mark.heavy
def test_quantization_damage_orders_as_expected(real_cache: Path) -> None:
    from faq_deploy import models

    results = {}
    for label, scheme in [("fp", None), ("w4g32", QuantScheme(4, 32)), ("w3g64", QuantScheme(3, 64))]:
        loaded = models.load(None)
        if scheme:
            quantize(loaded.model, make_config("rtn", scheme))
        results[label] = perplexity(loaded.model, _ids(loaded, 1024), window=1024).perplexity
    assert results["fp"] < results["w4g32"] < results["w3g64"]
