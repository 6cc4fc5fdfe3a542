"""Execution provider choice, proven: a provider counts only once it has run real tokens right.

Listed providers lie: a wheel built without the board's CUDA architecture still lists CUDA, and
onnxruntime quietly falls back to CPU when a provider fails to start. So each candidate in the
preference order opens a session and runs a short prompt twice, in one step and as a prompt then
one token through the KV cache; the first whose logits are finite and agree wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from faq_runtime.model import Decoder

CPU = "CPUExecutionProvider"
# Ordinary text, as a user would send: ids picked at random include special tokens
PROOF_TEXT = "The capital of France is"
# Largest difference allowed between the one-step and the stepped logits, as a share of the largest
# logit. Kernels for one and for several positions round differently: on CPU at accuracy level 4 the
# activations are quantized per call (measured on the default model: 5.4% on an AMD EPYC, 3.8% on an
# Intel Xeon); a lost cache moves them by more than the largest logit (measured: 119% on CPU,
# 110-210% with a CUDA session's cache in the wrong memory).
PROOF_TOLERANCE = 0.25
_SHORT = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
          "cuda": "CUDAExecutionProvider", "cpu": CPU}


def provider_name(name: str) -> str:
    """"CUDA", "cuda" or "CUDAExecutionProvider" → "CUDAExecutionProvider"."""
    return _SHORT.get(name.lower(), name)


class NoProvider(RuntimeError):
    pass


def open_decoder(folder: Path, preference: Sequence[str], threads: int | None, tokenizer: Tokenizer,
                 warn: Callable[[str], None]) -> Decoder:
    """The decoder on the first provider of `preference` (then CPU) that passes the proof; `warn`
    hears why each one before it was passed over."""
    candidates = list(dict.fromkeys([provider_name(p) for p in preference] + [CPU]))
    available = ort.get_available_providers()
    ids = tokenizer.encode(PROOF_TEXT, add_special_tokens=False).ids
    reasons = []
    for name in candidates:
        if name not in available:
            reason = f"{name} is not in this onnxruntime build (it has {', '.join(available)})"
        else:
            reason = _prove(folder, name, threads, ids)
            if isinstance(reason, Decoder):
                return reason
        reasons.append(reason)
        if name != candidates[-1]:
            warn(f"{reason}; trying {candidates[candidates.index(name) + 1]}")
    raise NoProvider("; ".join(reasons))


def _prove(folder: Path, name: str, threads: int | None, ids: list[int]) -> Decoder | str:
    """The decoder when `name` computes finite logits and carries its KV cache, else why not."""
    try:
        decoder = Decoder(folder, providers=[name] if name == CPU else [name, CPU], threads=threads)
        if (active := decoder.session.get_providers()[0]) != name:
            return f"{name} did not start (onnxruntime fell back to {active})"
        # caches with room left over, as generation's are: one filled to capacity is a special case
        whole = decoder.step(ids, decoder.new_cache(2 * len(ids)))
        cache = decoder.new_cache(2 * len(ids))
        decoder.step(ids[:-1], cache)
        stepped = decoder.step(ids[-1:], cache)
    except Exception as exc:  # a provider may fail in many ways: each is a reason to try the next
        first_line = next(iter(str(exc).strip().splitlines()), "")
        return f"{name} failed: {type(exc).__name__}: {first_line[:300]}"
    if not (np.isfinite(whole).all() and np.isfinite(stepped).all()):
        return f"{name} produced non-finite logits"
    drift = float(np.abs(whole - stepped).max())
    if drift > PROOF_TOLERANCE * float(np.abs(whole).max()):
        return (f"{name} does not carry the KV cache from one step to the next (logits differ by up to {drift:.3g}); "
                "export the model for this provider")
    return decoder
