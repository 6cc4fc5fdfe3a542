"""An exported decoder as an onnxruntime session: forward passes with an explicit KV cache.

The graph contract is the onnxruntime-genai builder's (genai_config.json names the inputs and
outputs): `input_ids`, `attention_mask`, optional `position_ids`, and per layer
`past_key_values.N.key/value` [batch, kv_heads, past, head_size] in, `logits` and
`present.N.key/value` out. The dynamo fallback exporter emits the same names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

GENAI_CONFIG = "genai_config.json"
# the decoder's session option both runtimes take their intra-op thread count from
THREADS_OPTION = "intra_op_num_threads"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
PREFILL_CHUNK = 512


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
    # GroupQueryAttention graphs accept the same buffer as past input and present output
    share_buffer: bool
    # onnxruntime session config entries: the dotted string keys of the decoder's session_options,
    # which onnxruntime-genai also passes to its session (e.g. session.qdq_matmulnbits_accuracy_level)
    session_config: Mapping[str, str]
    # the intra-op threads the bundle was built for (its board's), which onnxruntime-genai takes too
    threads: int | None = None

    @classmethod
    def read(cls, folder: Path) -> DecoderSpec:
        genai = json.loads((folder / GENAI_CONFIG).read_text())
        config = genai["model"]
        decoder = config["decoder"]
        inputs, outputs = decoder["inputs"], decoder["outputs"]
        entries = {key: value for key, value in decoder.get("session_options", {}).items()
                   if "." in key and isinstance(value, str)}
        return cls(decoder["filename"], decoder["num_hidden_layers"], decoder["num_key_value_heads"],
                   decoder["head_size"], config["vocab_size"], config["context_length"],
                   inputs["past_key_names"], inputs["past_value_names"],
                   outputs["present_key_names"], outputs["present_value_names"],
                   bool(genai.get("search", {}).get("past_present_share_buffer")), entries,
                   decoder.get("session_options", {}).get(THREADS_OPTION))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_size * dtype_bytes


class ContextFull(ValueError):
    """A step would write past the cache's capacity (the context it was sized for)."""


class Decoder:
    """One session over a model folder; `forward` runs a chunk of tokens after a cache."""

    def __init__(self, folder: Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.spec = DecoderSpec.read(self.folder)
        options = ort.SessionOptions()
        if threads is None and self.spec.threads:  # the bundle's board count, never more than this
            threads = min(self.spec.threads, len(os.sched_getaffinity(0)))  # process may run on
        if threads:  # else onnxruntime's default, one per core
            options.intra_op_num_threads = threads
        for key, value in self.spec.session_config.items():
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(self.folder / self.spec.filename), options,
                                            providers=list(providers))
        self.input_names = {i.name for i in self.session.get_inputs()}
        past = next(i for i in self.session.get_inputs() if i.name == self.spec.past_key % 0)
        self.kv_dtype = _NUMPY_TYPES[past.type]
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.logits_dtype = _NUMPY_TYPES[logits.type]
        # The cache lives where attention runs, so steps never copy it. GroupQueryAttention has CUDA
        # kernels for 16-bit floats only: a float32 graph's attention runs on the CPU even in a CUDA
        # session, and its shared-buffer cache must be CPU memory too. Measured with onnxruntime-gpu
        # 1.31.1 on an H100: with the cache in GPU memory, onnxruntime copies it around the CPU
        # attention and the past is lost from the first decoded token on; in CPU memory the output is
        # right and decode beats the host's 8 CPU threads (291 vs 192 tokens/s).
        gpu = self.session.get_providers()[0] in _GPU_PROVIDERS
        self.device = "cuda" if gpu and self.kv_dtype == np.float16 else "cpu"

    def empty_cache(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, self.spec.kv_heads, 0, self.spec.head_size)
        cache = {}
        for layer in range(self.spec.layers):
            cache[self.spec.past_key % layer] = np.zeros(shape, self.kv_dtype)
            cache[self.spec.past_value % layer] = np.zeros(shape, self.kv_dtype)
        return cache

    def _positions(self, past: int, length: int, batch: int = 1) -> dict[str, np.ndarray]:
        """The mask (and positions, for graphs that take them) of `length` new tokens after `past`."""
        feeds = {"attention_mask": np.ones((batch, past + length), np.int64)}
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.broadcast_to(np.arange(past, past + length, dtype=np.int64), (batch, length))
        return feeds

    def forward(self, ids: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits [batch, len, vocab] for `ids` [batch, len] after `cache`, and the grown cache."""
        batch, length = ids.shape
        past = cache[self.spec.past_key % 0].shape[2]
        feeds = {**cache, **self._positions(past, length, batch), "input_ids": ids.astype(np.int64)}
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
        return logits[0].astype(np.float32, copy=False)

    def new_cache(self, capacity: int | None = None) -> Cache:
        return Cache(self, capacity or self.spec.context_length)

    def step(self, ids: Sequence[int], cache: Cache) -> np.ndarray:
        """Append `ids` to the sequence in `cache`; the float32 logits [vocab] of the last one.

        Long prompts run in chunks of PREFILL_CHUNK: the graph computes logits for every position,
        and 1024 positions of a 49k vocabulary are 200 MB (twice, with the copy out) where only the
        last row is wanted. Chunks give the same logits (measured: bit-identical on the default model)."""
        self._check_room(len(ids), cache)
        for start in range(0, len(ids), PREFILL_CHUNK):
            logits = self._run(np.asarray([ids[start:start + PREFILL_CHUNK]], np.int64), cache)
        return logits[0, -1].astype(np.float32)

    def rows(self, ids: Sequence[int], cache: Cache) -> np.ndarray:
        """Append a few `ids` (a token and a draft after it) to `cache`; the float32 logits
        [len(ids), vocab] of every one, each the prediction of the token after it."""
        self._check_room(len(ids), cache)
        return self._run(np.asarray([ids], np.int64), cache)[0].astype(np.float32)

    @staticmethod
    def _check_room(new: int, cache: Cache) -> None:
        if cache.length + new > cache.capacity:
            raise ContextFull(f"{cache.length} cached + {new} new tokens exceed the context of "
                              f"{cache.capacity} tokens")

    def _run(self, batch: np.ndarray, cache: Cache) -> np.ndarray:
        length = batch.shape[1]
        cache.binding.bind_cpu_input("input_ids", batch)
        for name, value in self._positions(cache.length, length).items():
            cache.binding.bind_cpu_input(name, np.ascontiguousarray(value))
        # One-token steps reuse one logits buffer and read it directly (get_outputs() would wrap
        # all 61 outputs: 0.7 ms a step, measured); a prompt's shape varies, so ORT allocates it
        if length == 1:
            cache.binding.bind_ortvalue_output("logits", cache.step_logits)
            self.session.run_with_iobinding(cache.binding)
            logits = cache.step_logits.numpy()
        else:
            cache.binding.bind_output("logits", "cpu")
            self.session.run_with_iobinding(cache.binding)
            logits = cache.binding.get_outputs()[0].numpy()
        cache.advance(length)
        return logits


class Cache:
    """The KV cache of one sequence of at most `capacity` tokens, kept where attention runs.

    On a shared-buffer graph every past/present pair is one preallocated buffer of `capacity`
    positions, bound as both input and output: a step writes only its new positions. Other graphs
    (the dynamo exporter's) return the grown cache as new tensors: those stay in the session's
    memory and are bound as the next step's past, where numpy arrays would carry the whole cache
    out and back at every token (to the GPU and back, in a CUDA session)."""

    def __init__(self, decoder: Decoder, capacity: int) -> None:
        self.capacity, self.length = capacity, 0
        spec = decoder.spec
        self.shared, self.device = spec.share_buffer, decoder.device
        self.binding = decoder.session.io_binding()
        self.binding.bind_output("logits", "cpu")  # bound first: output 0 whatever is rebound later
        self.names = [(past % layer, present % layer) for layer in range(spec.layers)
                      for past, present in ((spec.past_key, spec.present_key), (spec.past_value, spec.present_value))]
        positions = capacity if self.shared else 0
        # the binding does not own the buffers: the cache keeps them alive
        self.values = [ort.OrtValue.ortvalue_from_shape_and_type(
            [1, spec.kv_heads, positions, spec.head_size], decoder.kv_dtype, self.device, 0) for _ in self.names]
        for (past, present), value in zip(self.names, self.values, strict=True):
            self.binding.bind_ortvalue_input(past, value)
            if self.shared:
                self.binding.bind_ortvalue_output(present, value)
            else:
                self.binding.bind_output(present, self.device)
        self.step_logits = ort.OrtValue.ortvalue_from_shape_and_type(
            [1, 1, spec.vocab_size], decoder.logits_dtype, "cpu", 0)

    def rewind(self, length: int) -> None:
        """Keep the first `length` positions only: a rejected draft's are forgotten.

        A shared buffer needs nothing moved: attention reads as many positions as the attention
        mask says (the length), and the next step writes over the stale ones. A grown cache is cut
        (a copy, on the fallback graph only)."""
        if length >= self.length:
            return
        self.length = length
        if self.shared:
            return
        self.values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[:, :, :length]),
                                                       self.device, 0) for value in self.values]
        for (past, _), value in zip(self.names, self.values, strict=True):
            self.binding.bind_ortvalue_input(past, value)

    def advance(self, length: int) -> None:
        """After a run of `length` tokens: the presents it returned become the past of the next."""
        self.length += length
        if self.shared:
            return
        self.values = self.binding.get_outputs()[1:]
        for (past, present), value in zip(self.names, self.values, strict=True):
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_output(present, self.device)
