"""Packaging rules: the runtime stands alone, and CI runs what the README says."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

from faq_runtime import compat

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ALLOWED = {"onnxruntime", "numpy", "tokenizers", "jinja2", "faq_runtime"}


def test_runtime_imports_only_its_dependencies_and_the_standard_library() -> None:
    for path in (ROOT / "runtime" / "faq_runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                assert top in RUNTIME_ALLOWED or top in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_runtime_runs_with_torch_and_transformers_unavailable() -> None:
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'click', 'faq_deploy'): sys.modules[name] = None\n"
            "from faq_runtime.cli import main\n"
            "sys.exit(main(['info', '--json']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert '"CPUExecutionProvider"' in done.stdout


def test_runtime_pins_the_floors_its_checks_enforce() -> None:
    """A device passing `compat.check` must be able to pip-install the runtime, and the other way round."""
    project = tomllib.loads((ROOT / "runtime" / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == f">={compat.PYTHON_MIN}"
    assert f"onnxruntime>={compat.ONNXRUNTIME_MIN}" in project["dependencies"]
    for module in (ROOT / "runtime" / "faq_runtime").glob("*.py"):  # and its code parses on that Python
        ast.parse(module.read_text(), feature_version=compat.version(compat.PYTHON_MIN)[:2])


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme[:20] if line.strip().startswith("bash scripts/setup.sh")]
    assert len(commands) == 2, "the README's first lines give the main command and the test command"
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_the_command_reference_documents_every_exit_code() -> None:
    from faq_deploy.errors import EXIT_CODES

    reference = (ROOT / "docs" / "commands.md").read_text()
    assert all(f"| {code} |" in reference for code in EXIT_CODES)
