"""Quality bench: fp, RTN, AWQ and FAQ in one harness.

Every run is one `faq-deploy eval --json` process (same calibration and evaluation tokens for
every method), so its peak RSS is its own. Runs append to results.jsonl and are skipped when
already there: the full grid is hours of CPU, and an interrupted bench resumes where it stopped.
Quantization and evaluation run on CUDA when the machine has it; `--jobs N` runs N evals at once
there (perplexities are unchanged, but times and memory are then not the small board's).

    .venv/bin/python scripts/bench_quality.py                 # the full grid
    .venv/bin/python scripts/bench_quality.py --configs w3g32 --seeds 0 --domains in-domain
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from faq_deploy.quant.faq import FaqConfig

# domain → calibration text; every domain is evaluated on speeches-eval (2000 onward).
DOMAINS = {"in-domain": "speeches-calib", "narrow": "speeches:1930-1939"}
METHODS = ("fp", "rtn", "awq", "faq")
CONFIGS = ("w4g32", "w4g64", "w3g32", "w3g64")
FAQ_DEPLOY = [sys.executable, "-m", "faq_deploy"]


class ResultLog:
    """Append-only JSONL of finished runs: a long bench resumes where it stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def has(self, key: dict) -> bool:
        return any({k: row.get(k) for k in key} == key for row in self.rows)

    def add(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)


def run_args(method: str, config: str, calib: str, seed: int, args: argparse.Namespace) -> list[str]:
    cmd = [*FAQ_DEPLOY, "eval", "--json", "--text", "speeches-eval", "--tokens", str(args.tokens)]
    if method != "fp":
        bits, group = config[1:].split("g")  # e.g. w3g32
        cmd += ["--quantize", method, "--bits", bits, "--group", group]
    if method in ("awq", "faq"):
        cmd += ["--calib", calib, "--seed", str(seed), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    if method == "faq":
        cmd += ["--gamma", str(args.gamma), "--window", str(args.window)]
    return cmd


def measure(cmd: list[str], threads: int | None = None) -> dict:
    """Run one eval; its JSON plus wall time and the process's own peak RSS."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return {**json.loads(out), "wall_seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def run_pending(log: ResultLog, runs: Iterable[tuple[dict, list[str]]], jobs: int) -> None:
    """Measure every (key, command) not yet in `log`, `jobs` at a time, logging each as it ends."""
    pending = [(key, cmd) for key, cmd in runs if not log.has(key)]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(measure, cmd, threads): key for key, cmd in pending}
        for future in as_completed(futures):
            row = {**future.result(), **futures[future]}  # the key wins: eval's "window" is its own
            print(" ".join(f"{k}={v}" for k, v in futures[future].items() if k != "settings"),
                  f"ppl={row['perplexity']:.4f} quantize_s={row['quant_seconds']}", flush=True)
            log.add(row)


def plan(args: argparse.Namespace) -> list[dict]:
    runs = []
    # Methods innermost, so that AWQ and FAQ runs alternate and drifts in machine load hit both.
    for domain in args.domains:
        for config in args.configs:
            for seed in args.seeds:
                for method in args.methods:
                    # fp and RTN see no calibration: one run per config serves every seed and domain
                    calibrated = method in ("awq", "faq")
                    key = {"domain": domain if calibrated else "any", "config": config if method != "fp" else "fp",
                           "method": method, "seed": seed if calibrated else None}
                    if key not in runs:
                        runs.append(key)
    return runs


def summarize(results: list[dict]) -> list[dict]:
    rows: dict[tuple, list[dict]] = {}
    for r in results:
        rows.setdefault((r["domain"], r["config"], r["method"]), []).append(r)
    table = []
    for (domain, config, method), runs in sorted(rows.items()):
        ppl = [r["perplexity"] for r in runs]
        quant = [r["quant_seconds"] for r in runs if r["quant_seconds"] is not None]
        table.append({"domain": domain, "config": config, "method": method, "seeds": len(runs),
                      "ppl_mean": round(statistics.mean(ppl), 4),
                      "ppl_std": round(statistics.stdev(ppl), 4) if len(ppl) > 1 else 0.0,
                      "quant_seconds": round(statistics.median(quant), 1) if quant else None,
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)})
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| domain | config | method | seeds | perplexity (mean ± std) | quantize s (median) | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['domain']} | {r['config']} | {r['method']} | {r['seeds']} | "
                     f"{r['ppl_mean']:.4f} ± {r['ppl_std']:.4f} | {r['quant_seconds'] or '-'} | {r['peak_rss_mb']} |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> None:
    """Perplexity per config, one panel per calibration domain, fp as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({r["domain"] for r in table} - {"any"}) or ["any"]
    fp = next((r["ppl_mean"] for r in table if r["method"] == "fp"), None)
    configs = [c for c in CONFIGS if any(r["config"] == c for r in table)]
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        for offset, method in enumerate(("rtn", "awq", "faq")):
            rows = {r["config"]: r for r in table if r["method"] == method and r["domain"] in (domain, "any")}
            xs = [i + (offset - 1) * 0.27 for i, c in enumerate(configs) if c in rows]
            ys = [rows[c]["ppl_mean"] for c in configs if c in rows]
            errs = [rows[c]["ppl_std"] for c in configs if c in rows]
            ax.bar(xs, ys, width=0.27, yerr=errs, capsize=3, label=method)
        if fp:
            ax.axhline(fp, linestyle="--", color="black", label="fp")
        ax.set_xticks(range(len(configs)), configs)
        ax.set_title(f"calibration: {domain}")
        ax.set_ylabel("perplexity (speeches-eval)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--jobs", type=int, default=1, help="evals at once (keep 1 for times and memory)")
    parser.add_argument("--gamma", type=float, default=FaqConfig.gamma, help="FAQ's gamma (default: shipped)")
    parser.add_argument("--window", type=int, default=FaqConfig.window, help="FAQ's window (default: shipped)")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    log = ResultLog(args.out / "results.jsonl")
    settings = {"samples": args.samples, "seq_len": args.seq_len, "tokens": args.tokens,
                "faq": {"gamma": args.gamma, "window": args.window}}
    run_pending(log, (({**key, "settings": settings},
                       run_args(key["method"], key["config"], DOMAINS.get(key["domain"], "speeches-calib"),
                                key["seed"] or 0, args)) for key in plan(args)), args.jobs)

    table = summarize([r for r in log.rows if r["settings"] == settings])
    (args.out / "quality.json").write_text(json.dumps({"settings": settings, "rows": table}, indent=2))
    (args.out / "quality.md").write_text(markdown(table) + "\n")
    plot(table, args.out / "quality.png")
    print(markdown(table))


if __name__ == "__main__":
    main()
