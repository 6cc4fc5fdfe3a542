"""FAQ's ablation switches and the calibration-size study, on the calibration-domain hold-out.

Like presearch_faq.py, it calibrates on the speeches up to 1989 and scores perplexity on the 1990s,
never on the evaluation text. Two studies, each run appended to ablation.jsonl (skipped when there):

  switches     every §3 switch, one at a time on the shipped FAQ (and on AWQ where it applies),
               at w3 g32 and at w4 g64, where FAQ lost to AWQ on the evaluation grid
  calibration  AWQ and FAQ at w3 g32 over five seeds, with 8, 16, 32 and 64 calibration rows of 512
               tokens (statistics), and with 4, 8, 16 and 32 of the 32 rows scoring the scale
               search: how far a result moves with the calibration sample, per size

Seeds pair runs: one seed is one set of calibration rows for every variant, so a variant's gain
over AWQ is read per seed (mean ± std of the paired differences) as well as from the two means.

    .venv/bin/python scripts/ablate_faq.py --jobs 8                  # both studies
    .venv/bin/python scripts/ablate_faq.py --studies switches --configs w3g32 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench_quality import FAQ_DEPLOY, ResultLog, run_pending
from presearch_faq import CALIB, HELD_OUT

# name → the eval arguments that make it; FAQ means the shipped defaults (pre-searched γ and j).
SWITCHES: dict[str, list[str]] = {
    "rtn": ["--quantize", "rtn"],
    "awq": ["--quantize", "awq"],
    "faq": ["--quantize", "faq"],
    "faq scope=all": ["--quantize", "faq", "--scope", "all"],
    "faq j=3 geometric": ["--quantize", "faq", "--window", "3", "--window-weights", "geometric"],
    "faq last_blocks=virtual": ["--quantize", "faq", "--last-blocks", "virtual"],
    "faq j=3 last_blocks=virtual": ["--quantize", "faq", "--window", "3", "--last-blocks", "virtual"],
    "awq propagate=quant": ["--quantize", "awq", "--propagate", "quant"],
    "faq propagate=quant": ["--quantize", "faq", "--propagate", "quant"],
    "faq propagate=quant future_stats=lookahead": ["--quantize", "faq", "--propagate", "quant",
                                                   "--future-stats", "lookahead"],
    "faq objective=window": ["--quantize", "faq", "--objective", "window"],
    "faq j=2 objective=window": ["--quantize", "faq", "--window", "2", "--objective", "window"],
    "faq no alpha search r=0.25": ["--quantize", "faq", "--no-alpha-search", "--ratio", "0.25"],
    "faq no alpha search r=0.5": ["--quantize", "faq", "--no-alpha-search", "--ratio", "0.5"],
    "faq no alpha search r=0.75": ["--quantize", "faq", "--no-alpha-search", "--ratio", "0.75"],
    "awq zero_point=false": ["--quantize", "awq", "--symmetric"],
    "faq zero_point=false": ["--quantize", "faq", "--symmetric"],
}
BASELINE = {"faq zero_point=false": "awq zero_point=false"}  # else "awq": each variant's AWQ to pair with
SEARCH_ROWS = 8  # AwqConfig's default
# (calibration rows, search rows): the statistics' sample, then the search's
CALIBRATION_SIZES = ((8, 8), (16, 8), (32, 8), (64, 8), (32, 4), (32, 16), (32, 32))
STUDIES = ("switches", "calibration")


def plan(args: argparse.Namespace) -> list[tuple[dict, list[str]]]:
    runs = []
    for config in args.configs if "switches" in args.studies else []:
        bits, group = config[1:].split("g")
        for seed in args.seeds:
            for variant, flags in SWITCHES.items():
                calibrated = variant != "rtn"
                if not calibrated and seed != args.seeds[0]:
                    continue  # RTN sees no calibration: one run per config
                runs.append(({"variant": variant, "config": config, "seed": seed if calibrated else None,
                              "samples": args.samples, "search_rows": SEARCH_ROWS},
                             flags + ["--bits", bits, "--group", group]))
    for samples, search_rows in CALIBRATION_SIZES if "calibration" in args.studies else []:
        for seed in args.calibration_seeds:
            for variant in ("awq", "faq"):
                key = {"variant": variant, "config": "w3g32", "seed": seed, "samples": samples,
                       "search_rows": search_rows}
                if all(key != planned for planned, _ in runs):  # the switches study may have it
                    runs.append((key, SWITCHES[variant] + ["--bits", "3", "--group", "32"]))
    return [(key, [*FAQ_DEPLOY, "eval", "--json", *flags, "--calib", CALIB, "--text", HELD_OUT,
                   "--tokens", str(args.tokens), "--samples", str(key["samples"]), "--seed", str(key["seed"] or 0),
                   *(["--search-rows", str(key["search_rows"])] if key["variant"] != "rtn" else [])])
            for key, flags in runs]


def _cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _paired(rows: list[dict], variant: str, baseline: str) -> list[float]:
    """variant − baseline per seed, over the seeds both have (rows of one config and size)."""
    by = {(r["variant"], r["seed"]): r["perplexity"] for r in rows}
    return [by[variant, s] - by[baseline, s] for v, s in by if v == variant and (baseline, s) in by]


def switches_table(rows: list[dict], configs: list[str], samples: int, seeds: list[int]) -> tuple[str, list[dict]]:
    lines = ["| variant | " + " | ".join(f"{c} perplexity | {c} − AWQ, paired" for c in configs) + " |",
             "|---|" + "---|---|" * len(configs)]
    data = []
    for variant in SWITCHES:
        cells, record = [], {"variant": variant}
        for config in configs:
            same = [r for r in rows if r["config"] == config and r["samples"] == samples
                    and r["search_rows"] == SEARCH_ROWS and r["seed"] in (*seeds, None)]
            ppl = [r["perplexity"] for r in same if r["variant"] == variant]
            delta = _paired(same, variant, BASELINE.get(variant, "awq"))
            cells += [_cell(ppl) if ppl else "-", _cell(delta) if delta and variant != "awq" else "-"]
            record[config] = {"perplexity": ppl, "minus_awq": delta}
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        data.append(record)
    return "\n".join(lines), data


def calibration_table(rows: list[dict], seeds: list[int]) -> tuple[str, list[dict]]:
    lines = ["| calibration rows × 512 | search rows | AWQ | FAQ | FAQ − AWQ, paired | seeds |",
             "|---|---|---|---|---|---|"]
    data = []
    for samples, search_rows in CALIBRATION_SIZES:
        same = [r for r in rows if r["config"] == "w3g32" and r["samples"] == samples
                and r["search_rows"] == search_rows and r["seed"] in seeds]
        ppl = {v: [r["perplexity"] for r in same if r["variant"] == v] for v in ("awq", "faq")}
        if not ppl["awq"] or not ppl["faq"]:
            continue
        delta = _paired(same, "faq", "awq")
        lines.append(f"| {samples} | {search_rows} | {_cell(ppl['awq'])} | {_cell(ppl['faq'])} | {_cell(delta)} "
                     f"| {len(delta)} |")
        data.append({"samples": samples, "search_rows": search_rows, **ppl, "faq_minus_awq": delta})
    return "\n".join(lines), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=STUDIES)
    parser.add_argument("--configs", nargs="+", default=["w3g32", "w4g64"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--calibration-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--samples", type=int, default=32, help="calibration rows of the switches study")
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--jobs", type=int, default=1, help="evals at once")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    log = ResultLog(args.out / "ablation.jsonl")
    run_pending(log, plan(args), args.jobs)

    rows = [r for r in log.rows if r["tokens"] == args.tokens]
    switches, switches_data = switches_table(rows, args.configs, args.samples, args.seeds)
    calibration, calibration_data = calibration_table(rows, args.calibration_seeds)
    (args.out / "ablation.json").write_text(json.dumps(
        {"calibration": CALIB, "held_out": HELD_OUT, "tokens": args.tokens,
         "switches": switches_data, "calibration_sizes": calibration_data}, indent=2))
    (args.out / "ablation.md").write_text(
        f"Held-out perplexity ({HELD_OUT}, {args.tokens} tokens), calibration {CALIB}; mean ± std over seeds.\n\n"
        f"## Switches ({args.samples} calibration rows)\n\n{switches}\n\n"
        f"## Calibration size (w3 g32)\n\n{calibration}\n")
    print(switches, calibration, sep="\n\n")


if __name__ == "__main__":
    main()
