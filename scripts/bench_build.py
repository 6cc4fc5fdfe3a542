"""`faq-deploy build` on the default model: time per stage, bundle size, perplexity before and after.

Each run is one `faq-deploy build --json` in its own process (exporter, method, bits; group 32, the
target's other defaults). The table sets the bundle against the float32 model and the Q4_1 GGUF the
default model ships as, and the float model's perplexity against the bundle's through onnxruntime.
Writes markdown and JSON.

    python scripts/bench_build.py --runs builder:faq:4 builder:faq:3 dynamo:faq:4 [--target jetson]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from faq_deploy.models import DEFAULT_MODEL, fetch_embedded

REPO = Path(__file__).resolve().parents[1]
MB = 1e6


def build(target: str, exporter: str, method: str, bits: int, work: Path) -> dict:
    out = work / f"{exporter}-{method}-w{bits}"
    cmd = [sys.executable, "-m", "faq_deploy", "build", "--target", target, "--exporter", exporter,
           "--method", method, "--bits", str(bits), "--group", "32", "--out", str(out), "--json"]
    print(" ".join(cmd[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"build failed ({done.returncode}): {' '.join(cmd[2:])}")
    return {"exporter": exporter, **json.loads(done.stdout)}


def markdown(rows: list[dict], gguf_bytes: int, command: str) -> str:
    stages = [name.split(" ")[0] for name in rows[0]["seconds"]]  # "quantize (faq)" → "quantize": same order
    lines = [f"# `faq-deploy build` on {rows[0]['model']}", "", f"`{command}`", "",
             f"Float32 model {rows[0]['float_bytes'] / MB:.1f} MB; the Q4_1 GGUF it ships as {gguf_bytes / MB:.1f} MB. "
             f"Perplexity on {rows[0]['eval_tokens']} tokens of speeches-eval (the bundle through onnxruntime at "
             f"{rows[0]['target']}'s accuracy level); agreement: next-token argmax against the quantized torch "
             f"model on 1,024 tokens.", "",
             "| exporter | method | bundle MB | vs float32 | vs GGUF | perplexity float → bundle | agreement | "
             + " | ".join(f"{stage} s" for stage in stages) + " | total s |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(stages) + 1)]
    for r in rows:
        seconds = list(r["seconds"].values())
        lines.append(
            f"| {r['exporter']} | {r['method']} w{r['bits']} g{r['group']} | {r['bundle_bytes'] / MB:.1f} | "
            f"{r['bundle_bytes'] / r['float_bytes']:.2f}× | {r['bundle_bytes'] / gguf_bytes:.2f}× | "
            f"{r['perplexity_float']:.2f} → {r['perplexity_bundle']:.2f} | {r['parity']['argmax_agreement']:.1%} | "
            + " | ".join(f"{s:.0f}" for s in seconds) + f" | {sum(seconds):.0f} |")
    lines += ["", "Stages: " + "; ".join(rows[0]["seconds"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["builder:faq:4", "builder:faq:3", "dynamo:faq:4"],
                        metavar="EXPORTER:METHOD:BITS")
    parser.add_argument("--target", default="jetson")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "build")
    args = parser.parse_args()
    runs = [run.split(":") for run in args.runs]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [build(args.target, exporter, method, int(bits), Path(tmp)) for exporter, method, bits in runs]
    gguf_bytes = fetch_embedded(DEFAULT_MODEL).stat().st_size
    command = "python scripts/bench_build.py --runs " + " ".join(args.runs) + f" --target {args.target}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "gguf_bytes": gguf_bytes,
                                                         "runs": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, gguf_bytes, command))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
