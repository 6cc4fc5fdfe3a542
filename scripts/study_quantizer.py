"""The quantizer's choices on the calibration-domain hold-out: rounding (nearest, GPTQ), the scale
search's cost (coarse ratios, scoring rows) and byte budgets, per method and seed.

Like presearch_faq.py it calibrates on the speeches up to 1989 and never looks at the evaluation text:
each run quantizes the default model in memory (32 calibration rows of 512 tokens, float16 scales as
the bundles store them) and scores perplexity on the 1990s (8,192 tokens, 1,024- and 512-token windows)
and on 4,096 tokens of the New Testament, a domain no calibration sees (the evaluation's Bible tokens lie in
Genesis; rows from before that change read the Bible's first 4,096 tokens and are kept as protocol
`holdout-genesis`, shown beside the new ones with their own column). Runs append to
quantizer.jsonl and are skipped when there; `--jobs N` runs N at once (a GPU machine runs the grid in
minutes, a 2-core CPU in hours).

A variant is METHOD:ROUNDING[:KEY=VALUE...] with method options as `faq-deploy quantize` takes them
and `budget=MB` for a byte budget, e.g. `faq:gptq:coarse=4:search_rows=4` or `faq:gptq:budget=105.5`;
`fp` is the float model. `--protocol evaluation` reports results instead of choosing defaults: it
calibrates on speeches-calib and scores the evaluation speeches (20,480 tokens) and the King James
Bible (10,240); `--model` takes any embedded model.

    .venv/bin/python scripts/study_quantizer.py --variants faq:nearest faq:gptq --bits 4 --seeds 0 1 2
    .venv/bin/python scripts/study_quantizer.py --model qwen2.5-coder-0.5b --protocol evaluation \
        --variants fp rtn:nearest awq:gptq faq:gptq --out docs/results/qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_quality import ResultLog

from faq_deploy.models import DEFAULT_MODEL, EMBEDDED

HELD_OUT = "speeches:1990-1999"
LEGACY = "holdout-genesis"  # rows that carry no protocol: the hold-out when it read Genesis's first tokens
# protocol -> (calibration text, scores as (text, tokens, window))
PROTOCOLS = {
    "holdout": ("speeches:1790-1989", ((HELD_OUT, 8192, 1024), (HELD_OUT, 8192, 512), ("bible-kjv:40-66", 4096, 1024))),
    "evaluation": ("speeches-calib", (("speeches-eval", 20480, 1024), ("bible-kjv", 10240, 1024))),
}


def run(model_key: str, protocol: str, variant: str, bits: int, group: int, seed: int, scales: str) -> dict:
    """Child mode: one quantization and its scores."""
    import torch

    from faq_deploy import checks, models
    from faq_deploy.data import Calibration, eval_tokens, load_corpus
    from faq_deploy.jobs import quantize_loaded
    from faq_deploy.perplexity import perplexity
    from faq_deploy.quant import compute_device, make_config
    from faq_deploy.quant.scheme import QuantScheme

    calibration, scores = PROTOCOLS[protocol]
    loaded = models.load(model_key)
    row: dict = {}
    if variant != "fp":
        method, rounding, *settings = variant.split(":")
        options = {key: _value(value) for key, value in (s.split("=") for s in settings)}
        budget_mb = options.pop("budget", None)
        config = make_config(method, QuantScheme(bits, group, scale_dtype=scales), rounding=rounding, **options)
        start = time.perf_counter()
        result = quantize_loaded(loaded, config, Calibration(calibration, 32, 512, seed),
                                 int(budget_mb * 1e6) if budget_mb else None)
        row = {"seconds": round(time.perf_counter() - start, 1),
               "estimated_mb": round(checks.estimate(loaded.model, result.config, 1024).weights_bytes / 1e6, 3),
               "mix": {}}
        for weight in result.weights.values():
            key = f"w{weight.scheme.bits}g{weight.scheme.group_size}"
            row["mix"][key] = row["mix"].get(key, 0) + weight.codes.numel()
    model = loaded.model.to(compute_device())
    with torch.inference_mode():
        for text, tokens, window in scores:
            ids = eval_tokens(loaded.tokenizer.backend_tokenizer, load_corpus(text), tokens)
            row[f"{text} w{window}"] = round(perplexity(model, ids, window).perplexity, 4)
    return row


def _value(text: str) -> bool | int | float | str:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def summary(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["bits"], row["group"], row["scales"], row.get("protocol", LEGACY)),
                          []).append(row)
    keys = list(dict.fromkeys(key for row in rows for key in row if re.fullmatch(r".+ w\d+", key)))
    lines = ["| variant | config | scales | seeds | " + " | ".join(keys) + " | weights MB | quantize s |",
             "|---|---|---|---|" + "---|" * (len(keys) + 2)]
    for (variant, bits, group, scales, _), runs in sorted(groups.items()):
        cells = []
        for key in keys:
            values = [r[key] for r in runs if key in r]
            cells.append("-" if not values else f"{statistics.mean(values):.3f}" + (
                f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""))
        seconds = [r["seconds"] for r in runs if "seconds" in r]
        lines.append(f"| {variant} | {'-' if variant == 'fp' else f'w{bits} g{group}'} | {scales} | {len(runs)} | "
                     + " | ".join(cells) + f" | {runs[0].get('estimated_mb', '-')} | "
                     f"{statistics.median(seconds) if seconds else '-'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL.key, choices=list(EMBEDDED), help="an embedded model")
    parser.add_argument("--protocol", default="holdout", choices=list(PROTOCOLS),
                        help="holdout: choose defaults (never the evaluation text); evaluation: report results")
    parser.add_argument("--variants", nargs="+", default=["rtn:nearest", "awq:nearest", "faq:nearest", "faq:gptq"])
    parser.add_argument("--bits", nargs="+", type=int, default=[4])
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--scales", choices=("float16", "float32"), default="float16",
                        help="the scales' precision (bundles store float16)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)  # model protocol variant bits group seed scales
    args = parser.parse_args()
    if args.child:
        model_key, protocol, variant, bits, group, seed, scales = args.child
        print(json.dumps(run(model_key, protocol, variant, int(bits), int(group), int(seed), scales)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log = ResultLog(args.out / "quantizer.jsonl")
    # the float model and nearest-rounded RTN see no calibration: one run each
    keys = [{"variant": v, "bits": 16 if v == "fp" else b, "group": 0 if v == "fp" else args.group,
             "scales": args.scales, "seed": s if v != "fp" and not v.startswith("rtn:nearest") else 0,
             # rows of the default model carry no model key (older rows never had it)
             **({"model": args.model} if args.model != DEFAULT_MODEL.key else {}), "protocol": args.protocol}
            for b in args.bits for s in args.seeds for v in args.variants]
    pending = [k for k in dict.fromkeys(json.dumps(k, sort_keys=True) for k in keys) if not log.has(json.loads(k))]

    def measure(key: str) -> dict:
        k = json.loads(key)
        done = subprocess.run([sys.executable, __file__, "--child", args.model, args.protocol, k["variant"],
                               str(k["bits"]), str(k["group"]), str(k["seed"]), k["scales"]],
                              capture_output=True, text=True, check=True)
        return {**k, **json.loads(done.stdout.strip().splitlines()[-1])}

    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(measure, pending):
            log.add(row)
            print(json.dumps(row), flush=True)
    shown = {args.protocol, LEGACY} if args.protocol == "holdout" else {args.protocol}
    text = summary([r for r in log.rows if r.get("model", DEFAULT_MODEL.key) == args.model
                    and r.get("protocol", LEGACY) in shown])
    print(text)
    head, _, tail = (args.out / "quantizer.md").read_text().partition(TABLE_START) if (
        args.out / "quantizer.md").exists() else ("", "", "")
    (args.out / "quantizer.md").write_text(head + TABLE_START + "\n\n" + text + "\n\n" + TABLE_END +
                                           tail.partition(TABLE_END)[2])
    return 0


# quantizer.md keeps its prose; the script rewrites the table between these lines
TABLE_START, TABLE_END = "<!-- table: study_quantizer.py -->", "<!-- end of table -->"


if __name__ == "__main__":
    sys.exit(main())
