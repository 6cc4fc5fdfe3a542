"""MatMulNBits accuracy levels: next-token agreement, perplexity and speed, to choose `--float-activations`.

The default model quantized with RTN (blocks of 32) and exported with the builder, int8 lm_head and
embedding (the build defaults); then the same graph at each accuracy policy: everything at level 0
(float activations), everything at 4 (int8 activations), and level 4 with the lm_head at 0. Each is
scored against the fake-quantized torch model (float32) it came from: argmax agreement on the
parity budget and perplexity on held-out speeches; prefill and decode tokens/s are medians of
interleaved runs in this process. For scale, the same torch model run in float16 and bfloat16 is
scored the same way. Writes a markdown table and JSON.

    python scripts/bench_levels.py [--bits 4] [--tokens 2048] [--runs 3] [--out docs/results/levels]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from faq_deploy import checkpoint, models
from faq_deploy.build import PARITY_TOKENS
from faq_deploy.data import eval_tokens, load_corpus
from faq_deploy.export.builder import export_builder
from faq_deploy.export.graph import edited_graph, set_accuracy_levels
from faq_deploy.export.options import ExportOptions
from faq_deploy.export.parity import compare, onnx_logits
from faq_deploy.export.tables import fake_quantize_tables, quantize_tables
from faq_deploy.perplexity import WINDOW, perplexity
from faq_deploy.quant import make_config, quantize
from faq_deploy.quant.scheme import QuantScheme
from faq_runtime.model import Decoder
from faq_runtime.speed import Speed, measure

REPO = Path(__file__).resolve().parents[1]
POLICIES = {
    "level 0 (float activations)": ExportOptions(accuracy_level=0),
    "level 4 (int8 activations)": ExportOptions(accuracy_level=4),
    "level 4, lm_head at 0": ExportOptions(accuracy_level=4, float_activations=("lm_head",)),
}
PROMPT, DECODE = 128, 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, choices=(3, 4), default=4)
    parser.add_argument("--tokens", type=int, default=2048,
                        help="held-out tokens (speeches-eval) for perplexity: at least one 1,024-token window")
    parser.add_argument("--runs", type=int, default=3, help="speed runs per policy, interleaved")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "levels")
    args = parser.parse_args()
    if args.tokens < WINDOW:
        parser.error(f"--tokens {args.tokens} does not fill one {WINDOW}-token perplexity window")
    loaded = models.load(None)
    ids = eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus("speeches-eval"),
                      max(args.tokens, PARITY_TOKENS))
    result = quantize(loaded.model, make_config("rtn", QuantScheme(args.bits, 32)))
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = checkpoint.save(result, loaded.tokenizer, loaded.ref, work / "checkpoint")
        tables = fake_quantize_tables(result.model, ExportOptions())
        base = export_builder(ckpt, work / "base", ExportOptions())
        with edited_graph(base) as graph:
            quantize_tables(graph.graph, *tables)
        decoders = {}
        for name, options in POLICIES.items():
            folder = shutil.copytree(base, work / f"policy{len(decoders)}")
            with edited_graph(folder) as graph:
                set_accuracy_levels(graph.graph, options)
            decoders[name] = decoder = Decoder(folder)
            parity = compare(result.model, decoder, ids[:PARITY_TOKENS])
            rows[name] = {"argmax_agreement": round(parity.argmax_agreement, 4),
                          "perplexity": round(perplexity(onnx_logits(decoder), ids[:args.tokens]).perplexity, 4)}
            print(name, rows[name], flush=True)
        timings: dict[str, list[Speed]] = {name: [] for name in decoders}
        for _ in range(args.runs):
            for name, decoder in decoders.items():
                timings[name].append(measure(decoder, list(range(1000, 1000 + PROMPT)), DECODE))
        for name, runs in timings.items():
            rows[name].update(prefill_tokens_s=round(statistics.median(r.prefill_tokens_s for r in runs), 1),
                              decode_tokens_s=round(statistics.median(r.decode_tokens_s for r in runs), 1))
    with torch.inference_mode():
        expected = result.model(ids[None, :PARITY_TOKENS]).logits[0].argmax(-1)
        for dtype in (torch.float16, torch.bfloat16):
            model = copy.deepcopy(result.model).to(dtype)
            agree = (model(ids[None, :PARITY_TOKENS]).logits[0].argmax(-1) == expected).float().mean()
            rows[f"torch {str(dtype).removeprefix('torch.')}"] = {
                "argmax_agreement": round(float(agree), 4),
                "perplexity": round(perplexity(model, ids[:args.tokens]).perplexity, 4)}
    reference = round(perplexity(result.model, ids[:args.tokens]).perplexity, 4)
    lines = ["| graph | next-token agreement with torch float32 | perplexity | prefill tok/s | decode tok/s |",
             "|---|---|---|---|---|", f"| torch float32 (the reference) | 100% | {reference} | | |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['argmax_agreement']:.2%} | {r['perplexity']} | "
                     f"{r.get('prefill_tokens_s', '')} | {r.get('decode_tokens_s', '')} |")
    text = (f"# MatMulNBits accuracy levels\n\n`python scripts/bench_levels.py --bits {args.bits} --tokens "
            f"{args.tokens} --runs {args.runs}`: the default model, RTN w{args.bits} g32, int8 lm_head and "
            f"embedding, builder graph; agreement on {PARITY_TOKENS} and perplexity on {args.tokens} speeches-eval "
            f"tokens; speed: {PROMPT}-token prompt then {DECODE} steps, median of {args.runs}, onnxruntime's CPU "
            f"provider on {os.cpu_count()} cores.\n\n" + "\n".join(lines) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"bits": args.bits, "tokens": args.tokens, "parity_tokens": PARITY_TOKENS, "runs": args.runs,
         "cores": os.cpu_count(), "reference_perplexity": reference, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
