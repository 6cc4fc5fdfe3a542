"""The fallback exporter, for architectures the onnxruntime-genai builder lacks.

torch.onnx's dynamo exporter traces the checkpoint's fake-quantized model behind a wrapper with flat
KV tensors named like the builder's, so the runtime runs either graph; then every MatMul whose
constant weight belongs to a quantized Linear becomes a MatMulNBits node over our codes. The float
weights the trace saw are those codes dequantized (in float16 for a CUDA graph); they are replaced,
never re-quantized.
"""

from __future__ import annotations

import ast
import json
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache

from faq_deploy import checkpoint
from faq_deploy.architectures import head_size
from faq_deploy.errors import ExportError
from faq_deploy.export.graph import MODEL_FILE, edited_graph, replace_node
from faq_deploy.export.options import EMBEDDING_NODE, LM_HEAD_NODE, ExportOptions
from faq_deploy.quant.quantizer import QuantizedWeight
from faq_runtime.files import staged_dir
from faq_runtime.model import GENAI_CONFIG

OPSET = 23
PAST = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT = "present.%d.key", "present.%d.value"
_WRAPPED = "causal_lm"  # the wrapper's attribute: every traced name scope starts with it


class FlatKV(nn.Module):
    """`model` as the builder's graph contract: (input_ids, attention_mask, position_ids, past keys and
    values of every layer) → (logits, present keys and values), tensors only, so torch.export can trace it."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        setattr(self, _WRAPPED, model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = getattr(self, _WRAPPED)
        cache = DynamicCache(ddp_cache_data=list(zip(past[::2], past[1::2], strict=True)), config=model.config)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True)
        return out.logits, *(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values))


def export_dynamo(ckpt: Path, out: Path, options: ExportOptions) -> Path:
    """Export the checkpoint at `ckpt` into the model folder `out` (replaced atomically)."""
    loaded = checkpoint.load(ckpt)
    # traced in the graph's float type: for CUDA every op, the cache and the logits are float16
    model = loaded.model.to(getattr(torch, options.activation_dtype))
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())  # untied: the head and the table each get a node
    model.config.tie_word_embeddings = False
    with staged_dir(out) as tmp:
        _trace(model, tmp / MODEL_FILE)
        with edited_graph(tmp) as graph:
            _to_matmulnbits(graph.graph, model, loaded.weights, options.accuracy_level)
        (tmp / GENAI_CONFIG).write_text(json.dumps(genai_config(model.config, options.provider), indent=4))
        loaded.tokenizer.save_pretrained(tmp)
    return out


def _trace(model: PreTrainedModel, path: Path) -> None:
    config = model.config
    layers, kv_heads, width = config.num_hidden_layers, config.num_key_value_heads, head_size(config)
    # Example shapes only fix the rank: every axis below is dynamic (a past of 0 runs, measured). Sizes
    # of 1 would be specialised by torch.export, hence 2 new tokens after 3 cached ones.
    past = [torch.zeros(1, kv_heads, 3, width, dtype=model.dtype) for _ in range(2 * layers)]
    example = (torch.ones(1, 2, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), torch.tensor([[3, 4]]), *past)
    tokens = {0: "batch", 1: "sequence"}
    shapes = (tokens, {0: "batch", 1: "total_sequence"}, tokens, ({0: "batch", 2: "past_sequence"},) * len(past))
    names = [name % layer for layer in range(layers) for name in PAST]
    outputs = [name % layer for layer in range(layers) for name in PRESENT]
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed": its ops are not ours to export
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on axis names it merged
            torch.onnx.export(FlatKV(model).eval(), example, str(path), dynamo=True, opset_version=OPSET,
                              input_names=["input_ids", "attention_mask", "position_ids", *names],
                              output_names=["logits", *outputs], dynamic_shapes=shapes, external_data=True,
                              optimize=True, verbose=False)
    except Exception as exc:  # torch.export names the unsupported construct in its message
        first = str(exc).strip().splitlines()[0][:300]
        raise ExportError(f"torch.onnx (dynamo) could not export {type(model).__name__}: {first}",
                          "try --exporter builder, or report this model") from exc
    finally:
        registration.setLevel(level)


def _to_matmulnbits(graph: onnx.GraphProto, model: PreTrainedModel, weights: dict[str, QuantizedWeight],
                    accuracy_level: int) -> None:
    """Swap each MatMul over a quantized Linear's weight for MatMulNBits over its codes, and give the
    head's MatMul and the table's Gather the builder's names so quantize_tables finds them in either graph."""
    modules = {module: name for name, module in model.named_modules()}
    head = modules[model.get_output_embeddings()]
    table = f"{_WRAPPED}.{modules[model.get_input_embeddings()]}.weight"
    constant = {t.name for t in graph.initializer}
    for node in list(graph.node):
        if node.op_type == "Gather" and node.input[0] == table:
            node.name = EMBEDDING_NODE
        if node.op_type != "MatMul" or node.input[1] not in constant:
            continue
        module = _module_of(node)
        if module in weights:
            weight = weights[module]
            node.name = f"{module}/MatMul"  # → "<module>/MatMulNBits", the name check_codes reads
            replace_node(graph, node, weight, "MatMulNBits", module, [node.input[0]],
                         dict(K=weight.shape[1], N=weight.shape[0], accuracy_level=accuracy_level))
        elif module == head:
            node.name = LM_HEAD_NODE
    if missing := sorted(set(weights) - {n.name.rpartition("/")[0] for n in graph.node}):
        raise ExportError(f"the traced graph has no MatMul for {len(missing)} quantized modules, e.g. {missing[0]}",
                          "try --exporter builder, or report this model")


def _module_of(node: onnx.NodeProto) -> str:
    """The module a traced node came from, by the exporter's name scopes ['', 'causal_lm', …, module, op]."""
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
    if scopes is None:
        raise ExportError(f"the traced node {node.name} carries no name scope", "report the torch version")
    path = ast.literal_eval(scopes)[-2]
    return path.removeprefix(f"{_WRAPPED}.")


def genai_config(config: PretrainedConfig, provider: str) -> dict:
    """genai_config.json for the traced graph: what the runtime and onnxruntime-genai read from it
    (the provider options as the builder writes them: none for the CPU)."""
    eos = config.eos_token_id
    return {
        "model": {
            "bos_token_id": config.bos_token_id, "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
            "context_length": config.max_position_embeddings, "vocab_size": config.vocab_size,
            "type": config.model_type,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": [] if provider == "cpu" else [{provider: {}}]},
                "filename": MODEL_FILE, "head_size": head_size(config), "hidden_size": config.hidden_size,
                "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
                "num_key_value_heads": config.num_key_value_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": PAST[0], "past_value_names": PAST[1]},
                "outputs": {"logits": "logits", "present_key_names": PRESENT[0], "present_value_names": PRESENT[1]},
            },
        },
        # the traced graph concatenates past and new keys: no shared buffer
        "search": {"max_length": config.max_position_embeddings, "past_present_share_buffer": False,
                   "do_sample": False, "num_beams": 1},
    }
