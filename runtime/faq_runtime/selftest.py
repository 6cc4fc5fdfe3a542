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

from faq_runtime.load import LoadOptions, load

PROMPT = "The capital of France is"


def selftest(path: Path, tokens: int = 8, options: LoadOptions = LoadOptions()) -> dict[str, Any]:
    """Facts of one run: load time (verify, device checks, provider proof), `tokens` greedy steps
    (even past an end token) and their rate, the provider that won and the process's peak RSS.
    Raises when any step fails."""
    start = time.perf_counter()
    generator = load(Path(path), options)
    loaded = time.perf_counter()
    decoder = generator.decoder
    ids = generator.encode(PROMPT)
    cache = decoder.new_cache(len(ids) + tokens)
    out = []
    for _ in range(tokens):
        logits = decoder.step(ids, cache)
        if not np.isfinite(logits).all():
            raise ValueError(f"the model produced non-finite logits at step {len(out)}")
        out.append(int(logits.argmax()))
        ids = [out[-1]]
    done = time.perf_counter()
    return {
        "ok": True,
        "model": str(decoder.folder),
        "providers": decoder.session.get_providers(),
        "context": generator.context,
        "load_s": round(loaded - start, 3),
        "tokens": len(out),
        "tokens_per_s": round(len(out) / (done - loaded), 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "text": generator.tokenizer.decode(out),
    }
