"""Perplexity: non-overlapping windows, the first token of each is context only."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from faq_deploy.errors import TextError
from faq_deploy.progress import progress


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float         # mean negative log-likelihood per predicted token (nats)
    tokens: int        # tokens evaluated (windows × window)
    predicted: int     # tokens scored: window − 1 per window
    window: int


Logits = Callable[[torch.Tensor], torch.Tensor]  # token ids [window] → logits [window, vocab]
WINDOW = 1024  # the window the build, eval and the benches share unless told otherwise


def torch_logits(model: PreTrainedModel) -> Logits:
    return lambda row: model(row.to(model.device)[None]).logits[0]


@torch.inference_mode()
def perplexity(model: PreTrainedModel | Logits, tokens: torch.Tensor, window: int = WINDOW) -> Perplexity:
    """exp(mean NLL) over ⌊len(tokens) / window⌋ windows; a trailing remainder is not scored.
    `model` is a torch model or any function from token ids to logits (an ONNX session, say)."""
    logits_of = torch_logits(model) if isinstance(model, PreTrainedModel) else model
    windows = len(tokens) // window
    if windows == 0:
        raise TextError(f"{len(tokens)} tokens do not fill one {window}-token window",
                        "raise --tokens or lower --window")
    total, count = 0.0, 0
    for row in progress(tokens[: windows * window].view(windows, window), "perplexity", "window"):
        logits = logits_of(row)[:-1].float()
        total += F.cross_entropy(logits, row[1:].to(logits.device), reduction="sum").item()
        count += window - 1
    nll = total / count
    return Perplexity(math.exp(nll), nll, windows * window, count, window)
