"""Which onnxruntime each target can get, and which onnxruntime our graphs need — measured, not recalled.

Ceilings: for every target that states its Python and glibc, ask pip (PyPI) for the newest onnxruntime
wheel that installs there, and compare with the file's `onnxruntime_max`.
Floor: install each given onnxruntime version into its own venv and run one token of an exported
model folder; the oldest version that runs it is the floor (faq_runtime.compat.ONNXRUNTIME_MIN).

    python scripts/onnxruntime_lines.py --model build/jetson/model --versions 1.20.1 1.21.1 1.22.1 1.23.0
Writes docs/results/onnxruntime.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from faq_deploy import registry
from faq_deploy.fetch import cache_dir
from faq_deploy.wheelhouse import manylinux_tags

ONE_TOKEN = """
import json, sys, numpy as np, onnxruntime as ort
folder = sys.argv[1]
d = json.load(open(folder + "/genai_config.json"))["model"]["decoder"]
try:
    s = ort.InferenceSession(folder + "/" + d["filename"], providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[1]], np.int64), "attention_mask": np.ones((1, 1), np.int64),
             "position_ids": np.zeros((1, 1), np.int64)}  # the dynamo exporter's graphs take positions
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}}
    for i in s.get_inputs():
        if i.name not in feeds:
            feeds[i.name] = np.zeros((1, d["num_key_value_heads"], 0, d["head_size"]), np.float32)
    s.run(["logits"], feeds)
    print(json.dumps({"runs": True}))
except Exception as exc:
    print(json.dumps({"runs": False, "error": str(exc).strip().splitlines()[-1][-160:]}))
"""


def newest_wheel(python: str, glibc: str, machine: str) -> str | None:
    """The newest onnxruntime on PyPI with a wheel for this Python and any manylinux tag up to `glibc`."""
    tags = manylinux_tags(machine, glibc)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "onnxruntime==0", "--no-deps", "--only-binary", ":all:",
               "--python-version", python, "-d", tmp] + [arg for tag in tags for arg in ("--platform", tag)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"from versions: ([^)]*)\)", done.stderr)
    versions = [v.strip() for v in found.group(1).split(",")] if found and "none" not in found.group(1) else []
    return versions[-1] if versions else None


def ceilings() -> list[dict[str, str | None]]:
    rows = []
    for target in registry.load().targets.values():
        software = target.software
        if not (software.python and software.glibc):
            continue
        newest = newest_wheel(software.python, software.glibc, target.identity.machine)
        rows.append({"target": target.name, "python": software.python, "glibc": software.glibc,
                     "newest_wheel": newest, "file_says": software.onnxruntime_max,
                     "agrees": software.onnxruntime_max in (None, newest) if newest else False})
    return rows


def floor(model: Path, versions: list[str]) -> list[dict[str, object]]:
    rows = []
    for v in versions:
        venv = cache_dir() / "onnxruntime-floor" / v
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"onnxruntime=={v}", "numpy<2"], check=True)
        done = subprocess.run([str(venv / "bin" / "python"), "-c", ONE_TOKEN, str(model)], capture_output=True,
                              text=True)
        rows.append({"onnxruntime": v, **json.loads(done.stdout or '{"runs": false, "error": "crashed"}')})
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported model folder (a bundle's model/)")
    parser.add_argument("--versions", nargs="+", default=["1.20.1", "1.21.1", "1.22.1", "1.23.0"])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    result = {"ceilings": ceilings(), "floor": floor(args.model, args.versions)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnxruntime.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# onnxruntime lines", "", f"`python scripts/onnxruntime_lines.py --model {args.model} --versions "
             f"{' '.join(args.versions)}`", "", "## Newest wheel per target (PyPI)", "",
             "| target | Python | glibc | newest onnxruntime | target file says |", "|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['python']} | {r['glibc']} | {r['newest_wheel']} | "
              f"{r['file_says'] or '(no ceiling)'}{'' if r['agrees'] else ' **differs**'} |"
              for r in result["ceilings"]]
    lines += ["", f"## Oldest onnxruntime that runs {args.model} (one token, CPU)", "",
              "| onnxruntime | runs | error |", "|---|---|---|"]
    lines += [f"| {r['onnxruntime']} | {'yes' if r['runs'] else 'no'} | {r.get('error', '')} |"
              for r in result["floor"]]
    (args.out / "onnxruntime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
