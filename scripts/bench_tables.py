"""Embedding and lm_head storage: quality vs size, to choose `build --embedding/--lm-head` defaults.

The default model quantized with RTN (w4 g32 blocks), then each combination of lm_head and
embedding storage (float, int8, int4: our RTN in blocks of 32, fake-quantized exactly as the export
stores them) scored by perplexity on held-out speeches; sizes are the bytes each table takes in
the exported graph. Writes a markdown table and JSON.

    python scripts/bench_tables.py [--tokens 8192] [--out docs/results/tables]
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

from faq_deploy import models
from faq_deploy.build import fake_quantize_tables
from faq_deploy.data import eval_tokens, load_corpus
from faq_deploy.export import TABLE_KINDS, TABLE_SCHEMES, ExportOptions
from faq_deploy.perplexity import perplexity
from faq_deploy.quant import make_config, quantize
from faq_deploy.quant.packing import stored_bytes
from faq_deploy.quant.scheme import QuantScheme

REPO = Path(__file__).resolve().parents[1]


def table_bytes(weight: torch.Tensor, kind: str) -> int:
    if kind == "float":
        return weight.numel() * 4
    return stored_bytes(*weight.shape, replace(TABLE_SCHEMES[kind], scale_dtype="float16"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens (speeches-eval), in 1024-windows")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "tables")
    args = parser.parse_args()
    loaded = models.load(None)
    ids = eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus("speeches-eval"), args.tokens)
    table = loaded.model.get_input_embeddings().weight
    tied = table is loaded.model.get_output_embeddings().weight  # a float pair is then stored once
    rows = [{"lm_head": "float model", "embedding": "float model", "table_mb": None,
             "perplexity": round(perplexity(loaded.model, ids).perplexity, 4)}]
    quantized = quantize(loaded.model, make_config("rtn", QuantScheme(4, 32))).model
    for head in TABLE_KINDS:
        for embedding in TABLE_KINDS:
            model = copy.deepcopy(quantized)
            fake_quantize_tables(model, ExportOptions(lm_head=head, embedding=embedding))
            stored = table_bytes(table, head) + (0 if tied and head == embedding == "float" else
                                                 table_bytes(table, embedding))
            rows.append({"lm_head": head, "embedding": embedding, "table_mb": round(stored / 1e6, 1),
                         "perplexity": round(perplexity(model, ids).perplexity, 4)})
            print(rows[-1], flush=True)
    base = next(r["perplexity"] for r in rows if r["lm_head"] == r["embedding"] == "float")
    lines = ["| lm_head | embedding | both tables (MB) | perplexity | vs float tables |", "|---|---|---|---|---|"]
    for r in rows:
        change = "" if r["table_mb"] is None else f"{(r['perplexity'] / base - 1):+.2%}"
        lines.append(f"| {r['lm_head']} | {r['embedding']} | {r['table_mb'] or ''} | {r['perplexity']} | {change} |")
    text = (f"# Embedding and lm_head storage\n\n`python scripts/bench_tables.py --tokens {args.tokens}`: the default "
            f"model, RTN w4 g32 blocks for the block Linears; perplexity on {len(ids)} speeches-eval tokens.\n\n"
            + "\n".join(lines) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"tokens": len(ids), "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
