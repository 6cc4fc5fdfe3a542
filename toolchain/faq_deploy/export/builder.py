"""The default exporter: onnxruntime-genai's model builder, run on an olive checkpoint.

It emits the fused graph (packed QKV, GroupQueryAttention, MatMulNBits over the checkpoint's codes)
with genai_config.json and the tokenizer; `faq_deploy.export.codes` then proves the codes arrived.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from faq_deploy.errors import ExportError
from faq_deploy.export.graph import MODEL_FILE
from faq_deploy.export.options import EMBEDDING_NODE, LM_HEAD_NODE, ExportOptions
from faq_deploy.forked import run_forked
from faq_runtime.files import staged_dir

# The builder would re-quantize the (tied) embedding and lm_head with its own 4-bit RTN; measured on
# the default model (RTN w4 g32 blocks, 4,096 eval tokens) that costs 9% perplexity (23.32 → 25.46),
# so it leaves them float and `faq_deploy.export.tables` stores our codes of them instead.
_FLOAT_NODES = f"{LM_HEAD_NODE},{EMBEDDING_NODE}"
# Widths the builder carries from a checkpoint into MatMulNBits nodes (3-bit codes in 4-bit containers; of
# 5-bit codes it sees the low four bits, faq_deploy.export.planes adds the fifth), a module's own width and
# group too (the checkpoint's overrides: a byte budget's 8-bit Linears). 8 bits checked on builder 0.18:
# our codes arrive byte for byte, level-0 logits equal torch's to 2e-6.
BUILDER_BITS = (3, 4, 5, 8)


def export_builder(checkpoint: Path, out: Path, options: ExportOptions) -> Path:
    """Run the builder on `checkpoint` into `out` (replaced atomically), in a forked copy of this
    process (faq_deploy.forked): the same graph as `python -m onnxruntime_genai.models.builder`
    writes, byte for byte, in 2 s instead of 10 on the default model."""
    from onnxruntime_genai.models import builder  # ~1 s, and only a build needs it

    with staged_dir(out) as tmp:
        args = ("", str(checkpoint), str(tmp), "int4", options.provider, str(tmp / ".cache"))
        extra = [f"accuracy_level={options.accuracy_level}", f"nodes_to_exclude={_FLOAT_NODES}"]

        def build() -> None:
            # OpenMP's worker threads do not survive a fork: a child that asks for more than one
            # thread waits for them forever in its first parallel region
            torch.set_num_threads(1)
            builder.create_model(*args, **builder.parse_extra_options(*args, extra))

        log = tmp / ".builder.log"
        failure = run_forked(build, log)
        log.unlink(missing_ok=True)
        if failure or not (tmp / MODEL_FILE).exists():
            raise ExportError(f"the onnxruntime-genai builder failed: {failure or 'no model.onnx was written'}",
                              "try --exporter dynamo, or report the model's architecture")
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return out
