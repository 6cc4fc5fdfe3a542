"""Will a model fit in this device's memory at a given context? Weights + KV cache + overhead.

The build estimates the same sum against a target's RAM (faq_deploy.checks imports it from here);
the runtime checks it against the memory the device has *available* now, before allocating.
"""

from __future__ import annotations

from dataclasses import dataclass

# Process memory beyond the weights and KV cache: Python, onnxruntime, the tokenizer, session arenas.
# Measured: `faq-run generate` (16 tokens) on the default model's bundle peaks at 496 MB RSS, 309 MB
# more than its 187 MB of weights.
RUNTIME_OVERHEAD = 320 * 2**20
MIB = 2**20
GIB = 2**30


def kv_cache_bytes(layers: int, kv_heads: int, head_size: int, context: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for `context` positions."""
    return 2 * layers * kv_heads * head_size * context * dtype_bytes


@dataclass(frozen=True)
class MemoryFit:
    weights_bytes: int
    kv_bytes_per_token: int
    context: int
    available_bytes: int
    overhead_bytes: int = RUNTIME_OVERHEAD

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes_per_token * self.context + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.available_bytes

    @property
    def largest_context(self) -> int:
        """The most positions whose cache still fits beside the weights and overhead (0: none)."""
        room = self.available_bytes - self.weights_bytes - self.overhead_bytes
        return max(0, room // self.kv_bytes_per_token)

    def explain(self) -> str:
        return (f"needs {self.needed_bytes / MIB:,.0f} MiB (weights {self.weights_bytes / MIB:,.0f} + KV cache "
                f"{self.kv_bytes_per_token * self.context / MIB:,.0f} at {self.context} tokens + overhead "
                f"{self.overhead_bytes / MIB:,.0f}), {self.available_bytes / MIB:,.0f} MiB available")
