"""Pre-search FAQ's (gamma, window) once, never on the evaluation text.

Calibrates on the speeches up to 1989 and scores perplexity on the 1990s, a held-out slice of the
calibration corpus (speeches-calib ends in 1999; speeches-eval starts in 2000). Runs append to
presearch.jsonl and are skipped when present, so the surface can be filled over several sittings.

    .venv/bin/python scripts/presearch_faq.py                    # the whole surface, seeds 0 and 1
    .venv/bin/python scripts/presearch_faq.py --gammas 0 0.5 --windows 3 --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench_quality import FAQ_DEPLOY, ResultLog, run_pending

CALIB, HELD_OUT = "speeches:1790-1989", "speeches:1990-1999"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gammas", nargs="+", type=float, default=[0, 0.1, 0.25, 0.5, 0.75, 1])
    parser.add_argument("--windows", nargs="+", type=int, default=[1, 2, 3, 4, 6])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--jobs", type=int, default=1, help="evals at once")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    log = ResultLog(args.out / "presearch.jsonl")
    runs = []
    for seed in args.seeds:
        for window in args.windows:
            for gamma in args.gammas:
                if gamma == 0 and window != args.windows[0]:
                    continue  # gamma = 0 is AWQ whatever the window: one run per seed
                key = {"gamma": gamma, "window": window, "seed": seed, "bits": args.bits, "group": args.group,
                       "tokens": args.tokens}
                runs.append((key, [*FAQ_DEPLOY, "eval", "--json", "--quantize", "faq", "--bits", str(args.bits),
                                   "--group", str(args.group), "--gamma", str(gamma), "--window", str(window),
                                   "--calib", CALIB, "--seed", str(seed), "--text", HELD_OUT,
                                   "--tokens", str(args.tokens)]))
    run_pending(log, runs, args.jobs)

    surface: dict[tuple[float, int], list[float]] = {}
    for r in log.rows:
        window = args.windows[0] if r["gamma"] == 0 else r["window"]
        surface.setdefault((r["gamma"], window), []).append(r["perplexity"])
    rows = sorted((statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, g, w, len(v))
                  for (g, w), v in surface.items())
    lines = ["| gamma | window | seeds | held-out perplexity (mean ± std) |", "|---|---|---|---|"]
    lines += [f"| {g} | {w if g else 'any (AWQ)'} | {n} | {m:.4f} ± {sd:.4f} |" for m, sd, g, w, n in rows]
    (args.out / "presearch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if rows:
        print(f"best: gamma={rows[0][2]} window={rows[0][3]}")


if __name__ == "__main__":
    main()
