"""ONNX export: an olive checkpoint → a model folder with MatMulNBits nodes.

The onnxruntime-genai model builder reads the checkpoint and emits the fused graph (packed QKV,
GroupQueryAttention, MatMulNBits) with genai_config.json and the tokenizer. We then prove that our
integer codes arrived unchanged and set each node's accuracy level from the target. Architectures
the builder lacks go through faq_deploy.dynamo instead; the table and code checks here serve both.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data
from torch import nn

from faq_deploy.errors import ExportError
from faq_deploy.fetch import staged_dir
from faq_deploy.quant.packing import MatMulNBitsWeights, to_matmulnbits
from faq_deploy.quant.quantizer import QuantizedWeight
from faq_deploy.quant.scheme import QuantScheme

MODEL_FILE = "model.onnx"
_INLINE_BYTES = 1024  # smaller tensors stay in model.onnx, as onnx's own external-data save keeps them
_COPY_BYTES = 64 << 20  # the old data file is copied across a slice at a time
# The builder would re-quantize the (tied) embedding and lm_head with its own 4-bit RTN; measured on
# the default model (RTN w4 g32 blocks, 4,096 eval tokens) that costs 9% perplexity (23.32 → 25.46),
# so they stay float: 96 MB more for SmolLM2-135M, and parity with the torch model stays exact.
_FLOAT_NODES = "/lm_head/MatMul,/model/embed_tokens/Gather"
LM_HEAD_NODE = "/lm_head/MatMul"
EMBEDDING_NODE = "/model/embed_tokens/Gather"
# The lm_head and the embedding table are then each float or our RTN in blocks of 32 at 8 or 4 bits:
# the head as MatMulNBits (the largest weight a decode step reads: 113 of 184 MB on the default
# model, float; 30 MB at 8 bits), the table as GatherBlockQuantized (only the rows of the prompt
# are read, but the whole table is resident). onnxruntime 1.23.0, the floor, runs both at both widths.
TABLE_SCHEMES = {"int8": QuantScheme(8, 32), "int4": QuantScheme(4, 32)}
TABLE_KINDS = ("float", *TABLE_SCHEMES)
# "auto": decided by the model (ExportOptions.for_model)
EMBEDDING_KINDS = ("auto", *TABLE_KINDS)
PROVIDERS = ("cpu", "cuda")
# builder: onnxruntime-genai's fused graph (the default); dynamo: torch.onnx, for what the builder lacks
EXPORTERS = ("builder", "dynamo")
# matmulnbits: onnxruntime's fused kernel; qdq: DequantizeLinear → MatMul, for TensorRT (faq_deploy.qdq)
WEIGHT_FORMATS = ("matmulnbits", "qdq")
# Nodes that `float_activations` can keep at accuracy level 0 (float activations) under a level-4 graph.
# Measured on the default model (RTN w4 g32, int8 head, 2 x86 cores; docs/results/levels.md): the int8
# head at level 0 lifts next-token agreement with the torch model from 96.0% to 97.2% and cuts decoding
# from 166 to 7 tokens/s (8-bit MatMulNBits has no fast float-activation kernel on CPU): opt-in only.
FLOAT_ACTIVATION_NODES = ("lm_head", "8bit")
# Widths the builder carries from a checkpoint into MatMulNBits nodes (3-bit codes in 4-bit containers), a
# module's own width and group too (the checkpoint's overrides: a byte budget's 8-bit Linears). 8 bits
# checked on builder 0.18: our codes arrive byte for byte, level-0 logits equal torch's to 2e-6.
BUILDER_BITS = (3, 4, 8)
# Builder node names → the checkpoint modules each node computes, concatenated along N in order.
_NODE = re.compile(r"/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul")
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_PREFIX = {"attn": "self_attn", "mlp": "mlp"}


@dataclass(frozen=True)
class ExportOptions:
    exporter: str = "builder"  # one of EXPORTERS
    provider: str = "cpu"
    accuracy_level: int = 4  # 4: int8 activations, the fast CPU path; 0: float activations
    lm_head: str = "int8"    # one of TABLE_KINDS
    embedding: str = "int8"  # one of EMBEDDING_KINDS
    weights: str = "matmulnbits"  # one of WEIGHT_FORMATS
    float_activations: tuple[str, ...] = ()  # of FLOAT_ACTIVATION_NODES: kept at level 0

    def __post_init__(self) -> None:
        for part, value, choices in (("lm_head kind", self.lm_head, TABLE_KINDS),
                                     ("embedding kind", self.embedding, EMBEDDING_KINDS),
                                     ("exporter", self.exporter, EXPORTERS),
                                     ("weight format", self.weights, WEIGHT_FORMATS),
                                     ("execution provider", self.provider, PROVIDERS)):
            if value not in choices:
                raise ExportError(f"unknown {part} {value!r}", f"use one of {', '.join(choices)}")
        for node in self.float_activations:
            if node not in FLOAT_ACTIVATION_NODES:
                raise ExportError(f"unknown node kind {node!r} for float activations",
                                  f"use {' or '.join(FLOAT_ACTIVATION_NODES)}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ExportError(f"accuracy_level {self.accuracy_level} is not 0–4", "use 4 (int8) or 0 (float)")
        if self.float_activations and self.weights == "qdq":
            raise ExportError("a QDQ graph has no per-node accuracy level (onnxruntime's CPU provider sets one "
                              "for the whole session)", "drop --float-activations, or build MatMulNBits weights")

    def for_model(self, model: nn.Module) -> ExportOptions:
        """These options with an "auto" embedding decided by `model`: a table tied to the head is stored
        as the head is (one table then serves both), an untied one as int4. The lookup reads one row a
        token, so its rounding costs little: on Qwen2.5-Coder-0.5B's untied 151,936 x 896 table int4
        instead of int8 costs 0.08% perplexity on held-out speeches and 0.03% on the Bible, and saves
        70 MB (docs/results/qwen2.5-coder-0.5b/tables.md)."""
        if self.embedding != "auto":
            return self
        tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
        return replace(self, embedding=self.lm_head if tied else "int4")

    @property
    def activation_dtype(self) -> str:
        """The graph's float type: both exporters write float16 graphs for CUDA (accuracy levels are a
        CPU matter: CUDA's MatMulNBits computes in float16)."""
        return "float16" if self.provider == "cuda" else "float32"

    @property
    def scale_dtype(self) -> str:
        """The precision the graph keeps its scales in: float16 (the CUDA graph's type; MatMulNBits scales
        in float32 graphs are stored in float16 and cast at load) except for float32 QDQ graphs, whose
        DequantizeLinear takes float32 scales as TensorRT reads them."""
        return "float32" if self.weights == "qdq" and self.provider == "cpu" else "float16"

    def accuracy_level_of(self, node_name: str, bits: int) -> int:
        """The accuracy level of one MatMulNBits node: `accuracy_level` unless `float_activations`
        names its kind."""
        named = {"lm_head": node_name.startswith(LM_HEAD_NODE.rpartition("/")[0] + "/"), "8bit": bits == 8}
        return 0 if any(named[kind] for kind in self.float_activations) else self.accuracy_level


def export_builder(checkpoint: Path, out: Path, options: ExportOptions) -> Path:
    """Run the builder on `checkpoint` into `out` (replaced atomically)."""
    with staged_dir(out) as tmp:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(tmp),
               "-p", "int4", "-e", options.provider, "-c", str(tmp / ".cache"),
               "--extra_options", f"accuracy_level={options.accuracy_level}", f"nodes_to_exclude={_FLOAT_NODES}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not (tmp / MODEL_FILE).exists():
            last = (done.stderr.strip().splitlines() or ["no model.onnx was written"])[-1]
            raise ExportError(f"the onnxruntime-genai builder failed: {last}",
                              "try --exporter dynamo, or report the model's architecture")
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return out


@contextmanager
def edited_graph(folder: Path) -> Iterator[onnx.ModelProto]:
    """The model in `folder`, loaded for edits in place and saved back when the block ends without error,
    so a build's passes over the graph share one load and one save. Its weights stay in the data file
    until read (`numpy_helper.to_array(tensor, base_dir=str(folder))`): the passes read a few scales and
    codes, while the float tables they replace are 1.1 GB on Qwen2.5's vocabulary."""
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    yield model
    save_graph(model, folder)


def quantize_tables(graph: onnx.GraphProto, head: QuantizedWeight | None, embedding: QuantizedWeight | None
                    ) -> None:
    """Replace the exported float lm_head MatMul by a MatMulNBits node of `head` (at accuracy level 0
    until `set_accuracy_levels`) and the embedding Gather by a GatherBlockQuantized node of `embedding`
    (our codes; None keeps that one float). A tied pair quantized alike is stored once: the lookup
    reads the head's codes, scales and zero points (the onnxruntime-genai builder's shared_embeddings
    form), which saves a whole table, 32.7 MB of the default model's 8-bit bundle."""
    transpose = _tied_transpose(graph)
    if head is not None:  # a tied float lookup keeps the float weight through its Transpose
        node = _find(graph, LM_HEAD_NODE, "MatMul", "--lm-head float")
        replace_node(graph, node, head, "MatMulNBits", "lm_head", [node.input[0]],
                     dict(K=head.shape[1], N=head.shape[0]))
    if embedding is not None:
        node = _find(graph, EMBEDDING_NODE, "Gather", "--embedding float")
        if transpose is not None:  # the float table goes with the last node that reads it
            node.input[0] = transpose.input[0]
            graph.node.remove(transpose)
        shared = _head_initializers(graph) if head is not None and _same_table(head, embedding) else None
        replace_node(graph, node, embedding, "GatherBlockQuantized", "model.embed_tokens", [node.input[1]],
                     dict(gather_axis=0, quantize_axis=1), shared)


def _same_table(head: QuantizedWeight, embedding: QuantizedWeight) -> bool:
    return head.scheme == embedding.scheme and all(
        torch.equal(getattr(head, part), getattr(embedding, part)) for part in ("codes", "scales", "zeros"))


def _head_initializers(graph: onnx.GraphProto) -> list[str]:
    """The head's codes as the lookup's [vocab, blocks·bytes] table (a Reshape onnxruntime folds at
    load), then its scales and zero points."""
    node = _find(graph, LM_HEAD_NODE.replace("MatMul", "MatMulNBits"), "MatMulNBits", "report this")
    init = {t.name: t for t in graph.initializer}
    rows = init[node.input[1]].dims[0]
    shape, flat = f"{node.input[1]}.rows", f"{node.input[1]}.rows/output_0"
    graph.initializer.append(numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), shape))
    graph.node.insert(0, onnx.helper.make_node("Reshape", [node.input[1], shape], [flat], name=f"{shape}/Reshape"))
    return [flat, *node.input[2:4]]


def store_scales_in_float16(graph: onnx.GraphProto, base_dir: str = "") -> int:
    """Store every float32 scales tensor of a MatMulNBits or GatherBlockQuantized node whose values are
    all exact in float16 (the build quantizes for float16 scales) as float16 behind a Cast to float32.
    onnxruntime folds the Cast when the session starts, so the kernels see the same float32 scales; the
    files shrink by half the scales (6.7 MB on the default model at w4 g32). `base_dir`: where tensors
    still in a data file are read from (edited_graph's folder). Returns the bytes saved."""
    init = {t.name: t for t in graph.initializer}
    names = {n.input[2] for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    saved = 0
    for name in sorted(names):
        tensor = init.get(name)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(tensor, base_dir)
        half = values.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), values):
            continue
        graph.initializer.remove(tensor)
        graph.initializer.append(numpy_helper.from_array(half, f"{name}.float16"))
        # the Cast's output keeps the name, so every consumer (a shared table has two) reads it unchanged
        graph.node.insert(0, onnx.helper.make_node("Cast", [f"{name}.float16"], [name], name=f"{name}/Cast",
                                                   to=onnx.TensorProto.FLOAT))
        saved += half.nbytes
    return saved


def set_accuracy_levels(graph: onnx.GraphProto, options: ExportOptions) -> int:
    """Give every MatMulNBits node its level from `options`; the number of nodes left at level 0."""
    float_nodes = 0
    for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
        attributes = {a.name: a for a in node.attribute}
        level = options.accuracy_level_of(node.name, attributes["bits"].i)
        if "accuracy_level" in attributes:
            attributes["accuracy_level"].i = level
        else:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
        float_nodes += level == 0
    return float_nodes


def weight_files_bytes(folder: Path) -> int:
    """The bytes of a model folder's graph and weight files (model.onnx and its data): what a byte
    budget counts, without the tokenizer and configs."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(MODEL_FILE))


def save_graph(model: onnx.ModelProto, folder: Path) -> None:
    """model.onnx with its weights in model.onnx.data: tensors held in memory are written there, and
    those still in the folder's data file are copied across from it a slice at a time."""
    data = folder / f"{MODEL_FILE}.data"
    fresh = folder / f"{MODEL_FILE}.data.new"
    with open(fresh, "wb") as out, ExitStack() as stack:
        old = stack.enter_context(open(data, "rb")) if data.exists() else None
        # an attribute's tensor stays where it is unless it was in the old file (onnx's save keeps them inline)
        attributes = ((a.t, False) for node in model.graph.node for a in node.attribute if a.HasField("t"))
        for tensor, movable in chain(((t, True) for t in model.graph.initializer), attributes):
            offset = out.tell()
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                if old is None or info.location != data.name or info.length is None:
                    raise ExportError(f"{tensor.name} is stored in {info.location} without a length, or not in "
                                      f"{data.name}", "report this exporter's output")
                old.seek(info.offset or 0)
                for start in range(0, info.length, _COPY_BYTES):
                    out.write(old.read(min(_COPY_BYTES, info.length - start)))
            elif movable and len(tensor.raw_data) >= _INLINE_BYTES:
                out.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", offset), ("length", out.tell() - offset)):
                tensor.external_data.add(key=key, value=str(value))
    fresh.replace(data)
    onnx.save_model(model, str(folder / MODEL_FILE))


def _tied_transpose(graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The Transpose of the head's weight through which the builder's embedding Gather reads a tied
    table, if that is how this graph reads it."""
    head = _find(graph, LM_HEAD_NODE, "MatMul", "report this model's architecture")
    gather = next((n for n in graph.node if n.name == EMBEDDING_NODE and n.op_type == "Gather"), None)
    return next((n for n in graph.node if n.op_type == "Transpose" and n.input[0] == head.input[1]
                 and gather is not None and gather.input[0] == n.output[0]), None)


def _find(graph: onnx.GraphProto, name: str, op_type: str, hint: str) -> onnx.NodeProto:
    node = next((n for n in graph.node if n.name == name and n.op_type == op_type), None)
    if node is None:
        raise ExportError(f"the exported graph has no float {name} node to quantize", hint)
    return node


def replace_node(graph: onnx.GraphProto, node: onnx.NodeProto, weight: QuantizedWeight, op_type: str, prefix: str,
                 inputs: list[str], attributes: dict[str, int], stored: list[str] | None = None) -> None:
    """Swap `node` for an `op_type` node over `weight`'s packed codes, scales and zero points (both
    ops take MatMulNBits' layout: rows of blocks, low bits first), written as new initializers unless
    `stored` names ones that already hold them; its float weight goes."""
    init = {t.name: t for t in graph.initializer}
    gather = op_type == "GatherBlockQuantized"
    table = init[node.input[0] if gather else node.input[1]]
    packed = to_matmulnbits(weight)
    if stored is None:
        stored = [f"{prefix}.{op_type}.{part}" for part in ("qweight", "scales", "qzeros")]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(table.data_type)  # the scales' type is the output's
        codes = packed.b.reshape(packed.n, -1) if gather else packed.b  # [N, blocks·bytes] or [N, blocks, bytes]
        arrays = (codes, packed.scales.astype(dtype), packed.zero_points)
        for name, array in zip(stored, arrays, strict=True):
            graph.initializer.append(numpy_helper.from_array(array, name))
    ordered = [stored[0], *inputs, *stored[1:]] if gather else [*inputs, *stored]
    graph.node.insert(list(graph.node).index(node), onnx.helper.make_node(
        op_type, ordered, list(node.output), name=f"{node.name.rsplit('/', 1)[0]}/{op_type}", domain="com.microsoft",
        bits=packed.bits, block_size=packed.block_size, **attributes))
    graph.node.remove(node)
    if not any(table.name in n.input for n in graph.node):
        graph.initializer.remove(table)


def _node_modules(node_name: str) -> list[str] | None:
    """The checkpoint modules a MatMulNBits node computes: by the builder's names (q/k/v and gate/up
    fused) or the dynamo exporter's (`<module>/MatMulNBits`); None for the lm_head (`/lm_head/…`)."""
    if match := _NODE.match(node_name):
        layer, part, proj = match.groups()
        return [f"model.layers.{layer}.{_PREFIX[part]}.{p}" for p in _FUSED.get(proj, (proj,))]
    module, _, op = node_name.rpartition("/")
    return [module] if op == "MatMulNBits" and module and not module.startswith("/") else None


def check_codes(folder: Path, weights: dict[str, QuantizedWeight]) -> int:
    """Compare every MatMulNBits initializer with our packing of the same modules, byte for byte.
    Returns the number of modules checked; raises ExportError on the first difference."""
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)  # each tensor read when checked
    init = {t.name: t for t in model.graph.initializer}
    checked: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or (modules := _node_modules(node.name)) is None:
            continue
        missing = [m for m in modules if m not in weights]
        if missing:
            raise ExportError(f"{node.name} computes {', '.join(missing)}, which the checkpoint did not quantize")
        packed = [to_matmulnbits(weights[m]) for m in modules]
        expected = MatMulNBitsWeights(
            b=np.concatenate([p.b for p in packed]), scales=np.concatenate([p.scales for p in packed]),
            zero_points=np.concatenate([p.zero_points for p in packed]),
            k=packed[0].k, n=sum(p.n for p in packed), bits=packed[0].bits, block_size=packed[0].block_size)
        inputs = list(node.input) + [""] * 4
        actual = {"B": inputs[1], "scales": inputs[2], "zero_points": inputs[3]}
        for field, name in actual.items():
            want = getattr(expected, "b" if field == "B" else field)
            got = numpy_helper.to_array(init[name], base_dir=str(folder)) if name in init else None
            if got is None or got.size != want.size or not np.array_equal(got.reshape(want.shape), want):
                raise ExportError(f"{node.name}: {field} differs from the checkpoint's codes for "
                                  f"{', '.join(modules)}", "report this: the exporter changed the weights")
        checked.update(modules)
    if unexported := sorted(set(weights) - checked):
        raise ExportError(f"{len(unexported)} quantized modules have no MatMulNBits node, e.g. {unexported[0]}",
                          "report this: the exporter dropped quantized weights")
    return len(checked)
