"""Decoder architectures as data: where the blocks are, which Linears each block holds, and how
activation-aware scaling may move scale between them.

The quantizers never branch on the model family; they ask this registry. Adding a family is
adding an entry here (and a test model of that layout in tests/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from faq_deploy.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class ScalingGroup:
    """Linears that share one input and so one per-channel scale s (AWQ).

    `prev_op` produces that input and absorbs 1/s (a norm's weight, or a Linear's output rows);
    the `balance` Linears take ×s on their input columns; the loss of a candidate s is measured
    at the output of `inspect`. Names are relative to the decoder block.
    """

    name: str
    prev_op: str
    balance: tuple[str, ...]
    inspect: str
    residual: bool  # the input lives in the residual stream: channel c means the same in every block
    # Active only when these two modules' weights have equal shapes (see the group's comment).
    same_shape: tuple[str, str] | None = None


@dataclass(frozen=True)
class Architecture:
    """How to find and scale the quantizable Linears of one Hugging Face architecture."""

    name: str                   # config.architectures[0]
    blocks: str                 # dotted path from the CausalLM to the ModuleList of decoder blocks
    linears: tuple[str, ...]    # Linear modules inside one block, in execution order
    groups: tuple[ScalingGroup, ...]
    # Linears auto-clip leaves alone: q and k feed softmax logits, where a clipped outlier
    # changes which tokens attend to which (AutoAWQ skips them for the same reason).
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")


# LLaMA's block layout is shared by Mistral and by Qwen2/Qwen3 (which add q/k/v bias and, in
# Qwen3, q/k norms: neither changes which Linears exist).
_LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)

_LLAMA_GROUPS = (
    ScalingGroup("attn-in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 inspect="self_attn", residual=True),
    # v_proj's output rows feed o_proj's input columns one to one only when there is one value
    # head per query head; under GQA each value channel serves several heads, so scaling it would
    # need o_proj's columns of all those heads to agree (AutoAWQ's guard in awq/models/llama.py).
    ScalingGroup("attn-out", "self_attn.v_proj", ("self_attn.o_proj",), inspect="self_attn.o_proj",
                 residual=False, same_shape=("self_attn.v_proj", "self_attn.o_proj")),
    ScalingGroup("mlp-in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"),
                 inspect="mlp", residual=True),
    ScalingGroup("mlp-out", "mlp.up_proj", ("mlp.down_proj",), inspect="mlp.down_proj", residual=False),
)

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("LlamaForCausalLM", "model.layers", _LLAMA_LINEARS, _LLAMA_GROUPS),
        Architecture("MistralForCausalLM", "model.layers", _LLAMA_LINEARS, _LLAMA_GROUPS),
        Architecture("Qwen2ForCausalLM", "model.layers", _LLAMA_LINEARS, _LLAMA_GROUPS),
        Architecture("Qwen3ForCausalLM", "model.layers", _LLAMA_LINEARS, _LLAMA_GROUPS),
    )
}


def architecture_of(model: nn.Module) -> Architecture:
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise UnsupportedArchitecture(
        f"architecture {', '.join(names)} is not supported",
        f"supported: {', '.join(sorted(ARCHITECTURES))}",
    )


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(architecture_of(model).blocks)


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every quantizable Linear, keyed by its full module name (e.g. model.layers.0.mlp.up_proj)."""
    arch = architecture_of(model)
    found: dict[str, nn.Linear] = {}
    for index, block in enumerate(model.get_submodule(arch.blocks)):
        for name in arch.linears:
            found[f"{arch.blocks}.{index}.{name}"] = block.get_submodule(name)
    return found


_PACKED_TOGETHER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def packed_units(model: nn.Module) -> list[tuple[str, ...]]:
    """The Linears one exported node computes, by full name: q, k and v of a block (the
    onnxruntime-genai builder packs them into one MatMulNBits node, so they share one width and
    group), every other Linear alone."""
    arch = architecture_of(model)
    found = []
    for index in range(len(model.get_submodule(arch.blocks))):
        prefix = f"{arch.blocks}.{index}"
        found.append(tuple(f"{prefix}.{name}" for name in arch.linears if name in _PACKED_TOGETHER))
        found += [(f"{prefix}.{name}",) for name in arch.linears if name not in _PACKED_TOGETHER]
    return found


def active_groups(arch: Architecture, block: nn.Module) -> list[ScalingGroup]:
    """The scaling groups that apply to this block (shape guards resolved)."""
    return [g for g in arch.groups
            if g.same_shape is None
            or block.get_submodule(g.same_shape[0]).weight.shape == block.get_submodule(g.same_shape[1]).weight.shape]


def head_size(config: Any) -> int:
    """Per-head width of a model config: its own head_dim where it sets one (Qwen3), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
