"""The CLI through click's runner: help, JSON output, and every bad-input path with its exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from faq_deploy.cli import cli
from faq_deploy.errors import ModelNotFound


def invoke(*args: str) -> click.testing.Result:  # noqa: F821
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("command", [[], ["models"], ["models", "fetch"], ["models", "list"], ["models", "info"],
                                     ["text"], ["text", "list"], ["text", "fetch"], ["quantize"], ["eval"]])
def test_help_everywhere(command: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_top_level_help_documents_exit_codes() -> None:
    assert "Exit codes:" in invoke("--help").output and "  7  Corrupted file" in invoke("--help").output


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real GPT-2 checkpoint: an architecture the quantizers do not support."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("args,code,message", [
    (["eval", "--model", "./no/such/model"], 3, "no model at './no/such/model'"),
    (["eval", "--model", "pyproject.toml"], 3, "not a .gguf"),
    (["quantize", "--bits", "6", "--out", "x"], 5, "bits=6 is not supported"),
    (["quantize", "--group", "24", "--out", "x"], 5, "group size 24 is not a power of two"),
    (["eval", "--text", "no-such-corpus"], 8, "no text at 'no-such-corpus'"),
    (["eval", "--tokens", "10"], 8, "do not fill one 1024-token window"),
    (["quantize", "--method", "gptq", "--out", "x"], 2, "Invalid value for '--method'"),
    (["quantize", "--method", "awq", "--gamma", "0.5", "--out", "x"], 5, "awq does not take gamma"),
    (["quantize", "--gamma", "1.5", "--out", "x"], 5, "gamma=1.5 (0…1)"),
    (["quantize", "--calib", "no-such-text", "--out", "x"], 8, "no text at 'no-such-text'"),
    (["build", "--target", "jetsn"], 10, "did you mean jetson"),
    (["build", "--weights", "qdq", "--symmetric", "--float-activations", "lm_head"], 11, "per-node accuracy level"),
    (["build", "--target", "pi5", "--emulated-parity"], 23, "add --wheelhouse"),
    (["build", "--target", "x86", "--emulated-parity", "--wheelhouse"], 23, "has no emulated core"),
    (["build", "--target", "jetson", "--provider", "cuda", "--emulated-parity", "--wheelhouse"], 23,
     "not this cuda graph's"),
])
def test_bad_input_has_a_message_and_exit_code(args: list[str], code: int, message: str, real_cache: Path) -> None:
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert message in result.output
    if code != 2:
        assert "Traceback" not in result.output and "hint: " in result.output


def test_unsupported_architecture(gpt2_folder: Path, tmp_path: Path) -> None:
    result = invoke("quantize", "--model", str(gpt2_folder), "--out", str(tmp_path / "q"))
    assert result.exit_code == 4
    assert "GPT2LMHeadModel is not supported" in result.output and "LlamaForCausalLM" in result.output


def test_debug_env_reraises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAQ_DEPLOY_DEBUG", "1")
    result = invoke("eval", "--model", "./no/such/model")
    assert isinstance(result.exception, ModelNotFound)


def test_quantize_then_eval_the_checkpoint(tmp_path: Path, real_cache: Path) -> None:
    out = tmp_path / "rtn-w4g64"
    made = json.loads(invoke("quantize", "--method", "rtn", "--bits", "4", "--group", "64", "--out", str(out),
                             "--json").stdout)
    assert made["linears"] == 210 and made["bits"] == 4 and Path(made["out"]) == out
    assert made["bytes"] < 0.5 * 540e6  # codes instead of float32 block weights

    args = ["--tokens", "512", "--ppl-window", "256", "--json"]
    from_checkpoint = json.loads(invoke("eval", "--model", str(out), *args).stdout)
    on_the_fly = json.loads(invoke("eval", "--quantize", "rtn", "--bits", "4", "--group", "64", *args).stdout)
    for key in ("model", "method", "bits", "group", "tokens", "perplexity"):
        assert key in from_checkpoint
    assert from_checkpoint["method"] == "rtn" and from_checkpoint["tokens"] == 512
    assert from_checkpoint["perplexity"] == on_the_fly["perplexity"]

    twice = invoke("eval", "--model", str(out), "--quantize", "rtn", *args)
    assert twice.exit_code == 5 and "already a quantized checkpoint" in twice.output


def test_eval_scores_a_shipped_bundle_as_its_build_did(x86_bundle: Path) -> None:
    """`eval --model BUNDLE` runs the exported graph through onnxruntime: on the build's own tokens and
    window it repeats the build's figure; a second domain and the bare model folder work the same way."""
    manifest = json.loads((x86_bundle / "manifest.json").read_text())
    tokens = str(manifest["evaluation"]["tokens"])
    shipped = json.loads(invoke("eval", "--model", str(x86_bundle), "--tokens", tokens, "--ppl-window", tokens,
                                "--json").stdout)
    assert shipped["perplexity"] == manifest["evaluation"]["perplexity_bundle"]
    assert (shipped["method"], shipped["bits"], shipped["device"]) == ("rtn", 4, "onnxruntime-cpu")
    folder = json.loads(invoke("eval", "--model", str(x86_bundle / "model"), "--text", "bible-kjv", "--tokens", "512",
                               "--ppl-window", "256", "--json").stdout)
    assert folder["method"] == "onnx" and folder["text"] == "bible-kjv" and 1 < folder["perplexity"] < 100
    refused = invoke("eval", "--model", str(x86_bundle), "--quantize", "rtn")
    assert refused.exit_code == 5 and "already quantized" in refused.output


def test_model_and_text_listings(real_cache: Path) -> None:
    info = json.loads(invoke("models", "info", "--json").stdout)
    assert (info["architecture"], info["layers"], info["hidden"], info["kv_heads"]) == ("LlamaForCausalLM", 30, 576, 3)
    listed = json.loads(invoke("models", "list", "--json").stdout)
    assert listed[0]["name"] == "SmolLM2-135M-Instruct" and listed[0]["cached"] is True
    corpora = {row["name"]: row for row in json.loads(invoke("text", "list", "--json").stdout)}
    assert corpora["speeches-eval"]["first"] == "2026-Trump-1"
    assert (corpora["bible-kjv"]["documents"], corpora["bible-kjv"]["first"]) == (66, "Genesis")
