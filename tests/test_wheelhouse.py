"""`build --wheelhouse --tar`: a bundle the board installs its runtime from offline, and its tar.

Real PyPI downloads (the setup's registries) and a real offline `pip install --no-index`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

from commands import FAQ_DEPLOY

from faq_deploy import registry, wheelhouse
from faq_runtime import compat
from faq_runtime.bundle import MANIFEST

BOARDS = Path(__file__).parent / "fixtures" / "boards"


def test_the_runtime_installs_offline_from_the_bundle_and_runs_it(x86_bundle: Path, tmp_path: Path) -> None:
    env = tmp_path / "board"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links",
                              str(x86_bundle / "wheels"), "faq-runtime"], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    run = [str(env / "bin" / "faq-run")]
    assert subprocess.run([*run, "verify", str(x86_bundle)], capture_output=True, text=True).returncode == 0
    done = subprocess.run([*run, "generate", str(x86_bundle), "--prompt", "My fellow citizens,", "--max-tokens", "6",
                           "--temperature", "0.7", "--seed", "1", "--stop", "\n\n", "--no-stream"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(installed.stdout)} - {"pip", "setuptools"}
    assert "torch" not in names and "transformers" not in names and "faq-deploy" not in names
    shipped = {w.name.split("-")[0].lower().replace("_", "-") for w in (x86_bundle / "wheels").glob("*.whl")}
    assert names <= shipped, names - shipped  # nothing but the bundle's wheels (and the venv's own pip)


def test_the_tar_holds_exactly_the_bundle(x86_bundle: Path) -> None:
    manifest = json.loads((x86_bundle / MANIFEST).read_text())
    with tarfile.open(x86_bundle.with_name("x86.tar")) as tar:
        members = {m.name for m in tar.getmembers() if m.isfile()}
    expected = {f"x86/{f['path']}" for f in manifest["files"]} | {f"x86/{MANIFEST}"}
    assert members == expected
    assert any(path.startswith("x86/wheels/faq_runtime-") for path in members)


def test_the_wheels_pin_the_device_python(x86_bundle: Path, tmp_path: Path) -> None:
    needs = json.loads((x86_bundle / MANIFEST).read_text())["target"]["compatibility"]
    assert needs["wheels_python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    other = shutil.copytree(BOARDS / "x86-host", tmp_path / "host")
    interpreter = other / ".faq-probe" / "interpreter.json"
    interpreter.write_text(json.dumps({**json.loads(interpreter.read_text()), "python": "3.99.0"}))
    done = subprocess.run([*FAQ_DEPLOY, "targets", "check", str(x86_bundle), "--root", str(other)],
                          capture_output=True, text=True)
    assert done.returncode == 10 and "the bundle's wheels" in done.stderr
    assert [m.field for m in compat.check(needs, {"machine": "x86_64", "python": "3.99.0"})] == ["Python"]


def test_wheels_for_another_board_are_that_board_s(tmp_path: Path) -> None:
    """The Orin Nano's line: aarch64, CPython 3.10, glibc 2.35, onnxruntime between the floor and 1.23.2."""
    line = wheelhouse.download(registry.load().resolve("jetson"), tmp_path)
    assert line == {"machine": "aarch64", "python": "3.10", "glibc": "2.35"}
    names = [p.name for p in tmp_path.glob("*.whl")]
    ort = next(n for n in names if n.startswith("onnxruntime-"))
    assert "cp310" in ort and "aarch64" in ort
    assert compat.version(compat.ONNXRUNTIME_MIN) <= compat.version(ort.split("-")[1]) <= (1, 23, 2)
    assert any(n.startswith("numpy-") and "cp310" in n and "aarch64" in n for n in names)
    assert any(n.startswith("faq_runtime-") for n in names)
