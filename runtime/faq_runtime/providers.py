"""Execution provider choice, proven: a provider counts only once it has run a real token.

Listed providers lie (a wheel built without the board's CUDA architecture still lists CUDA, and
onnxruntime quietly falls back to CPU when a provider fails to start), so each candidate in the
preference order opens a session and computes one token's logits; the first that does wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from faq_runtime.model import Decoder

CPU = "CPUExecutionProvider"
_SHORT = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
          "cuda": "CUDAExecutionProvider", "cpu": CPU}


def provider_name(name: str) -> str:
    """"CUDA", "cuda" or "CUDAExecutionProvider" → "CUDAExecutionProvider"."""
    return _SHORT.get(name.lower(), name)


class NoProvider(RuntimeError):
    pass


def open_decoder(folder: Path, preference: Sequence[str], threads: int | None,
                 warn: Callable[[str], None]) -> Decoder:
    """The decoder on the first provider of `preference` (then CPU) that runs one token; `warn`
    hears why each one before it was passed over."""
    candidates = list(dict.fromkeys([provider_name(p) for p in preference] + [CPU]))
    available = ort.get_available_providers()
    reasons = []
    for name in candidates:
        if name not in available:
            reason = f"{name} is not in this onnxruntime build (it has {', '.join(available)})"
        else:
            reason = _prove(folder, name, threads)
            if isinstance(reason, Decoder):
                return reason
        reasons.append(reason)
        if name != candidates[-1]:
            warn(f"{reason}; trying {candidates[candidates.index(name) + 1]}")
    raise NoProvider("; ".join(reasons))


def _prove(folder: Path, name: str, threads: int | None) -> Decoder | str:
    """The decoder when `name` runs one token with finite logits, else why not."""
    try:
        decoder = Decoder(folder, providers=[name] if name == CPU else [name, CPU], threads=threads)
        if (active := decoder.session.get_providers()[0]) != name:
            return f"{name} did not start (onnxruntime fell back to {active})"
        logits = decoder.step([0], decoder.new_cache(1))
    except Exception as exc:  # a provider may fail in many ways: each is a reason to try the next
        first_line = next(iter(str(exc).strip().splitlines()), "")
        return f"{name} failed: {type(exc).__name__}: {first_line[:300]}"
    if not np.isfinite(logits).all():
        return f"{name} produced non-finite logits"
    return decoder
