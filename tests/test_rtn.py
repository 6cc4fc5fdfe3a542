"""RTN on the real default model, and its olive checkpoint read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from faq_deploy import checkpoint
from faq_deploy.architectures import block_linears
from faq_deploy.errors import CheckpointError
from faq_deploy.models import LoadedModel
from faq_deploy.quant import make_config, quantize
from faq_deploy.quant.scheme import QuantScheme

PROMPT = "The State of the Union is"


def _logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 64)])
def test_rtn_checkpoint_round_trip(default_model: LoadedModel, tmp_path: Path, bits: int, group: int) -> None:
    fp_logits = _logits(default_model.model, default_model.tokenizer)
    quantized = quantize(default_model.model, make_config("rtn", QuantScheme(bits=bits, group_size=group)))
    linears = block_linears(default_model.model)
    assert set(quantized.weights) == set(linears) and len(linears) == 30 * 7
    for name, weight in quantized.weights.items():
        assert int(weight.codes.max()) <= 2**bits - 1
        assert torch.equal(linears[name].weight, weight.dequantize())
    q_logits = _logits(default_model.model, default_model.tokenizer)
    assert not torch.allclose(q_logits, fp_logits)

    folder = checkpoint.save(quantized, default_model.tokenizer, default_model.ref, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    container = 4 if bits == 3 else bits
    assert config["quantization_config"] == {"quant_method": "olive", "bits": container,
                                             "group_size": group, "overrides": {}}
    with safe_open(folder / checkpoint.WEIGHTS_FILE, framework="pt") as f:
        qweight = f.get_slice("model.layers.0.mlp.down_proj.qweight")
        assert qweight.get_dtype() == "U8" and qweight.get_shape() == [576, 1536 * container // 8]
        assert "lm_head.weight" not in f.keys() and "model.layers.0.mlp.down_proj.weight" not in f.keys()

    reloaded = checkpoint.load(folder)
    assert reloaded.record["quantization"]["scheme"]["bits"] == bits
    for name, linear in block_linears(reloaded.model).items():
        assert torch.equal(linear.weight, linears[name].weight), name
        assert torch.equal(reloaded.weights[name].codes, quantized.weights[name].codes)
    assert torch.equal(_logits(reloaded.model, reloaded.tokenizer), q_logits)


def test_partial_groups_cannot_be_written_as_olive(default_model: LoadedModel, tmp_path: Path) -> None:
    # hidden size 576 is not a multiple of 128: the builder's layout has no room for a partial group
    quantized = quantize(default_model.model, make_config("rtn", QuantScheme(bits=4, group_size=128)))
    with pytest.raises(CheckpointError, match="not a multiple of group size 128"):
        checkpoint.save(quantized, default_model.tokenizer, default_model.ref, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
