"""Shared fixtures: the real default model and text from the user cache (the setup fetches them)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from commands import FAQ_DEPLOY, TINY_FAQ
from sshd import Sshd

from faq_deploy import checkpoint, data, models
from faq_deploy.export.options import ExportOptions
from faq_deploy.export.steps import export
from faq_deploy.fetch import cache_dir
from faq_deploy.perplexity import Logits, torch_logits
from faq_deploy.quant import QuantizedModel, make_config, quantize
from faq_deploy.quant.scheme import QuantScheme

# Fixtures that build a real bundle (minutes on 2 cores, once per session) or serve one: a test that
# uses one is heavy, wherever it lives. Tests heavy for other reasons carry the mark themselves.
BUILDS = {"x86_bundle", "jetson_bundle", "built", "bundles", "exports"}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker, and every process it starts, runs on its own share of the cores:
    torch and onnxruntime size their thread pools to the cores a process may use, and two workers whose
    threads all spun on both cores took 43% more CPU time for the suite than one process did."""
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if worker and workers:
        cores = sorted(os.sched_getaffinity(0))
        share = set(cores[int(worker.removeprefix("gw"))::int(workers)]) or set(cores)
        os.sched_setaffinity(0, share)
        torch.set_num_threads(len(share))  # torch sized its pool when conftest imported it


# Under pytest-xdist (`--dist loadfile --no-loadscope-reorder`, pyproject's addopts) each module runs whole
# in one worker, and the modules are handed out in collection order. These hold the longest work (a
# minute or more on one core), longest first, so that the two workers end together; the arm64 emulation
# (over ten minutes on one core) comes after every other module, so the rest is never slowed by it.
LONGEST_FIRST = ("test_export", "test_push", "test_gguf", "test_frontier", "test_qwen", "test_budget",
                 "test_server", "test_awq_faq", "test_speculate")
LAST = ("test_arm64",)


def _turn(item: pytest.Item) -> int:
    module = item.path.stem
    if module in LAST:
        return len(LONGEST_FIRST) + 1
    return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_turn)  # stable: a module's tests keep their order
    for item in items:
        if BUILDS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.heavy)


@pytest.fixture(scope="session")
def real_cache() -> Path:
    """The populated cache, resolved before any test points FAQ_DEPLOY_CACHE elsewhere."""
    models.resolve(None)
    data.speeches_dir()
    return cache_dir()


@pytest.fixture
def default_model(real_cache: Path) -> models.LoadedModel:
    """A fresh float32 copy of the default model: quantizers modify models in place."""
    return models.load(None)


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_cache: Path) -> Path:
    """An empty cache for this test only."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FAQ_DEPLOY_CACHE", str(folder))
    return folder


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip pointed at a closed local port with no config files: a registry that cannot be reached."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def first_blocks(spec: str | None, blocks: int, folder: Path) -> Path:
    """A model folder holding the real model `spec` cut to its first `blocks` blocks, its own weights and
    tokenizer: the same graph layout and export path as the whole model, at a fraction of the trace."""
    loaded = models.load(spec)
    model = loaded.model
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:blocks]
    model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def remembered(logits: Logits) -> Logits:
    """`logits`, computed once per token row: tests that read the same windows share one forward."""
    kept: dict[bytes, torch.Tensor] = {}

    def of(row: torch.Tensor) -> torch.Tensor:
        key = row.numpy().tobytes()
        if key not in kept:
            with torch.inference_mode():
                kept[key] = logits(row).float()
        return kept[key]

    return of


def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test run's own folder: above each worker's under pytest-xdist, the session's folder without."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def made_once(folder: Path, name: str, make: Callable[[Path], object]) -> Path:
    """`folder/name`, made by `make` once per test run: under pytest-xdist the first worker to ask makes it
    and the others wait on the lock and read the same one. What is made so is only read (tests copy it
    before they change it); a `make` that fails leaves no mark, and the next worker tries again."""
    folder.mkdir(exist_ok=True)
    out, made = folder / name, folder / f"{name}.made"
    with (folder / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not made.exists():
            make(out)
            made.touch()
    return out


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, *args: str) -> tuple[Path, str]:
    """`faq-deploy build <args>` once per test run (made_once), with its stdout."""
    folder = run_folder(tmp_path_factory) / "builds"

    def build(out: Path) -> None:
        done = subprocess.run([*FAQ_DEPLOY, "build", *args, "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        out.with_name(f"{name}.stdout").write_text(done.stdout)

    out = made_once(folder, name, build)
    return out, out.with_name(f"{name}.stdout").read_text()


@pytest.fixture(scope="session")
def x86_bundle(real_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle for this machine (RTN, default target x86) with its wheelhouse and x86.tar beside it."""
    return build_once(tmp_path_factory, "x86", "--target", "x86", "--method", "rtn", "--eval-tokens", "256",
                      "--wheelhouse", "--tar")[0]


@pytest.fixture(scope="session")
def jetson_bundle(real_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`faq-deploy build --target jetson` as the README's first command runs it (FAQ, the builder), at a
    tiny calibration budget and the board's full 8k context, with its --json result."""
    out, stdout = build_once(tmp_path_factory, "jetson", "--target", "jetson", *TINY_FAQ, "--eval-tokens", "1024",
                             "--context", "8192", "--json")
    return out, json.loads(stdout)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real OpenSSH server on 127.0.0.1 for the whole session (key-only login)."""
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


# The model the dynamo exporter's tests trace: the default model's first blocks (its trace costs about
# 10 s plus 3.5 s a block, the whole model's two minutes, and the blocks are alike)
DYNAMO_BLOCKS = 4


class Exports:
    """The default model quantized by RTN (group 32) at each width, with its checkpoint, and each one's
    level-0 export (float activations: the graph that must match torch exactly) by each exporter. The
    builder exports the whole model, dynamo its first DYNAMO_BLOCKS blocks: `quantized(bits, exporter)`
    is the torch model each export matches, made on first use in each worker (RTN is deterministic);
    the exports and the cut model are made once per test run (made_once) and only read."""

    def __init__(self, folder: Path, shared: Path) -> None:
        self.folder, self.shared = folder, shared
        self._quantized: dict[tuple[int, str], tuple[models.LoadedModel, QuantizedModel, Path]] = {}
        self._logits: dict[tuple[int, str], Logits] = {}

    def quantized(self, bits: int, exporter: str = "builder") -> tuple[models.LoadedModel, QuantizedModel, Path]:
        if (bits, exporter) not in self._quantized:
            loaded = models.load(str(self.blocks()) if exporter == "dynamo" else None)
            result = quantize(loaded.model, make_config("rtn", QuantScheme(bits, 32)))
            folder = checkpoint.save(result, loaded.tokenizer, loaded.ref,
                                     self.folder / f"w{bits}-{exporter}" / "checkpoint")
            self._quantized[bits, exporter] = loaded, result, folder
        return self._quantized[bits, exporter]

    def logits(self, bits: int, exporter: str = "builder") -> Logits:
        """`quantized(bits, exporter)`'s torch logits, each window once per worker."""
        if (bits, exporter) not in self._logits:
            self._logits[bits, exporter] = remembered(torch_logits(self.quantized(bits, exporter)[0].model))
        return self._logits[bits, exporter]

    def blocks(self) -> Path:
        """The dynamo exporter's model folder."""
        return made_once(self.shared, "blocks", lambda folder: first_blocks(None, DYNAMO_BLOCKS, folder))

    def level0(self, bits: int, exporter: str) -> Path:
        return made_once(self.shared, f"w{bits}-{exporter}",
                         lambda folder: export(self.quantized(bits, exporter)[2], folder,
                                               ExportOptions(exporter=exporter, accuracy_level=0)))


@pytest.fixture(scope="session")
def exports(real_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"), run_folder(tmp_path_factory) / "exports")
