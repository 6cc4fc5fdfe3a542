"""`faq-run selftest`: can this device run this bundle? Verify, load, infer, measure.

The deployer runs it on a freshly received bundle before switching to it, and again through the
`current` link as the health check; its exit code is the verdict.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from faq_runtime.generate import Generator, model_folder

PROMPT = "The capital of France is"


def selftest(path: Path, tokens: int = 8, threads: int | None = None, hashes: bool = True) -> dict[str, Any]:
    """Facts of one run: verify and load time, `tokens` greedy steps (even past an end token) and
    their rate, the session's providers and the process's peak RSS. Raises when any step fails.
    `hashes=False` checks the manifest, paths and sizes but skips the sha256 pass (for a caller that
    has just hashed the files itself)."""
    start = time.perf_counter()
    folder = model_folder(Path(path), hashes=hashes)
    verified = time.perf_counter()
    generator = Generator(folder, threads=threads)
    loaded = time.perf_counter()
    decoder = generator.decoder
    cache = decoder.empty_cache()
    ids = np.asarray([generator.tokenizer.encode(PROMPT).ids], np.int64)
    out = []
    for _ in range(tokens):
        logits, cache = decoder.forward(ids, cache)
        if not np.isfinite(logits[0, -1]).all():
            raise ValueError(f"the model produced non-finite logits at step {len(out)}")
        out.append(int(logits[0, -1].argmax()))
        ids = np.asarray([[out[-1]]], np.int64)
    done = time.perf_counter()
    return {
        "ok": True,
        "model": str(folder),
        "providers": decoder.session.get_providers(),
        "verify_s": round(verified - start, 3),
        "load_s": round(loaded - verified, 3),
        "tokens": len(out),
        "tokens_per_s": round(len(out) / (done - loaded), 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "text": generator.tokenizer.decode(out),
    }
