"""GGUF in, exactly: a GGUF file's quantized blocks carried into our codes instead of re-quantized.

Every common llama.cpp block is a scale times an integer code around a zero point, some plus a
per-block minimum; each maps onto MatMulNBits' layout without rounding (the minimum as a per-group
offset, which the export adds beside the node):

    type   weights = ...                 container      group  zero  offset
    Q4_0   d·(q − 8)                     4-bit          32     8     -
    Q4_1   d·q + m                       4-bit          32     8     m + 8d
    Q5_0   d·(q − 16)                    8-bit          32     16    -
    Q5_1   d·q + m                       8-bit          32     16    m + 16d
    Q8_0   d·q (q signed)                8-bit          32     128   -
    Q4_K   (d·sc)·q − dmin·mn            4-bit          32     8     −dmin·mn + 8·d·sc
    Q5_K   (d·sc)·q − dmin·mn            8-bit          32     16    −dmin·mn + 16·d·sc
    Q6_K   (d·sc)·(q − 32)               8-bit          16     32    -

(codes with offsets are centred where the shifted offset is exact, see `to_codes`; else zero 0.)
The float operations are llama.cpp's own (gguf-py's dequantizers compute the same), so each weight
dequantizes to the value transformers reads from the file, which the method checks tensor by tensor.
A tensor of any other type (float, the i-quants, Q2_K/Q3_K) is re-quantized by RTN in the method's
scheme, and the build says which.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np
import torch
from gguf.quants import Q4_K
from torch import nn
from transformers import PreTrainedModel

from faq_deploy.architectures import block_linears
from faq_deploy.errors import InvalidQuantConfig
from faq_deploy.progress import progress
from faq_deploy.quant.packing import exact_in_float16
from faq_deploy.quant.quantizer import QuantizedWeight, quantize_linear_
from faq_deploy.quant.scheme import MethodConfig, QuantScheme

T = gguf.GGMLQuantizationType
# Vocabulary tables by module name: their codes go to the export's table nodes, not the builder.
TABLES = ("lm_head", "model.embed_tokens")


@dataclass(frozen=True)
class GgufConfig(MethodConfig):
    """`source`: the GGUF file the model was read from (filled in from the loaded model); `scheme`:
    the RTN fallback for tensors without an exact form."""

    method: ClassVar[str] = "gguf"
    source: str = ""


@dataclass(frozen=True)
class Form:
    """How one block type lands in MatMulNBits: container bits, group, the zero point every group has,
    `decode`: blocks uint8 [B, type bytes] → codes [B, weights], scales and offsets [B, groups], and for
    a type with offsets the middle of its codes' range (`center`)."""

    bits: int
    group: int
    zero: int
    decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    center: int = 0


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
    T.Q4_0: Form(4, 32, 8, _q4_0), T.Q4_1: Form(4, 32, 0, _q4_1, center=8),
    T.Q5_0: Form(8, 32, 16, _q5_0), T.Q5_1: Form(8, 32, 0, _q5_1, center=16),
    T.Q8_0: Form(8, 32, 128, _q8_0),
    T.Q4_K: Form(4, 32, 0, _q4_k, center=8), T.Q5_K: Form(8, 32, 0, _q5_k, center=16),
    T.Q6_K: Form(8, 16, 32, _q6_k),
}


def to_codes(data: np.ndarray, qtype: T, shape: tuple[int, int]) -> QuantizedWeight:
    """A GGUF tensor's raw blocks (uint8 [rows, row bytes]) as our codes of the weight [N, K] = `shape`,
    dequantizing to exactly what llama.cpp computes. Its scheme stores scales in float16 where every
    scale and offset is a float16 value (the simple types' are; products like d·sc often are not)."""
    form = FORMS[qtype]
    n, k = shape
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    codes, scales, offsets = form.decode(np.ascontiguousarray(data).reshape(-1, block_bytes))
    groups = k // form.group
    scales = scales.reshape(n, groups)
    zeros = np.full((n, groups), form.zero, dtype=np.uint8)
    if offsets is not None:
        offsets = offsets.reshape(n, groups)
        # Codes around their zero point: at accuracy level 4 the int8 rounding of the activations meets
        # q − z, and codes all ≥ 0 add it up (default model: 92.5% next-token agreement uncentered). The
        # offset takes the shift back in each group where o + c·s is a float32 (all of SmolLM2's Q4_1):
        # (q − c)·s + (o + c·s) is then the same real number, so the same float, as q·s + o.
        shifted = offsets.astype(np.float64) + form.center * scales.astype(np.float64)
        exact = shifted.astype(np.float32) == shifted
        offsets = np.where(exact, shifted, offsets).astype(np.float32)
        zeros[exact] = form.center
    half = exact_in_float16(scales) and (offsets is None or exact_in_float16(offsets))
    scheme = QuantScheme(bits=form.bits, group_size=form.group, offsets=offsets is not None,
                         scale_dtype="float16" if half else "float32")
    return QuantizedWeight(
        codes=torch.from_numpy(codes.reshape(n, k).astype(np.uint8)),
        scales=torch.from_numpy(np.ascontiguousarray(scales)),
        zeros=torch.from_numpy(zeros),
        scheme=scheme,
        offsets=None if offsets is None else torch.from_numpy(np.ascontiguousarray(offsets)),
    )


def _rows(weight: QuantizedWeight, order: np.ndarray) -> QuantizedWeight:
    index = torch.from_numpy(order)
    return QuantizedWeight(weight.codes[index], weight.scales[index], weight.zeros[index], weight.scheme,
                           None if weight.offsets is None else weight.offsets[index])


def _unpermuted_rows(n: int, heads: int) -> np.ndarray:
    """The GGUF row each Hugging Face row of a llama q/k projection is in: llama.cpp's converter
    interleaves each head's two rotary halves; transformers undoes that when it reads the file."""
    return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)


class GgufFile:
    """The tensors of a GGUF file by Hugging Face module name."""

    def __init__(self, path: str, model: PreTrainedModel) -> None:
        try:
            self.reader = gguf.GGUFReader(path)
        except (OSError, ValueError) as exc:
            raise InvalidQuantConfig(f"cannot read the GGUF file {path}: {exc}",
                                     "pass the .gguf the model was loaded from") from exc
        self.arch = str(self.reader.fields["general.architecture"].contents())
        arch_id = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(self.arch)
        self.names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers) if arch_id else None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = model.config

    def codes(self, module: str) -> QuantizedWeight | str:
        """The module's weight as exact codes, or why there are none."""
        if self.names is None:
            return f"the gguf package has no tensor names for architecture {self.arch!r}"
        gguf_name = self.names.get_name(module)
        tensor = self.tensors.get(f"{gguf_name}.weight")
        if tensor is None and module == "lm_head" and self.config.tie_word_embeddings:
            tensor = self.tensors.get(f"{self.names.get_name('model.embed_tokens')}.weight")
        if tensor is None:
            return f"no tensor for {module} in the file"
        if tensor.tensor_type not in FORMS:
            return f"{tensor.name} is {tensor.tensor_type.name}, which has no exact MatMulNBits form"
        k, n = (int(d) for d in tensor.shape)
        weight = to_codes(tensor.data, tensor.tensor_type, (n, k))
        if self.arch == "llama" and gguf_name.endswith(("attn_q", "attn_k")):
            heads = self.config.num_attention_heads if gguf_name.endswith("attn_q") else self.config.num_key_value_heads
            weight = _rows(weight, _unpermuted_rows(n, heads))
        return weight


def quantize_gguf(model: PreTrainedModel, config: GgufConfig, calibration: torch.Tensor | None = None
                  ) -> dict[str, QuantizedWeight]:
    """Every block Linear, and the vocabulary tables where their GGUF form is exact, as the file's own
    codes; each checked against the weight `model` holds (transformers' dequantization of the same
    file). What has no exact form is re-quantized by RTN in `config.scheme`, reported on stderr."""
    if not config.source:
        raise InvalidQuantConfig("--method gguf needs a GGUF model", "pass --model FILE.gguf or an embedded model")
    file = GgufFile(config.source, model)
    modules: dict[str, nn.Module] = {**block_linears(model), "lm_head": model.get_output_embeddings(),
                                     "model.embed_tokens": model.get_input_embeddings()}
    weights: dict[str, QuantizedWeight] = {}
    fallbacks: dict[str, str] = {}
    for name, module in progress(modules.items(), "gguf", "tensor"):
        found = file.codes(name)
        if isinstance(found, str):
            fallbacks[name] = found
            if name not in TABLES:  # a table without exact codes is left to the export's own table options
                weights[name] = quantize_linear_(module, config.scheme)
            continue
        if not torch.equal(found.dequantize(), module.weight.detach()):
            raise InvalidQuantConfig(f"the GGUF's codes for {name} do not dequantize to the weight transformers "
                                     "read from the same file", "report this file's architecture")
        weights[name] = found
    for name, why in fallbacks.items():
        print(f"note: {name}: {why}; " + ("the export's table option applies" if name in TABLES else
              f"re-quantized by RTN w{config.scheme.bits} g{config.scheme.group_size}"), file=sys.stderr)
    return weights
