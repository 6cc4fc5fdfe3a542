"""Tiny randomly initialised models, one per registered architecture (structure only)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

# model_type → extra config; heads 4 / kv 4 is MHA (attn-out group active), kv 2 is GQA.
TINY = {
    "LlamaForCausalLM": ("llama", {"num_key_value_heads": 2}),
    "MistralForCausalLM": ("mistral", {"num_key_value_heads": 2, "sliding_window": None}),
    "Qwen2ForCausalLM": ("qwen2", {"num_key_value_heads": 4}),
    "Qwen3ForCausalLM": ("qwen3", {"num_key_value_heads": 2, "head_dim": 16}),
}


def tiny_model(architecture: str, seed: int = 0) -> PreTrainedModel:
    model_type, extra = TINY[architecture]
    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False,
        architectures=[architecture], **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1: give them structure so folding has something to move
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand_like(param) + 0.5)
    return model.eval()


def tiny_calibration(rows: int = 4, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (rows, seq), generator=torch.Generator().manual_seed(seed))
