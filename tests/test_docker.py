"""The Docker images, checked without a Docker engine: every file they copy exists in their build
context, and every command they run is a real entry point that accepts its arguments."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import tomllib

from faq_runtime.cli import parser as faq_run_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCRIPTS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]) | \
    set(tomllib.loads((ROOT / "runtime" / "pyproject.toml").read_text())["project"]["scripts"])


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = path.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def exec_form(arguments: str) -> list[str]:
    return json.loads(arguments)


def test_there_is_a_host_image_and_two_device_images() -> None:
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == [
        "host.Dockerfile", "runtime-arm64.Dockerfile", "runtime-jetson.Dockerfile"]


def test_the_host_image_copies_files_of_the_repository_and_runs_faq_deploy() -> None:
    steps = instructions(DOCKER / "host.Dockerfile")
    for kind, arguments in steps:
        if kind == "COPY":
            *sources, _ = shlex.split(arguments)
            for source in sources:
                assert (ROOT / source).exists(), f"host.Dockerfile copies {source}, which is not in the repository"
    entry = exec_form(next(a for k, a in steps if k == "ENTRYPOINT"))
    assert entry == ["faq-deploy"] and entry[0] in SCRIPTS
    assert any("torch==2.13.0" in a and "whl/cpu" in a for k, a in steps if k == "RUN")


@pytest.mark.parametrize("name", ["runtime-arm64.Dockerfile", "runtime-jetson.Dockerfile"])
def test_device_images_install_from_a_bundle_wheelhouse_and_serve(name: str, x86_bundle: Path) -> None:
    steps = instructions(DOCKER / name)
    for kind, arguments in steps:
        if kind == "COPY":
            *sources, _ = shlex.split(arguments)
            assert all((x86_bundle / s).exists() for s in sources), f"{name} copies {sources}, not in a bundle"
    installs = [a for k, a in steps if k == "RUN" and "pip install" in a]
    assert installs and all("--no-index --find-links /wheels faq-runtime" in a for a in installs)
    entry = exec_form(next(a for k, a in steps if k == "ENTRYPOINT"))
    assert entry == ["faq-run"] and entry[0] in SCRIPTS
    command = exec_form(next(a for k, a in steps if k == "CMD"))
    args = faq_run_parser().parse_args(command)
    assert args.command == "serve" and args.bundle == Path("/bundle") and args.host == "0.0.0.0"
    health = exec_form(next(a for k, a in steps if k == "HEALTHCHECK").split("CMD", 1)[1].strip())
    assert health[0] == "faq-run" and faq_run_parser().parse_args(health[1:]).command == "selftest"
