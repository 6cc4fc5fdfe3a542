"""Thread scaling: prefill and decode tokens/s of faq-runtime, onnxruntime-genai and llama.cpp at each
intra-op thread count, on one host, in one run.

For each count every engine gets a fresh worker process with that many threads (bench_runtime's
workers) and the measurements interleave as in bench_runtime; the host's read bandwidth is measured
at the same count. The table shows where each engine stops gaining, which is what a board's default
thread count should be taken from. Counts above the host's CPUs are skipped. llama.cpp runs where
llama-cpp-python imports: after scripts/setup_llama_cpp.py, with LLAMA_CPP_LIB_PATH set to the
libraries it prints.

    python scripts/bench_threads.py MODEL_OR_BUNDLE [--threads 1 2 4 6 8] [--runs 3] [--out docs/results/threads]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from bench_runtime import (
    ENGINES,
    REPO,
    Worker,
    cpu_name,
    importable,
    measure,
    model_dir,
    read_bandwidth_gbs,
    write_results,
)

COLUMNS = (("decode_tokens_s", "decode"), ("prefill_1024_tokens_s", "prefill 1024"))


def sweep(model: Path, gguf: Path, counts: list[int], runs: int) -> list[dict[str, object]]:
    """One row per thread count: each engine's medians and the host's read bandwidth."""
    engines = [e for e in ENGINES if e != "llama.cpp" or importable("llama_cpp")]
    rows = []
    for threads in counts:
        print(f"{threads} threads", file=sys.stderr)
        workers = [Worker(engine, model, gguf, threads) for engine in engines]
        try:
            results, _ = measure(workers, runs)
        finally:
            for worker in workers:
                worker.close()
        rows.append({"threads": threads, "read_bandwidth_gbs": read_bandwidth_gbs(threads),
                     "results": {r["engine"]: r for r in results}})
    return rows


def table(rows: list[dict]) -> str:
    engines = list(rows[0]["results"])
    head = [f"{label} {engine}" for _, label in COLUMNS for engine in engines]
    lines = ["| threads | read GB/s | " + " | ".join(head) + " |", "|---" * (2 + len(head)) + "|"]
    for row in rows:
        cells = [str(row["results"][engine][key]) for key, _ in COLUMNS for engine in engines]
        lines.append(f"| {row['threads']} | {row['read_bandwidth_gbs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a bundle or an exported model folder")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the embedded model's)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "threads")
    args = parser.parse_args()
    if args.gguf is None:
        from faq_deploy.models import fetch_embedded

        args.gguf = fetch_embedded()
    cpus = os.cpu_count() or 1
    counts = [t for t in args.threads if t <= cpus]
    if skipped := sorted(set(args.threads) - set(counts)):
        print(f"skipped {skipped}: this host has {cpus} CPUs", file=sys.stderr)
    rows = sweep(args.model, args.gguf, counts, args.runs)
    host = {"machine": platform.machine(), "processor": cpu_name(), "cpus": cpus}
    report = {"host": host, "model": str(model_dir(args.model)), "gguf": args.gguf.name, "runs": args.runs,
              "rows": rows}
    text = (f"# Thread scaling\n\n`python scripts/bench_threads.py {args.model} --threads "
            f"{' '.join(map(str, counts))} --runs {args.runs}` on {host['processor']} ({cpus} CPUs); tokens/s, "
            f"median of {args.runs} interleaved repetitions after a warm-up.\n\n{table(rows)}\n")
    write_results(args.out, report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
