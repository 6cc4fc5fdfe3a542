"""A CUDA bundle (`faq-deploy build --provider cuda`) on a GPU machine: next-token agreement and
perplexity against the fake-quantized torch model, and speed, on the CUDA and the CPU provider.

Two halves, so the GPU machine needs only the runtime and onnxruntime-gpu:

    python scripts/cuda_check.py reference BUNDLE --out ref.json        # toolchain host (RTN bundles)
    python scripts/cuda_check.py check BUNDLE ref.json --out docs/results/cuda   # GPU machine

`reference` rebuilds the bundle's torch model from its manifest (RTN codes and int8/int4 tables
are deterministic) and stores, for 1,024 held-out tokens, its argmax, that of the same model in
float16, and its perplexity. `check` runs faq_runtime on each provider over the same tokens
(agreement, perplexity), then times a 1,024-token prefill and 64 greedy steps after a 128-token
prompt (median of 3), and writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import numpy as np

TOKENS, PROMPT, DECODE, RUNS = 1024, 128, 64, 3


def reference(bundle: Path, out: Path) -> None:
    import torch

    from faq_deploy import models
    from faq_deploy.build import EVAL_TEXT
    from faq_deploy.data import eval_tokens, load_corpus
    from faq_deploy.export.options import ExportOptions
    from faq_deploy.export.tables import fake_quantize_tables
    from faq_deploy.quant import make_config, quantize
    from faq_deploy.quant.scheme import QuantScheme

    manifest = json.loads((bundle / "manifest.json").read_text())
    quantization, export = manifest["quantization"], manifest["export"]
    if quantization["method"] != "rtn":
        raise SystemExit(f"{bundle} is a {quantization['method']} bundle; build one with --method rtn")
    loaded = models.load(None)
    scheme = QuantScheme(**quantization["scheme"])
    model = quantize(loaded.model, make_config("rtn", scheme)).model
    fake_quantize_tables(model, ExportOptions(lm_head=export["lm_head"], embedding=export["embedding"]), scheme)
    ids = eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus(EVAL_TEXT), TOKENS)
    with torch.inference_mode():
        logits = model(ids[None]).logits[0].double()
        half = model.half()(ids[None]).logits[0].argmax(-1)
    record = {"ids": ids.tolist(), "argmax": logits.argmax(-1).tolist(), "float16_argmax": half.tolist(),
              "perplexity": _perplexity(logits.numpy(), ids.tolist())}
    out.write_text(json.dumps(record))


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    logits = logits[:-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return float(np.exp(np.mean(lse - logits[np.arange(len(logits)), ids[1:]])))


def check(bundle: Path, ref_file: Path, out: Path) -> None:
    import onnxruntime as ort

    from faq_runtime.load import LoadOptions, load
    from faq_runtime.speed import measure

    ref = json.loads(ref_file.read_text())
    ids = ref["ids"]
    rows = {}
    for name, providers in (("cuda", ["cuda", "cpu"]), ("cpu", ["cpu"])):
        warnings: list[str] = []
        generator = load(bundle, LoadOptions(providers=providers, check_device=False), warnings.append)
        decoder = generator.decoder
        logits = decoder.logits(ids)
        top = logits.argmax(-1)
        # prefill: the whole parity text; decode: after a short prompt, as a chat turn runs
        prefills = [measure(decoder, ids, 0).prefill_tokens_s for _ in range(RUNS)]
        decodes = [measure(decoder, ids[:PROMPT], DECODE).decode_tokens_s for _ in range(RUNS)]
        prompt = generator.encode("My fellow citizens,")
        rows[name] = {
            "providers": decoder.session.get_providers(), "cache_on": str(decoder.device), "warnings": warnings,
            "agreement": float((top == np.array(ref["argmax"])).mean()),
            "agreement_float16_torch": float((top == np.array(ref["float16_argmax"])).mean()),
            "perplexity": _perplexity(logits, ids),
            "prefill_tokens_s": statistics.median(prefills), "decode_tokens_s": statistics.median(decodes),
            "greedy": generator.tokenizer.decode(list(generator.tokens(prompt, 24)))}
        print(name, json.dumps(rows[name]), flush=True)
    lines = ["| provider | agreement with torch float32 | perplexity (torch: {:.4f}) | prefill {} tok/s | "
             "decode tok/s |".format(ref["perplexity"], TOKENS), "|---|---|---|---|---|"]
    lines += [f"| {', '.join(r['providers'])} | {r['agreement']:.2%} | {r['perplexity']:.4f} | "
              f"{r['prefill_tokens_s']:.0f} | {r['decode_tokens_s']:.1f} |" for r in rows.values()]
    text = (f"# A CUDA bundle on the CUDA and CPU providers\n\nonnxruntime {ort.__version__}, {os.cpu_count()} "
            f"CPU cores; {TOKENS} speeches-eval tokens; speed: median of {RUNS}.\n\n" + "\n".join(lines) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"onnxruntime": ort.__version__, "cores": os.cpu_count(), "tokens": TOKENS,
         "torch_perplexity": ref["perplexity"], "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    ref = sub.add_parser("reference", help="the torch reference of an RTN bundle (toolchain host)")
    ref.add_argument("bundle", type=Path)
    ref.add_argument("--out", type=Path, required=True)
    run = sub.add_parser("check", help="the bundle on the CUDA and CPU providers (GPU machine)")
    run.add_argument("bundle", type=Path)
    run.add_argument("reference", type=Path)
    run.add_argument("--out", type=Path, required=True, help="JSON and markdown path without suffix")
    args = parser.parse_args()
    if args.step == "reference":
        reference(args.bundle, args.out)
    else:
        check(args.bundle, args.reference, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
