"""GGUF in, exactly: a GGUF file's quantized blocks carried into our codes instead of re-quantized.

Every common llama.cpp block is a scale times an integer code around a zero point, some plus a
per-block minimum; each maps onto MatMulNBits' layout without rounding (the minimum as a per-group
offset, which the export adds beside the node). The codes are shifted so that each group's zero point
is the container's middle, MatMulNBits' default, which the graph then does not store:

    type   weights = ...                 code bits      group  stored code   zero  offset
    Q4_0   d·(q − 8)                     4-bit          32     q             8     -
    Q4_1   d·q + m                       4-bit          32     q             8     m + 8d
    Q5_0   d·(q − 16)                    5-bit          32     q             16    -
    Q5_1   d·q + m                       5-bit          32     q             16    m + 16d
    Q8_0   d·q (q signed)                8-bit          32     q + 128       128   -
    Q4_K   (d·sc)·q − dmin·mn            4-bit          32     q             8     −dmin·mn + 8·d·sc
    Q5_K   (d·sc)·q − dmin·mn            5-bit          32     q             16    −dmin·mn + 16·d·sc
    Q6_K   (d·sc)·(q − 32)               8-bit          16     q + 96        128   -

(a group whose shifted offset is not exact in float32 keeps its offset and takes the shift as its
zero point instead, see `to_codes`.) 5-bit codes travel in one 8-bit node (8.5 bits a weight with
float16 scales), or with `five_bit="planes"` as a 4-bit node plus a 2-bit node (7 bits, packing.py):
the file's own size, but onnxruntime's 2-bit CPU kernel is its slowest. On Qwen2.5-Coder-0.5B's
Q4_K_M file (mostly Q5_0) the planes make a 485 MB bundle against 530, and decode 14% and prefill
50% slower on this 2-core x86 host (docs/results/qwen2.5-coder-0.5b/frontier.md).
The float operations are llama.cpp's own (gguf-py's dequantizers compute the same), so each weight
dequantizes to the value transformers reads from the file, which the method checks tensor by tensor.
A tensor of any other type (float, the i-quants, Q2_K/Q3_K) is re-quantized by RTN in the method's
scheme; the build's summary, REPORT.md and manifest say which and why.

A file may hold the vocabulary table twice, rounded two ways (Qwen2.5's tied table: the output Q8_0,
the lookup Q5_0). Where each value of the two lies within a step of each other's, the bundle keeps the
finer one for both uses and stores it once: the lookup then reads the original table more closely than
the file's coarser copy, and the bundle saves a table (145 MB on Qwen2.5-Coder-0.5B).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import gguf
import numpy as np
import torch
from gguf.quants import Q4_K
from torch import nn
from transformers import PreTrainedModel

from faq_deploy.architectures import block_linears, packed_units
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.progress import progress
from faq_deploy.quant.gguf_index import GgufIndex, GgufTensor
from faq_deploy.quant.packing import exact_in_float16
from faq_deploy.quant.quantizer import ROWS_PER_SLICE, QuantizedWeight, quantize_linear_, widened
from faq_deploy.quant.scheme import MethodConfig, QuantScheme

T = gguf.GGMLQuantizationType
# Vocabulary tables by module name: their codes go to the export's table nodes, not the builder.
TABLES = ("lm_head", "model.embed_tokens")
FIVE_BIT_FORMS = ("8bit", "planes")


@dataclass(frozen=True)
class GgufConfig(MethodConfig):
    """`source`: the GGUF file the model was read from; `scheme`: the RTN fallback for tensors without
    an exact form; `five_bit`: how 5-bit blocks travel, in one 8-bit node ("8bit") or as a 4-bit and a
    2-bit node ("planes"). `fallbacks` (module → why the file has no exact codes for it) and
    `shared_table` (the table whose copy serves both vocabulary uses) are what `planned` found in the
    file, so the checkpoint and the manifest record what the build did."""

    method: ClassVar[str] = "gguf"
    source: str = ""
    five_bit: str = "8bit"  # one of FIVE_BIT_FORMS
    fallbacks: dict[str, str] = field(default_factory=dict)
    shared_table: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.five_bit not in FIVE_BIT_FORMS:
            raise InvalidQuantConfig(f"five_bit={self.five_bit!r} is not a form", f"use {' or '.join(FIVE_BIT_FORMS)}")

    @property
    def notes(self) -> list[str]:
        rtn = f"re-quantized by RTN w{self.scheme.bits} g{self.scheme.group_size}"
        notes = [f"{name}: {why}; " + ("the export's table option applies" if name in TABLES else rtn)
                 for name, why in self.fallbacks.items()]
        if self.shared_table:
            other = next(name for name in TABLES if name != self.shared_table)
            notes.append(f"{other}: the file holds the vocabulary table twice, rounded two ways; the finer copy "
                         f"({self.shared_table}'s) serves both and is stored once")
        return notes


@dataclass(frozen=True)
class Form:
    """How one block type lands in MatMulNBits: code bits, group, `decode`: blocks uint8
    [B, type bytes] → codes [B, weights], scales and offsets [B, groups], and `zero`: the codes' own
    zero point (a type without offsets) or the middle of their range (with offsets)."""

    bits: int
    group: int
    zero: int
    decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def _half(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields [B, 2] → float32 [B, 1]."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(raw: np.ndarray) -> np.ndarray:
    """[B, n] bytes → [B, 2n]: the low nibbles (first half of the block), then the high ones."""
    return np.concatenate([raw & 0x0F, raw >> 4], axis=-1)


def _high_bits(raw: np.ndarray) -> np.ndarray:
    """[B, 4] bytes of a 32-bit mask → [B, 32]: bit j belongs to weight j."""
    return np.unpackbits(raw, axis=-1, bitorder="little")


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    return _nibbles(b[:, 2:18]), _half(b[:, 0:2]), None


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles(b[:, 4:20]), _half(b[:, 0:2]), _half(b[:, 2:4])


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    return _nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6]) << 4), _half(b[:, 0:2]), None


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8]) << 4), _half(b[:, 0:2]), _half(b[:, 2:4])


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    codes = np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.int16) + 128
    return codes.astype(np.uint8), _half(b[:, 0:2]), None


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K headers → the 8 sub-blocks' scales d·sc and offsets −dmin·mn, float32 [B, 8]."""
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return _half(b[:, 0:2]) * sc.astype(np.float32), -(_half(b[:, 2:4]) * mn.astype(np.float32))


def _k_low(qs: np.ndarray) -> np.ndarray:
    """The 128 bytes of low nibbles → [B, 8, 32]: each 32-byte run holds two sub-blocks, low then high."""
    return (qs.reshape(len(qs), 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales, offsets = _k_scales(b)
    return _k_low(b[:, 16:144]).reshape(len(b), -1), scales, offsets


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales, offsets = _k_scales(b)
    high = (b[:, 16:48].reshape(len(b), 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    return (_k_low(b[:, 48:176]).reshape(len(b), 8, 32) | (high << 4)).reshape(len(b), -1), scales, offsets


def _q6_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, None]:
    n = len(b)
    low = (b[:, 0:128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    codes = low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)
    scales = _half(b[:, 208:210]) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    return codes.reshape(n, -1), scales, None


FORMS: dict[T, Form] = {
    T.Q4_0: Form(4, 32, 8, _q4_0), T.Q4_1: Form(4, 32, 8, _q4_1),
    T.Q5_0: Form(5, 32, 16, _q5_0), T.Q5_1: Form(5, 32, 16, _q5_1),
    T.Q8_0: Form(8, 32, 128, _q8_0),
    T.Q4_K: Form(4, 32, 8, _q4_k), T.Q5_K: Form(5, 32, 16, _q5_k),
    T.Q6_K: Form(8, 16, 32, _q6_k),
}


def to_codes(data: np.ndarray, qtype: T, shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF tensor's raw blocks (uint8 [rows, row bytes]) as our codes of the weight [N, K] = `shape`,
    dequantizing to exactly what llama.cpp computes. Its scheme is symmetric where every zero point is
    the container's default, and stores scales in float16 where every scale and offset is a float16
    value (the simple types' are; products like d·sc often are not)."""
    form = FORMS[qtype]
    n, k = shape
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    codes, scales, offsets = form.decode(np.ascontiguousarray(data).reshape(-1, block_bytes))
    groups = k // form.group
    middle = 1 << (form.bits - 1)
    codes = codes.astype(np.uint8) + np.uint8(middle - form.zero)  # q − zero = stored code − middle
    scales = scales.reshape(n, groups)
    zeros = np.full((n, groups), middle, dtype=np.uint8)
    if offsets is not None:
        offsets = offsets.reshape(n, groups)
        # Codes around the container's middle: at accuracy level 4 the int8 rounding of the activations
        # meets q − z, and codes all ≥ 0 add it up (default model: 92.5% next-token agreement uncentered).
        # The offset takes the shift back in each group where o + zero·s is a float32 (all of SmolLM2's
        # Q4_1): (q − zero)·s + (o + zero·s) is then the same real number, so the same float, as q·s + o.
        # Elsewhere the group keeps its offset, and its zero point undoes the codes' shift.
        shifted = offsets.astype(np.float64) + form.zero * scales.astype(np.float64)
        exact = shifted.astype(np.float32) == shifted
        offsets = np.where(exact, shifted, offsets).astype(np.float32)
        zeros[~exact] = middle - form.zero
    half = exact_in_float16(scales) and (offsets is None or exact_in_float16(offsets))
    scheme = QuantScheme(bits=form.bits, group_size=form.group, symmetric=bool(np.all(zeros == middle)),
                         offsets=offsets is not None, scale_dtype="float16" if half else "float32")
    return QuantizedWeight(
        codes=torch.from_numpy(codes.reshape(n, k)),
        scales=torch.from_numpy(np.ascontiguousarray(scales)),
        zeros=torch.from_numpy(zeros),
        scheme=scheme,
        offsets=None if offsets is None else torch.from_numpy(np.ascontiguousarray(offsets)),
    )


def _rows(weight: QuantizedWeight, rows: torch.Tensor | slice) -> QuantizedWeight:
    return QuantizedWeight(weight.codes[rows], weight.scales[rows], weight.zeros[rows], weight.scheme,
                           None if weight.offsets is None else weight.offsets[rows])


def _unpermuted_rows(n: int, heads: int) -> np.ndarray:
    """The GGUF row each Hugging Face row of a llama q/k projection is in: llama.cpp's converter
    interleaves each head's two rotary halves; transformers undoes that when it reads the file."""
    return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)


class GgufFile:
    """The tensors of a GGUF file by Hugging Face module name."""

    def __init__(self, path: str, model: PreTrainedModel) -> None:
        try:
            index = GgufIndex(path)
        except (OSError, ValueError) as exc:
            raise InvalidQuantConfig(f"cannot read the GGUF file {path}: {exc}",
                                     "pass the .gguf the model was loaded from") from exc
        self.arch = str(index.fields["general.architecture"])
        arch_id = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(self.arch)
        self.names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers) if arch_id else None
        self.tensors = index.tensors
        self.config = model.config

    def tensor(self, module: str) -> GgufTensor | str:
        """The module's tensor where it has an exact form, or why there is none."""
        if self.names is None:
            return f"the gguf package has no tensor names for architecture {self.arch!r}"
        tensor = self.tensors.get(f"{self.names.get_name(module)}.weight")
        if tensor is None and module == "lm_head" and self.config.tie_word_embeddings:
            tensor = self.tensors.get(f"{self.names.get_name('model.embed_tokens')}.weight")
        if tensor is None:
            return f"no tensor for {module} in the file"
        if tensor.tensor_type not in FORMS:
            return f"{tensor.name} is {tensor.tensor_type.name}, which has no exact MatMulNBits form"
        return tensor

    def codes(self, module: str) -> QuantizedWeight | str:
        """The module's weight as exact codes, or why there are none."""
        tensor = self.tensor(module)
        if isinstance(tensor, str):
            return tensor
        k, n = (int(d) for d in tensor.shape)
        weight = to_codes(tensor.data, tensor.tensor_type, (n, k))
        if self.arch == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = (self.config.num_attention_heads if tensor.name.endswith("attn_q.weight")
                     else self.config.num_key_value_heads)
            weight = _rows(weight, torch.from_numpy(_unpermuted_rows(n, heads)))
        return weight


def _modules(model: PreTrainedModel) -> dict[str, nn.Module]:
    """What a GGUF file holds codes for: every block Linear and both vocabulary tables."""
    return {**block_linears(model), "lm_head": model.get_output_embeddings(),
            "model.embed_tokens": model.get_input_embeddings()}


def planned(config: GgufConfig, model: PreTrainedModel, source: str | None) -> GgufConfig:
    """`config` for the GGUF file at `source`, which `model` was read from: which modules the file has
    no exact codes for, and whether its two vocabulary tables are one table rounded twice (then the
    finer copy is named to serve both). Decided before quantizing, so the record says what is done."""
    if not source:
        raise InvalidQuantConfig("--method gguf needs a GGUF model", "pass --model FILE.gguf or an embedded model")
    file = GgufFile(source, model)
    found = {name: file.tensor(name) for name in _modules(model)}
    fallbacks = {name: why for name, why in found.items() if isinstance(why, str)}
    shared = ""
    head, lookup = (found[name] for name in TABLES)
    if not isinstance(head, str) and not isinstance(lookup, str) and head.name != lookup.name:
        tables = {name: file.codes(name) for name in TABLES}
        if rounded_twice(*tables.values()):
            shared = min(TABLES, key=lambda name: tables[name].scales.abs().mean().item())
    return replace(config, source=source, fallbacks=fallbacks, shared_table=shared)


def quantize_gguf(model: PreTrainedModel, config: GgufConfig, calibration: torch.Tensor | None = None
                  ) -> dict[str, QuantizedWeight]:
    """Every block Linear, and the vocabulary tables where their GGUF form is exact, as the file's own
    codes; each checked against the weight `model` holds (transformers' dequantization of the same
    file). The modules `config` (see `planned`) names as fallbacks are re-quantized by RTN in
    `config.scheme`, or, the tables, left to the export's table options."""
    if not config.source:
        raise InvalidQuantConfig("the gguf config names no file", "plan it with gguf.planned, as quantize_loaded does")
    file = GgufFile(config.source, model)
    modules = _modules(model)
    weights: dict[str, QuantizedWeight] = {}
    for name, module in progress(modules.items(), "gguf", "tensor"):
        if name in config.fallbacks:
            if name not in TABLES:
                weights[name] = quantize_linear_(module, config.scheme)
            continue
        if name in TABLES and config.shared_table not in ("", name):
            continue  # the finer copy serves it, below
        found = file.codes(name)
        if isinstance(found, str):
            raise InvalidQuantConfig(f"{name}: {found}", "plan the config for this file (gguf.planned)")
        if not torch.equal(found.dequantize(), module.weight.detach()):
            raise InvalidQuantConfig(f"the GGUF's codes for {name} do not dequantize to the weight transformers "
                                     "read from the same file", "report this file's architecture")
        weights[name] = found
    # the tables' nodes take no second node: their 5-bit codes always travel in 8 bits
    weights = {name: widened(w) if w.scheme.bits == 5 and (config.five_bit == "8bit" or name in TABLES) else w
               for name, w in weights.items()}
    for unit in packed_units(model):  # q, k, v are one node: one width and group (Q4_K_M files mix Q4_K, Q6_K)
        if len({(weights[m].scheme.bits, weights[m].scheme.group_size) for m in unit}) > 1:
            group = min(weights[m].scheme.group_size for m in unit)
            weights.update({m: widened(weights[m], group) for m in unit})
    if config.shared_table:
        other = next(name for name in TABLES if name != config.shared_table)
        weights[other] = weights[config.shared_table]
        modules[other].weight.data.copy_(weights[other].dequantize())  # the torch model reads what ships
    for note in config.notes:
        print(f"note: {note}", file=sys.stderr)
    return weights


def rounded_twice(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    """Whether two different tables are one table rounded two ways: every pair of values within one
    step of each table (a round to nearest leaves a value within half a step of the original; Q5_0's
    clamp at its top code, within one). Two independent tables of a vocabulary differ by many steps."""
    if a.shape != b.shape or all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("codes", "scales", "zeros")):
        return False
    for start in range(0, a.shape[0], ROWS_PER_SLICE):
        rows = slice(start, start + ROWS_PER_SLICE)
        part_a, part_b = (_rows(w, rows) for w in (a, b))
        step = (part_a.scales.abs().repeat_interleave(a.scheme.group_size, dim=1)
                + part_b.scales.abs().repeat_interleave(b.scheme.group_size, dim=1))
        if not bool(((part_a.dequantize() - part_b.dequantize()).abs() <= step).all()):
            return False
    return True

