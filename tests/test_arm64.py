"""Bundles on arm64: a Raspberry Pi 5 bundle on an emulated Pi 5 (tests/arm64.py), from its wheelhouse
to selftest and push, with its logits compared against this machine's and its build's emulated parity
checked.

Emulation runs the real arm64 wheels (onnxruntime's arm64 kernels included) exactly, only slowly, so
the token budgets here are small; the figures each test prints are for the record, not for speed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from arm64 import Arm64Board
from commands import FAQ_DEPLOY
from sshd import free_port, keygen
from test_push import id_of, variant
from tokenizers import Tokenizer

from faq_deploy import models, registry
from faq_deploy.build import EVAL_TEXT, MIN_AGREEMENT, PARITY_TOKENS
from faq_deploy.data import eval_tokens, load_corpus
from faq_deploy.detect import match
from faq_deploy.emulate import DEVICE_ROOT, logits_inside
from faq_deploy.export.options import ExportOptions
from faq_deploy.export.parity import reference_logits
from faq_deploy.export.tables import fake_quantize_tables
from faq_deploy.perplexity import perplexity as score
from faq_deploy.quant import make_config, quantize
from faq_deploy.quant.scheme import QuantScheme
from faq_runtime import agent
from faq_runtime.model import Decoder

pytestmark = pytest.mark.heavy

BOARDS = Path(__file__).parent / "fixtures" / "boards"


class Pi5:
    """The emulated Pi 5 with the pi5 bundle in place and its runtime installed by the agent, offline."""

    def __init__(self, board: Arm64Board, bundle: Path, install: dict) -> None:
        self.board, self.bundle, self.install = board, bundle, install
        self.bundle_dir = f"{DEVICE_ROOT}/bundles/pi5"
        self.faq_run = install["runtime"]
        self.python = str(Path(self.faq_run).parent / "python")

    def logits(self, model_dir: str, ids: list[int]) -> np.ndarray:
        """The runtime's logits of `ids` from a model folder inside the board, computed there."""
        return logits_inside(self.board, self.python, model_dir, ids)


@pytest.fixture(scope="session")
def pi5(real_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pi5]:
    out = tmp_path_factory.mktemp("pi5") / "bundle"
    built = subprocess.run([*FAQ_DEPLOY, "build", "--target", "pi5", "--method", "rtn", "--eval-tokens", "256",
                            "--wheelhouse", "--emulated-parity", "--out", str(out)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    board = Arm64Board(tmp_path_factory.mktemp("arm64"), BOARDS / "raspberry-pi-5")
    board.put(out, f"{DEVICE_ROOT}/bundles/pi5")
    board.put(Path(agent.__file__), f"{DEVICE_ROOT}/.faq/agent.py")
    done = board.run(f"python3 {DEVICE_ROOT}/.faq/agent.py install {DEVICE_ROOT} pi5")
    assert done.returncode == 0, done.stdout + done.stderr
    yield Pi5(board, out, json.loads(done.stdout))


def test_a_pi5_bundle_installs_offline_and_passes_its_selftest_on_an_emulated_pi5(pi5: Pi5) -> None:
    assert pi5.install["installed"] and pi5.faq_run.startswith(f"{DEVICE_ROOT}/runtime/faq-runtime-")
    assert pi5.faq_run.endswith("-py3.11/bin/faq-run")  # the board's Python, Raspberry Pi OS bookworm's
    done = pi5.board.run(f"{pi5.faq_run} selftest {pi5.bundle_dir}")  # the device check is on
    assert done.returncode == 0 and "ok, 8 tokens" in done.stdout, done.stdout + done.stderr
    print(done.stdout.strip())
    probed = pi5.board.run(f"{pi5.faq_run} probe")
    assert probed.returncode == 0, probed.stderr
    facts = json.loads(probed.stdout)
    # the userland is arm64, the kernel under the emulation this machine's: the probe names both
    assert facts["machine"] == "aarch64" and facts["kernel_machine"] == "x86_64"
    assert facts["python"].startswith("3.11.") and facts["onnxruntime_error"] is None
    assert "CPUExecutionProvider" in facts["onnxruntime"]["providers"]
    assert facts["model"] == "Raspberry Pi 5 Model B Rev 1.0" and "asimddp" in facts["cpu"]["features"]
    judged = match(registry.load(), facts)
    assert judged[0].ok and judged[0].target.name == "raspberry-pi-5", judged[0]


def test_a_probe_whose_onnxruntime_import_crashes_still_prints_its_facts(pi5: Pi5) -> None:
    """The host's x86 /proc/cpuinfo under the arm64 userland: onnxruntime's CPU detection reads it and
    the import dies of SIGSEGV. The probe imports it in a child, so it reports that and carries on."""
    crash = pi5.board.run(f"{pi5.python} -c 'import onnxruntime'", dressed=False)
    assert crash.returncode == 139, (crash.returncode, crash.stderr[-500:])  # 128 + SIGSEGV, from the shell
    for probe in (f"{pi5.python} -m faq_runtime.probe", f"{pi5.faq_run} probe"):  # as a push runs it, the CLI
        probed = pi5.board.run(probe, dressed=False)
        assert probed.returncode == 0, probed.stderr[-2000:]
        facts = json.loads(probed.stdout)
        assert facts["onnxruntime"] is None and facts["machine"] == "aarch64"
        assert facts["onnxruntime_error"] == "importing onnxruntime crashed the interpreter (SIGSEGV)"


def _ids(pi5: Pi5, count: int) -> list[int]:
    """The first `count` tokens of the evaluation text, as the build's parity takes them."""
    tokenizer = Tokenizer.from_file(str(pi5.bundle / "model" / "tokenizer.json"))
    return eval_tokens(tokenizer, load_corpus(EVAL_TEXT), count).tolist()


def test_level_0_logits_on_arm64_equal_this_machines(pi5: Pi5, exports) -> None:
    """With float activations (accuracy level 0) the arm64 kernels compute what x86's do, to float rounding."""
    folder = exports.level0(4, "builder")
    ids = _ids(pi5, 32)
    inside = pi5.board.put(folder, "/opt/level0")
    arm = pi5.logits(inside, ids)
    x86 = Decoder(folder).logits(ids)
    relative = float(np.abs(arm - x86).max() / np.abs(x86).max())
    print(f"level 0, {len(ids)} tokens: max |arm64 − x86| / max |logit| = {relative:.2e}")
    assert relative <= 1e-4
    assert (arm.argmax(-1) == x86.argmax(-1)).all()


def test_the_bundle_records_its_level_4_parity_measured_on_arm64(pi5: Pi5) -> None:
    """`build --emulated-parity`: the bundle's int8 kernels differ by architecture, so its x86 parity does not
    describe the board. The record is checked against this test's own torch model (RTN, rebuilt exactly)
    and tables, and x86 graph, on the same tokens; the arm64 figures must clear the build's floor."""
    manifest = json.loads((pi5.bundle / "manifest.json").read_text())
    assert manifest["export"]["accuracy_level"] == 4 and manifest["quantization"]["method"] == "rtn"
    emulated = manifest["evaluation"]["parity_emulated"]
    assert emulated["machine"] == "aarch64" and "cortex-a76" in emulated["emulated"]
    assert emulated["tokens"] == PARITY_TOKENS
    ids = _ids(pi5, PARITY_TOKENS)
    loaded, scheme = models.load(None), QuantScheme(**manifest["quantization"]["scheme"])
    quantize(loaded.model, make_config("rtn", scheme))
    export = manifest["export"]  # the embedding and head as the graph stores them, as the build's reference has
    fake_quantize_tables(loaded.model, ExportOptions(lm_head=export["lm_head"], embedding=export["embedding"]), scheme)
    expected = reference_logits(loaded.model, torch.tensor(ids))
    host = torch.from_numpy(Decoder(pi5.bundle / "model").logits(ids))

    def window(logits: torch.Tensor) -> float:  # one window of all the tokens, as the build scores them
        return score(lambda _row: logits, torch.tensor(ids), len(ids)).perplexity

    assert emulated["perplexity_torch"] == pytest.approx(window(expected), rel=1e-4)
    assert emulated["perplexity_host"] == pytest.approx(window(host), rel=1e-4)
    assert emulated["argmax_agreement"] >= MIN_AGREEMENT
    assert abs(emulated["perplexity"] / emulated["perplexity_torch"] - 1) < 0.01
    assert emulated["agreement_with_host"] < 1  # the board's kernels computed it, not this machine's
    assert f"parity on aarch64 (measured there, emulated) | {emulated['argmax_agreement']:.2%}" in \
        (pi5.bundle / "REPORT.md").read_text()
    print(f"level 4, {PARITY_TOKENS} tokens: {json.dumps(emulated)}; x86 agreement "
          f"{manifest['evaluation']['parity']['argmax_agreement']:.4f}")


def test_push_to_the_emulated_pi5_installs_the_runtime_switches_and_rolls_back(pi5: Pi5, tmp_path: Path) -> None:
    """`faq-deploy push` to the board's own sshd: the probe, preflight, upload, install, selftest and
    health check all run on arm64; a second bundle, then rollback, puts the first back."""
    key, port = keygen(tmp_path / "deployer"), free_port()
    server = pi5.board.sshd(port, key)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.2)
        host_key = (pi5.board.root / "etc" / "ssh" / "test_host_ed25519.pub").read_text().split()[:2]
        (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
        (tmp_path / "ssh_config").write_text(
            f"Host pi5\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {key}\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {tmp_path / 'known_hosts'}\n")

        def faq_deploy(*args: str) -> dict:
            done = subprocess.run([*FAQ_DEPLOY, *args, "pi5", "--ssh-config", str(tmp_path / "ssh_config"),
                                   "--root", "/srv/push", "--json"], capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stdout + done.stderr[-2000:]
            return json.loads(done.stdout)

        started = time.monotonic()
        first = faq_deploy("push", str(pi5.bundle))
        print(f"first push (runtime installed): {time.monotonic() - started:.0f} s")
        assert first["result"] == "deployed" and first["runtime"].startswith("/srv/push/runtime/faq-runtime-")
        assert first["selftest"]["ok"]
        second = variant(pi5.bundle, tmp_path / "b", "b")  # no wheels: it runs on the runtime just installed
        started = time.monotonic()
        pushed = faq_deploy("push", str(second), "--runtime", first["runtime"])
        print(f"second push: {time.monotonic() - started:.0f} s")
        assert pushed["result"] == "deployed" and pushed["previous"] == id_of(pi5.bundle)
        assert faq_deploy("status")["current"] == id_of(second)
        assert faq_deploy("rollback") == {"host": "pi5", "current": id_of(pi5.bundle), "previous": id_of(second)}
        current = pi5.board.root / "srv" / "push" / "current"
        assert current.is_symlink() and Path(current.readlink()).name == id_of(pi5.bundle)
    finally:
        server.terminate()
        server.wait(30)
