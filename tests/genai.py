"""onnxruntime-genai as the second, independent client of our model folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime_genai as og


def genai_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    """The n tokens onnxruntime-genai's greedy search appends to `ids`."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def genai_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """onnxruntime-genai's float32 logits [vocab] after the prompt `ids`."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    return np.asarray(generator.get_output("logits"))[0, -1].astype(np.float32)
