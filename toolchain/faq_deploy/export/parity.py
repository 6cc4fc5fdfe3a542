"""Parity of an exported graph with the fake-quantized torch model it came from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from faq_deploy.perplexity import Logits
from faq_runtime.model import Decoder


@dataclass(frozen=True)
class Parity:
    tokens: int
    max_rel_diff: float      # max |onnx − torch| over the logits ÷ max |torch logit|
    argmax_agreement: float  # fraction of positions whose top token agrees


@torch.inference_mode()
def reference_logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """The torch model's logits [tokens, vocabulary] of one sequence from an empty cache, float32 on the CPU."""
    return model(ids[None].to(model.device)).logits[0].float().cpu()


@torch.inference_mode()
def compare(reference: PreTrainedModel | torch.Tensor, decoder: Decoder, ids: torch.Tensor) -> Parity:
    """Logits of both on the same tokens (one sequence from an empty cache). `reference` is the torch
    model or its `reference_logits`, taken first so that the model can go before the graph is loaded."""
    expected = reference if isinstance(reference, torch.Tensor) else reference_logits(reference, ids)
    return compare_logits(expected, torch.from_numpy(decoder.logits(ids.tolist())))


def compare_logits(expected: torch.Tensor, actual: torch.Tensor) -> Parity:
    """Parity of logits [tokens, vocabulary] computed elsewhere (on an emulated board, say) with the torch model's."""
    # reduced a slice of rows at a time: a whole difference table would be another [tokens, vocabulary]
    # float32 copy (0.6 GB at 1,024 tokens of a 150k vocabulary), and its abs() one more
    diff = max(float((a - e).abs().max()) for a, e in zip(actual.split(128), expected.split(128), strict=True))
    low, high = expected.aminmax()
    agree = (actual.argmax(-1) == expected.argmax(-1)).float().mean()
    return Parity(len(expected), diff / max(-float(low), float(high)), float(agree))


def onnx_logits(decoder: Decoder) -> Logits:
    """A perplexity logits function over an exported graph."""
    return lambda row: torch.from_numpy(decoder.logits(row.tolist()))
