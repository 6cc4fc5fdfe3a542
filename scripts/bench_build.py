"""`faq-deploy build` on an embedded model: time and peak memory per stage, bundle size, perplexity
before and after.

Each run is one `faq-deploy build --json` in its own process (exporter, method, bits, then any build
options as NAME=VALUE; group 32, the target's other defaults). The table sets the bundle against the
float32 model and the GGUF the model ships as, and the float model's perplexity against the bundle's
through onnxruntime. `--repeat N` runs the list N times in turn, so that two recipes compared on a
shared machine see the same drift. A run written `checkout:…` builds with the code of `--checkout`
(another worktree of this repository, e.g. the commit a speed-up is measured against) in this
environment, so that old and new code are timed in one run. Writes markdown and JSON.

    python scripts/bench_build.py --runs builder:faq:4 builder:faq:3 dynamo:faq:4 [--target jetson] [--model KEY]
    python scripts/bench_build.py --runs builder:faq:4:rounding=nearest:coarse=1:search-rows=8 builder:faq:4 --repeat 2
    git worktree add /tmp/old REV
    python scripts/bench_build.py --runs checkout:builder:faq:4 builder:faq:4 --checkout /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from faq_deploy.models import DEFAULT_MODEL, EMBEDDED, embedded, fetch_embedded

REPO = Path(__file__).resolve().parents[1]
MB = 1e6


def install_checkout(checkout: Path, site: Path) -> None:
    """The checkout's two packages, installed (not editable: its targets ship as package data) into `site`,
    on top of this environment's dependencies."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(checkout), str(checkout / "runtime")], check=True)


def build(target: str, model: str, run: str, work: Path, checkout_site: Path | None) -> dict:
    """One build in its own process; a `checkout:` run imports the packages installed in `checkout_site`."""
    env = dict(os.environ)
    if run.startswith("checkout:"):
        if checkout_site is None:
            raise SystemExit(f"{run}: a checkout: run needs --checkout DIR")
        env["PYTHONPATH"] = str(checkout_site)
    exporter, method, bits, *options = run.removeprefix("checkout:").split(":")
    out = work / run.replace(":", "-")
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = [part for option in options for part in (f"--{option.split('=')[0]}", option.split("=")[1])]
    cmd = [sys.executable, "-m", "faq_deploy", "build", "--target", target, "--model", model, "--exporter", exporter,
           "--method", method, "--bits", bits, "--group", "32", *flags, "--out", str(out), "--json"]
    print(" ".join(cmd[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"build failed ({done.returncode}): {' '.join(cmd[2:])}")
    return {"exporter": exporter, "run": run, **json.loads(done.stdout)}


def markdown(rows: list[dict], gguf_bytes: int, command: str, checkout: str | None) -> str:
    # a stage by its first word ("quantize (faq)" → "quantize"), in the order of the build with the most
    # stages: an older checkout's build may have fewer
    names = list(dict.fromkeys(name for r in sorted(rows, key=lambda r: -len(r["seconds"])) for name in r["seconds"]))
    stages = list(dict.fromkeys(name.split(" ")[0] for name in names))
    lines = [f"# `faq-deploy build` on {rows[0]['model']}", "", f"`{command}`", "",
             f"Float32 model {rows[0]['float_bytes'] / MB:.1f} MB; the GGUF it ships as {gguf_bytes / MB:.1f} MB. "
             f"Perplexity on {rows[0]['eval_tokens']} tokens of speeches-eval (the bundle through onnxruntime at "
             f"{rows[0]['target']}'s accuracy level); agreement: next-token argmax against the quantized torch "
             f"model on 1,024 tokens. Peak: the build process's resident memory at its highest stage, plus what "
             f"the builder's forked copy added when it ran in that stage.", "",
             "| run | method | bundle MB | vs float32 | vs GGUF | perplexity float → bundle | agreement | "
             + " | ".join(f"{stage} s" for stage in stages) + " | total s | peak GB (stage) |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(stages) + 2)]
    for r in rows:
        seconds = {name.split(" ")[0]: s for name, s in r["seconds"].items()}
        lines.append(
            f"| {r['run']} | {r['method']} w{r['bits']} g{r['group']} | {r['bundle_bytes'] / MB:.1f} | "
            f"{r['bundle_bytes'] / r['float_bytes']:.2f}× | {r['bundle_bytes'] / gguf_bytes:.2f}× | "
            f"{r['perplexity_float']:.2f} → {r['perplexity_bundle']:.2f} | {r['parity']['argmax_agreement']:.1%} | "
            + " | ".join(f"{seconds[stage]:.0f}" if stage in seconds else "-" for stage in stages)
            + f" | {sum(seconds.values()):.0f} | {peak(r)} |")
    lines += ["", "Stages: " + "; ".join(names) + "."]
    if checkout:
        lines += ["", f"Runs written `checkout:…` ran the code of commit {checkout}, in the same environment."]
    return "\n".join(lines) + "\n"


def peak(row: dict) -> str:
    if "peak_rss_bytes" not in row:  # an older checkout's build did not report it
        return "-"
    stage, rss = max(row["peak_rss_bytes"].items(), key=lambda item: item[1])
    return f"{rss / 1e9:.2f} ({stage.split(' ')[0]})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["builder:faq:4", "builder:faq:3", "dynamo:faq:4"],
                        metavar="EXPORTER:METHOD:BITS")
    parser.add_argument("--target", default="jetson")
    parser.add_argument("--model", default=DEFAULT_MODEL.key, choices=list(EMBEDDED), help="an embedded model")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--checkout", type=Path, metavar="DIR",
                        help="a worktree of another commit, whose code builds the runs written checkout:…")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "build")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep each run's bundle in DIR/<run> (default: built in a temporary folder and removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        site = Path(tmp) / "checkout-site" if args.checkout else None
        if site:
            install_checkout(args.checkout, site)
        rows = [build(args.target, args.model, run, work, site) for _ in range(args.repeat) for run in args.runs]
    gguf_bytes = fetch_embedded(embedded(args.model)).stat().st_size
    command = ("python scripts/bench_build.py --runs " + " ".join(args.runs) + f" --target {args.target}"
               + (f" --model {args.model}" if args.model != DEFAULT_MODEL.key else "")
               + (f" --repeat {args.repeat}" if args.repeat > 1 else "")
               + (f" --checkout {args.checkout}" if args.checkout else "")
               + (f" --out {args.out}" if args.out != REPO / "docs" / "results" / "build" else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    checkout = args.checkout and subprocess.run(["git", "-C", str(args.checkout), "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True, check=True).stdout.strip()
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "gguf_bytes": gguf_bytes,
                                                         "checkout": checkout, "runs": rows}, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows, gguf_bytes, command, checkout))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
