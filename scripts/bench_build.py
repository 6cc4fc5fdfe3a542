"""`faq-deploy build` on an embedded model: time and peak memory per stage, bundle size, perplexity
before and after.

Each run is one `faq-deploy build --json` in its own process (exporter, method, bits, then any build
options as NAME=VALUE; group 32, the target's other defaults). The table sets the bundle against the
float32 model and the GGUF the model ships as, and the float model's perplexity against the bundle's
through onnxruntime. `--repeat N` runs the list N times in turn, so that two recipes compared on a
shared machine see the same drift. Writes markdown and JSON.

    python scripts/bench_build.py --runs builder:faq:4 builder:faq:3 dynamo:faq:4 [--target jetson] [--model KEY]
    python scripts/bench_build.py --runs builder:faq:4:rounding=nearest:coarse=1:search-rows=8 builder:faq:4 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from faq_deploy.models import DEFAULT_MODEL, EMBEDDED, embedded, fetch_embedded

REPO = Path(__file__).resolve().parents[1]
MB = 1e6


def build(target: str, model: str, run: str, work: Path) -> dict:
    exporter, method, bits, *options = run.split(":")
    out = work / run.replace(":", "-")
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = [part for option in options for part in (f"--{option.split('=')[0]}", option.split("=")[1])]
    cmd = [sys.executable, "-m", "faq_deploy", "build", "--target", target, "--model", model, "--exporter", exporter,
           "--method", method, "--bits", bits, "--group", "32", *flags, "--out", str(out), "--json"]
    print(" ".join(cmd[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"build failed ({done.returncode}): {' '.join(cmd[2:])}")
    return {"exporter": exporter, "run": run, **json.loads(done.stdout)}


def markdown(rows: list[dict], gguf_bytes: int, command: str) -> str:
    stages = [name.split(" ")[0] for name in rows[0]["seconds"]]  # "quantize (faq)" → "quantize": same order
    lines = [f"# `faq-deploy build` on {rows[0]['model']}", "", f"`{command}`", "",
             f"Float32 model {rows[0]['float_bytes'] / MB:.1f} MB; the GGUF it ships as {gguf_bytes / MB:.1f} MB. "
             f"Perplexity on {rows[0]['eval_tokens']} tokens of speeches-eval (the bundle through onnxruntime at "
             f"{rows[0]['target']}'s accuracy level); agreement: next-token argmax against the quantized torch "
             f"model on 1,024 tokens. Peak: the build process's resident memory at its highest stage, plus the "
             f"builder subprocess's peak when it ran in that stage.", "",
             "| run | method | bundle MB | vs float32 | vs GGUF | perplexity float → bundle | agreement | "
             + " | ".join(f"{stage} s" for stage in stages) + " | total s | peak GB (stage) |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(stages) + 2)]
    for r in rows:
        seconds = list(r["seconds"].values())
        lines.append(
            f"| {r['run']} | {r['method']} w{r['bits']} g{r['group']} | {r['bundle_bytes'] / MB:.1f} | "
            f"{r['bundle_bytes'] / r['float_bytes']:.2f}× | {r['bundle_bytes'] / gguf_bytes:.2f}× | "
            f"{r['perplexity_float']:.2f} → {r['perplexity_bundle']:.2f} | {r['parity']['argmax_agreement']:.1%} | "
            + " | ".join(f"{s:.0f}" for s in seconds) + f" | {sum(seconds):.0f} | {peak(r)} |")
    lines += ["", "Stages: " + "; ".join(rows[0]["seconds"]) + "."]
    return "\n".join(lines) + "\n"


def peak(row: dict) -> str:
    stage, rss = max(row["peak_rss_bytes"].items(), key=lambda item: item[1])
    return f"{rss / 1e9:.2f} ({stage.split(' ')[0]})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["builder:faq:4", "builder:faq:3", "dynamo:faq:4"],
                        metavar="EXPORTER:METHOD:BITS")
    parser.add_argument("--target", default="jetson")
    parser.add_argument("--model", default=DEFAULT_MODEL.key, choices=list(EMBEDDED), help="an embedded model")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "build")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep each run's bundle in DIR/<run> (default: built in a temporary folder and removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        rows = [build(args.target, args.model, run, work) for _ in range(args.repeat) for run in args.runs]
    gguf_bytes = fetch_embedded(embedded(args.model)).stat().st_size
    command = ("python scripts/bench_build.py --runs " + " ".join(args.runs) + f" --target {args.target}"
               + (f" --model {args.model}" if args.model != DEFAULT_MODEL.key else "")
               + (f" --repeat {args.repeat}" if args.repeat > 1 else "")
               + (f" --out {args.out}" if args.out != REPO / "docs" / "results" / "build" else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "gguf_bytes": gguf_bytes,
                                                         "runs": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, gguf_bytes, command))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
