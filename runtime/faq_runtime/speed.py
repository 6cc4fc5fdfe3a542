"""Prefill and decode rates of a decoder, timed one way for every script that reports them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from faq_runtime.model import Decoder


@dataclass(frozen=True)
class Speed:
    prefill_tokens_s: float
    decode_tokens_s: float | None  # None when no step was asked for


def measure(decoder: Decoder, prompt: Sequence[int], steps: int) -> Speed:
    """One prefill of `prompt` into a fresh cache, then `steps` greedy one-token steps after it."""
    cache = decoder.new_cache(len(prompt) + steps)
    start = time.perf_counter()
    logits = decoder.step(prompt, cache)
    prefilled = time.perf_counter()
    for _ in range(steps):
        logits = decoder.step([int(logits.argmax())], cache)
    done = time.perf_counter()
    return Speed(len(prompt) / (prefilled - start), steps / (done - prefilled) if steps else None)
