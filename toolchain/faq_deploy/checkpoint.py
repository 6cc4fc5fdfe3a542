"""Quantized checkpoints in the pre-quantized "olive" layout the onnxruntime-genai builder reads.

A Hugging Face folder: config.json (with quantization_config), tokenizer files, and
model.safetensors holding, per quantized Linear `<name>.qweight` uint8 [N, K·bits/8] (the
MatMulNBits B rows, flattened), `<name>.scales` float32 [N, groups] and `<name>.qzeros` uint8
(packed like MatMulNBits zero points); every other tensor as float32. faq_quantization.json
records the method config whole (3-bit codes sit in a 4-bit container, so the container alone
does not say what was done) and the source model. What the olive layout has no name for goes to
faq_codes/codes.safetensors, out of the builder's sight (it reads every top-level .safetensors and
refuses names it does not know): per-group `<name>.offsets`, 5-bit codes' second node as
`<name>.plane.qweight/.scales/.qzeros`, and the vocabulary tables' codes when the method fixed them (a
GGUF's), in the same tensors per table.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from faq_deploy.data import Calibration
from faq_deploy.errors import CheckpointError
from faq_deploy.models import ModelRef
from faq_deploy.quant import QuantizedModel, describe
from faq_deploy.quant.packing import MatMulNBitsWeights, from_matmulnbits, to_matmulnbits
from faq_deploy.quant.quantizer import QuantizedWeight
from faq_deploy.quant.scheme import QuantScheme
from faq_runtime.files import staged_dir

RECORD_FILE = "faq_quantization.json"
WEIGHTS_FILE = "model.safetensors"
CODES_FILE = "faq_codes/codes.safetensors"
_QUANT_SUFFIXES = (".qweight", ".scales", ".qzeros")


@dataclass
class Checkpoint:
    """A quantized checkpoint read back: the fake-quantized model and the codes behind it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    weights: dict[str, QuantizedWeight]
    record: dict[str, Any]
    tables: dict[str, QuantizedWeight]


def is_checkpoint(path: str | os.PathLike) -> bool:
    return Path(path, RECORD_FILE).is_file()


def _olive_tensors(name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The three olive tensors of a weight, and its offsets and plane (for CODES_FILE) when it has them."""
    packed = to_matmulnbits(weight)
    return {**_node_tensors(name, packed),
            **({} if packed.offsets is None else {f"{name}.offsets": torch.from_numpy(packed.offsets)}),
            **({} if packed.plane is None else _node_tensors(f"{name}.plane", packed.plane))}


def _node_tensors(name: str, packed: MatMulNBitsWeights) -> dict[str, torch.Tensor]:
    return {f"{name}.qweight": torch.from_numpy(packed.b.reshape(packed.n, -1)),
            f"{name}.scales": torch.from_numpy(packed.scales),
            f"{name}.qzeros": torch.from_numpy(packed.zero_points)}


def save(quantized: QuantizedModel, tokenizer: PreTrainedTokenizerBase, source: ModelRef,
         out: str | os.PathLike, calibration: Calibration | None = None) -> Path:
    """Write the checkpoint atomically: `out` appears complete or not at all. Modules whose scheme is
    not the method's (a byte budget's mixed precision) are olive `overrides` of bits and group size."""
    scheme = quantized.config.scheme
    for name, weight in quantized.weights.items():
        if weight.shape[1] % weight.scheme.group_size:
            # The builder reshapes qweight as [N, K / group, ...]: a partial last group cannot travel.
            raise CheckpointError(f"{name} has {weight.shape[1]} input channels, not a multiple of "
                                  f"group size {weight.scheme.group_size}", "choose a group size that divides it")
    overrides = {name: {"bits": w.scheme.container_bits, "group_size": w.scheme.group_size}
                 for name, w in sorted(quantized.weights.items()) if w.scheme != scheme}
    model = quantized.model
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    codes = {}
    for name, weight in quantized.weights.items():
        state.pop(f"{name}.weight")
        for key, tensor in _olive_tensors(name, weight).items():  # what the olive layout names, and ours
            (state if key.removeprefix(name) in _QUANT_SUFFIXES else codes)[key] = tensor
    for name, weight in quantized.tables.items():
        codes.update(_olive_tensors(name, weight))

    out = Path(out)
    with staged_dir(out) as tmp:
        config = model.config.to_dict()
        config["quantization_config"] = {"quant_method": "olive", "bits": scheme.container_bits,
                                         "group_size": scheme.group_size, "overrides": overrides}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if codes:
            (tmp / CODES_FILE).parent.mkdir()
            save_file(codes, tmp / CODES_FILE)
        record = {"quantization": describe(quantized.config),
                  "tables": {name: asdict(w.scheme) for name, w in quantized.tables.items()},
                  "calibration": asdict(calibration) if calibration else None,
                  "modules": sorted(quantized.weights),
                  "source": {"name": source.name, "kind": source.kind, "path": source.path,
                             "sha256": source.sha256},
                  "seconds": round(quantized.seconds, 3)}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return out


def _read_weight(tensors: dict[str, torch.Tensor], name: str, k: int, scheme: QuantScheme,
                 codes: dict[str, torch.Tensor]) -> QuantizedWeight:
    """One weight from its olive tensors in `tensors`, with its offsets and plane from CODES_FILE's `codes`."""
    offsets = codes.get(f"{name}.offsets")
    plane = _read_node(codes, f"{name}.plane", k, scheme.plane_bits, scheme.group_size) if scheme.plane_bits else None
    packed = replace(_read_node(tensors, name, k, scheme.container_bits, scheme.group_size), plane=plane,
                     offsets=None if offsets is None else offsets.numpy())
    return from_matmulnbits(packed, scheme)


def _read_node(tensors: dict[str, torch.Tensor], name: str, k: int, bits: int, group: int) -> MatMulNBitsWeights:
    scales = tensors[f"{name}.scales"]
    n, k_blocks = scales.shape
    return MatMulNBitsWeights(b=tensors[f"{name}.qweight"].numpy().reshape(n, k_blocks, group * bits // 8),
                              scales=scales.numpy(), zero_points=tensors[f"{name}.qzeros"].numpy(),
                              k=k, n=n, bits=bits, block_size=group)


def load(path: str | os.PathLike) -> Checkpoint:
    """Rebuild the fake-quantized float32 model from a checkpoint written by `save`."""
    path = Path(path)
    try:
        record = json.loads((path / RECORD_FILE).read_text())
        tensors = load_file(path / WEIGHTS_FILE)
        codes = load_file(path / CODES_FILE) if (path / CODES_FILE).is_file() else {}
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the checkpoint at {path}: {exc}",
                              "re-create it with `faq-deploy quantize --out`") from exc
    raw.pop("quantization_config", None)  # transformers does not know "olive"; the codes are ours to read
    config = AutoConfig.for_model(**raw)
    with no_init_weights():  # every tensor is overwritten below; random init would cost seconds
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    q = record["quantization"]
    scheme = QuantScheme(**q["scheme"])
    overrides = {name: QuantScheme(**own) for name, own in q.get("overrides", {}).items()}
    weights: dict[str, QuantizedWeight] = {}
    for name in record["modules"]:
        linear = model.get_submodule(name)
        weights[name] = _read_weight(tensors, name, linear.in_features, overrides.get(name, scheme), codes)
        for suffix in _QUANT_SUFFIXES:
            del tensors[name + suffix]
        # into the (so far untouched) parameter itself: a model's worth of dequantized copies, or of
        # temporaries left in the allocator's heaps, would be held beside the model (2.4 GB on Qwen2.5-0.5B)
        weights[name].dequantize(out=linear.weight.data)
    # assign: the other parameters become the file's tensors instead of copies of them
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    quantized = {f"{name}.weight" for name in weights}
    missing = [m for m in missing if m not in quantized and not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}", "re-create it with `faq-deploy quantize --out`")
    model.tie_weights()
    tables = {name: _read_weight(codes, name, model.config.hidden_size, QuantScheme(**own), codes)
              for name, own in record.get("tables", {}).items()}
    return Checkpoint(model.eval(), AutoTokenizer.from_pretrained(path), weights, record, tables)
