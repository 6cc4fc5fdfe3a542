"""Embedding and lm_head storage: quality vs size, to choose `build --embedding/--lm-head` defaults.

An embedded model quantized with RTN (w4 g32 blocks), then each combination of lm_head and
embedding storage (float, int8, int4: our RTN in blocks of 32, fake-quantized exactly as the export
stores them) scored by perplexity on each text (by default the calibration domain's held-out decade,
which defaults may be chosen on, and the New Testament, which no calibration sees and the evaluation's
Genesis does not overlap); sizes are the bytes both tables take in the exported graph (a tied pair
stored alike is stored once). Then the 8-bit pair at each block size of `--int8-groups`, the choice
behind the int8 scheme's block. Writes a markdown table and JSON.

    python scripts/bench_tables.py [--model KEY] [--tokens 8192] [--texts T ...] [--int8-groups 32 64]
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

from faq_deploy import models
from faq_deploy.data import eval_tokens, load_corpus
from faq_deploy.export.options import TABLE_KINDS, TABLE_SCHEMES, ExportOptions
from faq_deploy.export.tables import fake_quantize_tables
from faq_deploy.models import DEFAULT_MODEL, EMBEDDED
from faq_deploy.perplexity import perplexity
from faq_deploy.quant import compute_device, make_config, quantize
from faq_deploy.quant.packing import stored_bytes
from faq_deploy.quant.quantizer import quantize_weight
from faq_deploy.quant.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]


def table_bytes(weight: torch.Tensor, kind: str, group: int | None = None) -> int:
    if kind == "float":
        return weight.numel() * 4
    scheme = replace(TABLE_SCHEMES[kind], scale_dtype="float16")
    return stored_bytes(*weight.shape, replace(scheme, group_size=group or scheme.group_size))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL.key, choices=list(EMBEDDED), help="an embedded model")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of each text, in 1024-windows")
    parser.add_argument("--texts", nargs="+", default=["speeches:1990-1999", "bible-kjv:40-66"])
    parser.add_argument("--int8-groups", nargs="+", type=int, default=[32, 64],
                        help="block sizes to score the 8-bit pair at (each must divide the hidden width)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "tables")
    args = parser.parse_args()
    loaded = models.load(args.model)
    model = loaded.model.to(compute_device())
    ids = {text: eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus(text), args.tokens) for text in args.texts}
    table = model.get_input_embeddings().weight
    tied = table is model.get_output_embeddings().weight

    def scores(model: torch.nn.Module) -> dict[str, float]:
        return {text: round(perplexity(model, tokens).perplexity, 4) for text, tokens in ids.items()}

    rows = [{"lm_head": "float model", "embedding": "float model", "table_mb": None, "perplexity": scores(model)}]
    quantized = quantize(model, make_config("rtn", QuantScheme(4, 32))).model
    for head in TABLE_KINDS:
        for embedding in TABLE_KINDS:
            variant = copy.deepcopy(quantized)
            fake_quantize_tables(variant, ExportOptions(lm_head=head, embedding=embedding))
            stored = table_bytes(table, head) + (0 if tied and head == embedding else table_bytes(table, embedding))
            rows.append({"lm_head": head, "embedding": embedding, "table_mb": round(stored / 1e6, 1),
                         "perplexity": scores(variant)})
            print(rows[-1], flush=True)
            del variant
    for group in args.int8_groups:  # the int8 pair with the block size given: its codes passed as fixed
        variant = copy.deepcopy(quantized)
        scheme = replace(TABLE_SCHEMES["int8"], group_size=group)
        given = {"lm_head": quantize_weight(variant.get_output_embeddings().weight.detach(), scheme),
                 "model.embed_tokens": quantize_weight(variant.get_input_embeddings().weight.detach(), scheme)}
        fake_quantize_tables(variant, ExportOptions(lm_head="int8", embedding="int8"), given=given)
        stored = table_bytes(table, "int8", group) * (1 if tied else 2)
        rows.append({"lm_head": f"int8 g{group}", "embedding": f"int8 g{group}", "table_mb": round(stored / 1e6, 1),
                     "perplexity": scores(variant)})
        print(rows[-1], flush=True)
        del variant
    base = next(r["perplexity"] for r in rows if r["lm_head"] == r["embedding"] == "float")
    lines = ["| lm_head | embedding | both tables (MB) | " + " | ".join(f"{t} | vs float tables" for t in ids) + " |",
             "|---|---|---|" + "---|---|" * len(ids)]
    for r in rows:
        cells = [f"{r['perplexity'][t]} | " + ("" if r["table_mb"] is None else
                                                f"{r['perplexity'][t] / base[t] - 1:+.2%}") for t in ids]
        lines.append(f"| {r['lm_head']} | {r['embedding']} | {r['table_mb'] or ''} | " + " | ".join(cells) + " |")
    command = (f"python scripts/bench_tables.py --model {args.model} --tokens {args.tokens} --texts {' '.join(ids)} "
               f"--int8-groups {' '.join(map(str, args.int8_groups))}")
    text = (f"# Embedding and lm_head storage: {loaded.ref.name}\n\n`{command}`: RTN w4 g32 blocks for the block "
            f"Linears; perplexity on {args.tokens} tokens of each text ({'tied' if tied else 'untied'} tables, "
            f"vocabulary {table.shape[0]:,} x {table.shape[1]}).\n\n" + "\n".join(lines) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "tokens": args.tokens, "rows": rows},
                                                        indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
