"""Greedy generation over a Decoder with its KV cache: prefill the prompt once, then one token a step."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from faq_runtime.bundle import MANIFEST, MODEL_DIR, verify
from faq_runtime.model import GENAI_CONFIG, Decoder


def model_folder(path: Path, hashes: bool = True) -> Path:
    """The model folder of a bundle (verified first) or a bare exported model folder."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return verify(path, hashes=hashes).model_dir
    if (path / GENAI_CONFIG).exists():
        return path
    raise FileNotFoundError(f"{path} is neither a bundle (no {MANIFEST}) nor a model folder (no {GENAI_CONFIG}); "
                            f"pass the folder `faq-deploy build` wrote, or its {MODEL_DIR}/")


class Generator:
    def __init__(self, folder: Path, threads: int | None = None) -> None:
        self.decoder = Decoder(folder, threads=threads)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / GENAI_CONFIG).read_text())["model"]
        eos = config.get("eos_token_id")
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])

    def tokens(self, prompt_ids: list[int], max_tokens: int) -> Iterator[int]:
        """Greedy next tokens until a stop token or `max_tokens`."""
        cache = self.decoder.empty_cache()
        ids = np.asarray([prompt_ids], np.int64)
        for _ in range(max_tokens):
            logits, cache = self.decoder.forward(ids, cache)
            token = int(logits[0, -1].argmax())
            if token in self.stop_ids:
                return
            yield token
            ids = np.asarray([[token]], np.int64)

    def generate(self, prompt: str, max_tokens: int, on_text: Callable[[str], None] | None = None) -> str:
        """The completion of `prompt`; `on_text` receives each new piece of text as it is decoded."""
        out: list[int] = []
        shown = ""
        for token in self.tokens(self.tokenizer.encode(prompt, add_special_tokens=False).ids, max_tokens):
            out.append(token)
            text = self.tokenizer.decode(out)
            if on_text and len(text) > len(shown):
                on_text(text[len(shown):])
            shown = text
        return self.tokenizer.decode(out)
