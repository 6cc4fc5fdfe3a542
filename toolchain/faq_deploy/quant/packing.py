"""The one owner of onnxruntime's MatMulNBits weight layout.

- B: uint8 [N, k_blocks, block·bits/8], codes packed lowest bits first, last block zero-padded.
- scales: float [N, k_blocks].
- zero_points: uint8 [N, ceil(k_blocks·bits/8)], packed the same way, each row padded to bytes.
- offsets (ours, not MatMulNBits'): float [N, k_blocks], added per block beside the node
  (faq_deploy.export.offsets).
- plane (ours): 5-bit codes q = l + 16·h keep l in the 4-bit node and h in a 2-bit node beside it
  over the same input (faq_deploy.export.planes), whose outputs add up:
  s·(l − a) + 8s·(2h + 1 − b) = s·(q − z) for a + 8b − 8 = z, with b in 1..3 and a in 0..15; a
  symmetric code (z = 16) takes a = 8 and b = 2, both nodes' default zero points.

`pack`/`unpack` are exact inverses; tests feed the arrays to a real MatMulNBits node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from faq_deploy.quant.quantizer import QuantizedWeight
from faq_deploy.quant.scheme import QuantScheme

PACKED_BITS = (2, 4, 8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., n] → uint8 [..., ceil(n·bits/8)], lowest bits first, zero-padded."""
    if bits not in PACKED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; MatMulNBits takes {PACKED_BITS}")
    per_byte = 8 // bits
    n = codes.shape[-1]
    padded = np.zeros(codes.shape[:-1] + (math.ceil(n / per_byte) * per_byte,), dtype=np.uint8)
    padded[..., :n] = codes
    slots = padded.reshape(codes.shape[:-1] + (-1, per_byte))
    # a slot at a time: numpy's reduce along an axis of two to four elements is 15 times slower
    packed = slots[..., 0].copy()
    for slot in range(1, per_byte):
        packed |= slots[..., slot] << np.uint8(slot * bits)
    return packed


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack`: the first n codes of each row."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(packed.shape[:-1] + (-1,))[..., :n]


@dataclass(frozen=True)
class MatMulNBitsWeights:
    """Inputs 1–3 and attributes of one MatMulNBits node computing A · Wᵀ for W [N, K]."""

    b: np.ndarray            # uint8 [N, k_blocks, block·bits/8]
    scales: np.ndarray       # float32 [N, k_blocks]
    zero_points: np.ndarray  # uint8 [N, ceil(k_blocks·bits/8)]
    k: int
    n: int
    bits: int                # the container's bits (3-bit codes use 4)
    block_size: int
    offsets: np.ndarray | None = None  # float32 [N, k_blocks]: a scheme with offsets
    plane: MatMulNBitsWeights | None = None  # the 2-bit node of 5-bit codes' fifth bits


def exact_in_float16(values: np.ndarray) -> bool:
    """Whether every value survives float16 unchanged (then a graph may store it in half the bytes)."""
    return bool(np.array_equal(values.astype(np.float16).astype(values.dtype), values))


def stored_bytes(n: int, k: int, scheme: QuantScheme) -> int:
    """What one weight [N, K] occupies in an exported graph's files: codes in their container (and 5-bit
    codes' plane), one scale per block and node (and one offset, with offsets) in `scheme.scale_dtype`,
    packed zero points unless all are the node's default (faq_deploy.export.graph drops those)."""
    blocks = math.ceil(k / scheme.group_size)
    scale_bytes = 2 if scheme.scale_dtype == "float16" else 4
    total = n * blocks * scale_bytes if scheme.offsets else 0
    default = scheme.symmetric and scheme.bits != 3  # 3-bit codes' zero point 4 is not the container's 8
    for bits in (scheme.container_bits, scheme.plane_bits):
        if bits:  # a node's codes, scales and zero points
            total += n * blocks * (scheme.group_size * bits // 8 + scale_bytes)
            total += 0 if default else n * math.ceil(blocks * bits / 8)
    return total


def to_matmulnbits(weight: QuantizedWeight) -> MatMulNBitsWeights:
    n, k = weight.shape
    g = weight.scheme.group_size
    k_blocks = math.ceil(k / g)
    codes = np.zeros((n, k_blocks * g), dtype=np.uint8)
    codes[:, :k] = weight.codes.numpy()
    codes = codes.reshape(n, k_blocks, g)
    zeros, scales = weight.zeros.numpy(), weight.scales.numpy().astype(np.float32)
    plane = None
    if weight.scheme.plane_bits:
        high = np.where(zeros < 8, 1, np.where(zeros < 24, 2, 3)).astype(np.uint8)
        plane = _node(2 * (codes >> 4) + 1, 8 * scales, high, weight.scheme.plane_bits, k)
        codes, zeros = codes & 0x0F, zeros + 8 - 8 * high
    return replace(_node(codes, scales, zeros, weight.scheme.container_bits, k), plane=plane,
                   offsets=None if weight.offsets is None else weight.offsets.numpy().astype(np.float32))


def _node(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, k: int) -> MatMulNBitsWeights:
    """One node's inputs from codes [N, k_blocks, block], scales and zero points [N, k_blocks]."""
    n, _, block = codes.shape
    return MatMulNBitsWeights(b=pack(codes.astype(np.uint8), bits), scales=scales,
                              zero_points=pack(zeros.astype(np.uint8), bits), k=k, n=n, bits=bits, block_size=block)


def from_matmulnbits(packed: MatMulNBitsWeights, scheme: QuantScheme) -> QuantizedWeight:
    """Inverse of `to_matmulnbits`; `scheme` supplies what the container does not (3 vs 4 bits)."""
    k_blocks = packed.scales.shape[1]
    codes = unpack(packed.b, packed.bits, packed.block_size).reshape(packed.n, -1)[:, :packed.k]
    zeros = unpack(packed.zero_points, packed.bits, k_blocks)
    if (plane := packed.plane) is not None:
        high = unpack(plane.b, plane.bits, plane.block_size).reshape(plane.n, -1)[:, :plane.k]
        codes = codes + 16 * (high >> 1)
        zeros = zeros + 8 * unpack(plane.zero_points, plane.bits, k_blocks) - 8
    return QuantizedWeight(
        codes=torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)),
        scales=torch.from_numpy(np.ascontiguousarray(packed.scales, dtype=np.float32)),
        zeros=torch.from_numpy(np.ascontiguousarray(zeros, dtype=np.uint8)),
        scheme=scheme,
        offsets=None if packed.offsets is None else torch.from_numpy(np.ascontiguousarray(packed.offsets,
                                                                                            dtype=np.float32)),
    )
