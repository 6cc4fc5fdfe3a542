"""Decoder architectures as data: where the blocks are and which Linears each block holds.

The quantizers never branch on the model family; they ask this registry. Adding a family is
adding an entry here (and a test model of that layout in tests/).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from faq_deploy.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class Architecture:
    """How to find the quantizable Linears of one Hugging Face architecture."""

    name: str                   # config.architectures[0]
    blocks: str                 # dotted path from the CausalLM to the ModuleList of decoder blocks
    linears: tuple[str, ...]    # Linear modules inside one block, in execution order


# LLaMA's block layout is shared by Mistral and by Qwen2/Qwen3 (which add q/k/v bias and, in
# Qwen3, q/k norms: neither changes which Linears exist).
_LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("LlamaForCausalLM", "model.layers", _LLAMA_LINEARS),
        Architecture("MistralForCausalLM", "model.layers", _LLAMA_LINEARS),
        Architecture("Qwen2ForCausalLM", "model.layers", _LLAMA_LINEARS),
        Architecture("Qwen3ForCausalLM", "model.layers", _LLAMA_LINEARS),
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
