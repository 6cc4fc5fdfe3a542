"""The exported graph on disk: loading it for edits, saving it back, and the edits every exporter shares
(its genai_config.json's session options among them).

A model folder holds model.onnx and its weights in model.onnx.data. The passes over it (tables,
accuracy levels, float16 scales, the QDQ form) share one load and one save through `edited_graph`,
and read only the tensors they change.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from itertools import chain
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from faq_deploy.errors import ExportError
from faq_deploy.export.options import ExportOptions
from faq_deploy.quant.packing import exact_in_float16, to_matmulnbits, unpack
from faq_deploy.quant.quantizer import QuantizedWeight
from faq_runtime.model import GENAI_CONFIG

MODEL_FILE = "model.onnx"
_INLINE_BYTES = 1024  # smaller tensors stay in model.onnx, as onnx's own external-data save keeps them
_COPY_BYTES = 64 << 20  # the old data file is copied across a slice at a time
OFFSETS_MATMUL = "/offsets/MatMul"  # the name's end of the MatMul that adds a node's per-group offsets


@contextmanager
def edited_graph(folder: Path) -> Iterator[onnx.ModelProto]:
    """The model in `folder`, loaded for edits in place and saved back when the block ends without error,
    so a build's passes over the graph share one load and one save. Its weights stay in the data file
    until read (`numpy_helper.to_array(tensor, base_dir=str(folder))`): the passes read a few scales and
    codes, while the float tables they replace are 1.1 GB on Qwen2.5's vocabulary."""
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    yield model
    save_graph(model, folder)


def store_scales_in_float16(graph: onnx.GraphProto, base_dir: str = "") -> int:
    """Store every float32 scales tensor of a MatMulNBits or GatherBlockQuantized node (and every
    offsets table beside one, faq_deploy.export.offsets) whose values are all exact in float16 (the
    build quantizes for float16 scales) as float16 behind a Cast to float32. onnxruntime folds the
    Cast when the session starts, so the kernels see the same float32 scales; the files shrink by half
    the scales (6.7 MB on the default model at w4 g32). `base_dir`: where tensors still in a data file
    are read from (edited_graph's folder). Returns the bytes saved."""
    init = {t.name: t for t in graph.initializer}
    names = {n.input[2] for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    names |= {n.input[1] for n in graph.node if n.op_type == "MatMul" and n.name.endswith(OFFSETS_MATMUL)}
    saved = 0
    for name in sorted(names):
        tensor = init.get(name)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(tensor, base_dir)
        if not exact_in_float16(values):
            continue
        half = values.astype(np.float16)
        graph.initializer.remove(tensor)
        graph.initializer.append(numpy_helper.from_array(half, f"{name}.float16"))
        # the Cast's output keeps the name, so every consumer (a shared table has two) reads it unchanged
        graph.node.insert(0, onnx.helper.make_node("Cast", [f"{name}.float16"], [name], name=f"{name}/Cast",
                                                   to=onnx.TensorProto.FLOAT))
        saved += half.nbytes
    return saved


def drop_default_zero_points(graph: onnx.GraphProto, base_dir: str = "") -> int:
    """Drop the zero points input of every MatMulNBits and GatherBlockQuantized node whose zero points
    are all the op's default, 2^(bits-1) (symmetric codes, a GGUF's centred blocks): the exporters
    always write them, and they cost a byte per one to four blocks (4.3 MB of a 151,936-row 8-bit
    table). `base_dir` as for `store_scales_in_float16`. Returns the bytes dropped."""
    init = {t.name: t for t in graph.initializer}
    default: dict[str, bool] = {}
    for node in (n for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")):
        name = node.input[3] if len(node.input) > 3 else ""
        if name not in init:
            continue
        if name not in default:
            attributes = {a.name: a.i for a in node.attribute}
            bits = attributes["bits"]
            # blocks per row: the lookup's scales are [rows, blocks] (its table may be a Reshape's output)
            blocks = (-(-attributes["K"] // attributes["block_size"]) if node.op_type == "MatMulNBits"
                      else init[node.input[2]].dims[-1])
            packed = numpy_helper.to_array(init[name], base_dir).reshape(-1, -(-blocks * bits // 8))
            zeros = unpack(packed, bits, blocks)
            default[name] = bool(np.all(zeros == 1 << (bits - 1)))
        if default[name]:
            node.input[3] = ""
    dropped = 0
    for name, drop in default.items():
        if drop and not any(name in n.input for n in graph.node):
            dropped += int(np.prod(init[name].dims))  # uint8
            graph.initializer.remove(init[name])
    for node in graph.node:  # an empty optional input at the end is left out altogether
        while node.input and not node.input[-1]:
            del node.input[-1]
    return dropped


def set_session_option(folder: Path, key: str, value: str | int) -> None:
    """One entry of the decoder's session_options in `folder`'s genai_config.json, which onnxruntime-genai
    and faq_runtime's Decoder both apply to their session: a field they name (intra_op_num_threads) or
    an onnxruntime config entry, a dotted key with a string value."""
    path = folder / GENAI_CONFIG
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})[key] = value
    path.write_text(json.dumps(config, indent=4))


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


def add_to_output(graph: onnx.GraphProto, node: onnx.NodeProto, term: list[onnx.NodeProto], name: str) -> None:
    """Make `node`'s output its own result plus the output of `term` (nodes computing a side term, the
    last one's output added), inserted right after it; `name` prefixes the Add node and its input."""
    output, partial = node.output[0], f"{node.output[0]}/without_{name.rsplit('/', 1)[-1]}"
    node.output[0] = partial
    at = list(graph.node).index(node) + 1
    for offset, side in enumerate([*term, onnx.helper.make_node("Add", [partial, term[-1].output[0]], [output],
                                                                name=f"{name}/Add")]):
        graph.node.insert(at + offset, side)


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


