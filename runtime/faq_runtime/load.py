"""Opening a bundle on this device: verify it, check the device can run it and has the memory for
the context asked, choose and prove an execution provider, and hand back a ready Generator."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from faq_runtime import compat, probe
from faq_runtime.bundle import MANIFEST, MODEL_DIR, BundleError, verify
from faq_runtime.fit import MemoryFit
from faq_runtime.generate import Generator
from faq_runtime.lookup import PromptLookup
from faq_runtime.model import GENAI_CONFIG, DecoderSpec
from faq_runtime.providers import NoProvider, open_decoder
from faq_runtime.template import ChatTemplate


class CannotRun(BundleError):
    """An intact bundle this device cannot run: wrong board, too little memory, no provider works."""

    exit_code = 13


@dataclass(frozen=True)
class LoadOptions:
    providers: Sequence[str] | None = None  # preference order; None: the bundle target's (CPU for a bare folder)
    context: int | None = None              # None: the bundle's configured context, else the model's
    threads: int | None = None
    hashes: bool = True                     # False: sizes and paths only (the deployer has just hashed)
    check_device: bool = True               # the bundle's target requirements and the memory fit
    speculate: bool = True                  # draft tokens by prompt lookup, check them in one forward


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load(path: Path, options: LoadOptions = LoadOptions(), warn: Callable[[str], None] = _warn) -> Generator:
    path = Path(path)
    manifest: dict = {}
    if (path / MANIFEST).exists():
        bundle = verify(path, hashes=options.hashes)
        folder, manifest = bundle.model_dir, bundle.manifest
    elif (path / GENAI_CONFIG).exists():
        folder = path
    else:
        raise BundleError(f"{path} is neither a bundle (no {MANIFEST}) nor a model folder (no {GENAI_CONFIG})",
                          f"pass the folder `faq-deploy build` wrote, or its {MODEL_DIR}/")
    spec = DecoderSpec.read(folder)
    context = options.context or manifest.get("memory", {}).get("context") or spec.context_length
    if not 0 < context <= spec.context_length:
        raise CannotRun(f"context {context} is outside what the model supports (1 to {spec.context_length})",
                        f"pass --context {spec.context_length} or less")
    target = manifest.get("target", {})
    if options.check_device:
        facts = probe.probe(os.environ.get(probe.ROOT_ENV, "/"))
        _check_device(target.get("compatibility", {}), facts, target.get("name", "its target"))
        _check_memory(folder, spec, context, facts)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    preference = options.providers or target.get("compatibility", {}).get("providers") or ["CPU"]
    try:
        decoder = open_decoder(folder, preference, options.threads, tokenizer, warn)
    except NoProvider as exc:
        raise CannotRun(f"no execution provider could run {folder}: {exc}",
                        "check the model files and the onnxruntime install (`faq-run info`)") from None
    genai = json.loads((folder / GENAI_CONFIG).read_text())["model"]
    eos = genai.get("eos_token_id")
    stop_ids = set(eos if isinstance(eos, list) else [eos])
    return Generator(decoder, tokenizer, stop_ids, ChatTemplate.read(folder), context,
                     PromptLookup() if options.speculate else None)


def _check_device(needs: dict, facts: dict, target: str) -> None:
    # Memory is checked against what is available now, at the context asked, below; the manifest's
    # figure is the build's estimate against the board's total.
    problems = compat.check({k: v for k, v in needs.items() if k != "memory_bytes"}, facts)
    if problems:
        raise CannotRun(f"this device cannot run a bundle built for {target}: " + "; ".join(map(str, problems)),
                        "build the bundle for this device's target (`faq-deploy targets detect`), or pass "
                        "--no-device-check to try anyway")


def _check_memory(folder: Path, spec: DecoderSpec, context: int, facts: dict) -> None:
    available = facts.get("memory", {}).get("available_bytes")
    if available is None:  # not Linux: nothing to measure against
        return
    weights = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    # float32 KV, the CPU graph's: an fp16 graph needs half, so this errs on the safe side
    fit = MemoryFit(weights, spec.kv_bytes_per_token(4), context, available)
    if fit.fits:
        return
    largest = fit.largest_context
    raise CannotRun(f"context {context} does not fit: {fit.explain()}",
                    f"the largest context that fits is {largest} tokens: pass --context {largest}" if largest
                    else "free memory, or use a smaller model or fewer bits")
