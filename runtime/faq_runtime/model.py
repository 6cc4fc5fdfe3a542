"""An exported decoder as an onnxruntime session: forward passes with an explicit KV cache.

The graph contract is the onnxruntime-genai builder's (genai_config.json names the inputs and
outputs): `input_ids`, `attention_mask`, optional `position_ids`, and per layer
`past_key_values.N.key/value` [batch, kv_heads, past, head_size] in, `logits` and
`present.N.key/value` out. The dynamo fallback exporter emits the same names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

GENAI_CONFIG = "genai_config.json"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class DecoderSpec:
    """The shapes and names of one decoder graph, read from genai_config.json."""

    filename: str
    layers: int
    kv_heads: int
    head_size: int
    vocab_size: int
    context_length: int
    past_key: str    # e.g. "past_key_values.%d.key"
    past_value: str
    present_key: str
    present_value: str

    @classmethod
    def read(cls, folder: Path) -> DecoderSpec:
        config = json.loads((folder / GENAI_CONFIG).read_text())["model"]
        decoder = config["decoder"]
        inputs, outputs = decoder["inputs"], decoder["outputs"]
        return cls(decoder["filename"], decoder["num_hidden_layers"], decoder["num_key_value_heads"],
                   decoder["head_size"], config["vocab_size"], config["context_length"],
                   inputs["past_key_names"], inputs["past_value_names"],
                   outputs["present_key_names"], outputs["present_value_names"])


class Decoder:
    """One session over a model folder; `forward` runs a chunk of tokens after a cache."""

    def __init__(self, folder: Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.spec = DecoderSpec.read(self.folder)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / self.spec.filename), options,
                                            providers=list(providers))
        self.input_names = {i.name for i in self.session.get_inputs()}
        past = next(i for i in self.session.get_inputs() if i.name == self.spec.past_key % 0)
        self.kv_dtype = _NUMPY_TYPES[past.type]

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, self.spec.kv_heads, 0, self.spec.head_size)
        cache = {}
        for layer in range(self.spec.layers):
            cache[self.spec.past_key % layer] = np.zeros(shape, self.kv_dtype)
            cache[self.spec.past_value % layer] = np.zeros(shape, self.kv_dtype)
        return cache

    def forward(self, ids: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits [batch, len, vocab] for `ids` [batch, len] after `cache`, and the grown cache."""
        batch, length = ids.shape
        past = cache[self.spec.past_key % 0].shape[2]
        feeds = dict(cache)
        feeds["input_ids"] = ids.astype(np.int64)
        feeds["attention_mask"] = np.ones((batch, past + length), np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.broadcast_to(np.arange(past, past + length, dtype=np.int64), (batch, length))
        names = ["logits"] + [name % layer for layer in range(self.spec.layers)
                              for name in (self.spec.present_key, self.spec.present_value)]
        logits, *present = self.session.run(names, feeds)
        new_cache = {}
        for layer in range(self.spec.layers):
            new_cache[self.spec.past_key % layer] = present[2 * layer]
            new_cache[self.spec.past_value % layer] = present[2 * layer + 1]
        return logits, new_cache

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len, vocab] of one sequence from an empty cache, as float32."""
        logits, _ = self.forward(np.asarray([ids], np.int64), self.empty_cache())
        return logits[0].astype(np.float32)
