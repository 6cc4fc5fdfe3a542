"""A bundle's `wheels/`: everything the board needs to install faq-runtime offline
(`pip install --no-index --find-links wheels faq-runtime`), for the target's machine, Python and glibc.

faq-runtime itself is built from `runtime/` in this checkout; pip then resolves its dependencies
(onnxruntime, numpy, tokenizers, jinja2 and theirs) as binary wheels for the target's platform, with
onnxruntime held between the graphs' floor and the target's ceiling.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import faq_runtime
from faq_deploy.errors import RegistryUnreachable, TargetError
from faq_deploy.registry import Target
from faq_runtime.compat import ONNXRUNTIME_MIN

RUNTIME_SOURCE = Path(faq_runtime.__file__).resolve().parents[1]  # runtime/ in a source checkout


def manylinux_tags(machine: str, glibc: str) -> list[str]:
    """Every manylinux platform tag whose wheels run on `glibc` (2014 = 2.17, then 2.17 … glibc)."""
    minor = int(glibc.split(".")[1])
    return [f"manylinux2014_{machine}"] + [f"manylinux_2_{m}_{machine}" for m in range(17, minor + 1)]


def line_of(target: Target) -> tuple[str, str]:
    """The (Python, glibc) the wheels are for: the target's, or this host's for a generic target of
    this machine's architecture."""
    software = target.software
    if software.python and software.glibc:
        return software.python, software.glibc
    if target.identity.machine == platform.machine():
        return ".".join(platform.python_version_tuple()[:2]), platform.libc_ver()[1]
    raise TargetError(f"{target.name} states no Python and glibc, so its wheels cannot be chosen",
                      "describe the board in a target file of your own (--targets-dir) with software.python and "
                      "software.glibc")


def download(target: Target, dest: Path) -> dict[str, str]:
    """Fill `dest` with faq-runtime's wheel, binary wheels of its dependencies for `target`, and pip's
    (the device runs pip from its wheel: Debian and Ubuntu boards often lack ensurepip, i.e.
    python3-venv); returns the line they are for (machine, python, glibc)."""
    if not (RUNTIME_SOURCE / "pyproject.toml").exists():
        raise TargetError("--wheelhouse builds faq-runtime from runtime/, which this installation lacks",
                          "run faq-deploy from a source checkout (pip install -e .)")
    python, glibc = line_of(target)
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(dest), str(RUNTIME_SOURCE)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise TargetError(f"building the faq-runtime wheel failed: {built.stderr.strip()[-300:]}",
                          "check that runtime/ builds with `pip wheel runtime/`")
    ceiling = f",<={target.software.onnxruntime_max}" if target.software.onnxruntime_max else ""
    platforms = [arg for tag in manylinux_tags(target.identity.machine, glibc) for arg in ("--platform", tag)]
    fetched = subprocess.run([*pip, "download", "-q", "-d", str(dest), "--find-links", str(dest),
                              "--only-binary", ":all:", "--implementation", "cp", "--python-version", python,
                              *platforms, "faq-runtime", f"onnxruntime>={ONNXRUNTIME_MIN}{ceiling}", "pip"],
                             capture_output=True, text=True)
    if fetched.returncode != 0:
        last = (fetched.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise RegistryUnreachable(f"wheels for {target.name} (Python {python}, glibc {glibc}, "
                                  f"{target.identity.machine}) could not be downloaded: {last}",
                                  "check the connection to PyPI, or the target's python/glibc/onnxruntime_max")
    return {"machine": target.identity.machine, "python": python, "glibc": glibc}
