"""The weight quantization scheme every method shares, so comparisons are fair."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from faq_deploy.errors import InvalidQuantConfig

SUPPORTED_BITS = (2, 3, 4, 5, 8)
SCALE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class QuantScheme:
    """Groups of `group_size` consecutive input channels per output row, `bits` per code.

    Asymmetric (default): integer zero point per group. Symmetric: codes offset by 2^(bits-1), which for
    4- and 8-bit codes is MatMulNBits' default zero point, so the graph stores none.
    `scale_dtype` is the precision the scales are stored in: a float16 graph (CUDA) holds its
    MatMulNBits scales in float16, so they are rounded to it before the codes are chosen, and the
    codes, the torch model and the graph all agree on the same scales.
    `offsets`: each group also adds a float offset, (q − z)·scale + offset: the form of GGUF's blocks
    with a minimum (Q4_1, Q5_1, the K-quants), which no integer zero point can hold (quant/gguf.py);
    with `symmetric` too, the offset holds all of each group's shift.
    """

    bits: int = 4
    group_size: int = 32
    symmetric: bool = False
    scale_dtype: str = "float32"  # one of SCALE_DTYPES
    offsets: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise InvalidQuantConfig(f"bits={self.bits} is not supported",
                                     f"use one of {', '.join(map(str, SUPPORTED_BITS))}")
        g = self.group_size
        if g < 16 or g & (g - 1):
            raise InvalidQuantConfig(f"group size {g} is not a power of two ≥ 16",
                                     "use 16, 32, 64, 128 or 256")
        if self.scale_dtype not in SCALE_DTYPES:
            raise InvalidQuantConfig(f"scale dtype {self.scale_dtype!r} is not supported",
                                     f"use {' or '.join(SCALE_DTYPES)}")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def container_bits(self) -> int:
        """Bits of the MatMulNBits node that stores these codes: no kernel takes bits=3 or 5, so 3-bit
        codes travel in a 4-bit container (exact: codes < 8 are valid 4-bit codes), and 5-bit codes
        keep their low four bits there and the fifth in a second node (`plane_bits`)."""
        return 4 if self.bits in (3, 5) else self.bits

    @property
    def plane_bits(self) -> int:
        """Bits of the second MatMulNBits node beside the container, 0 for none: 5-bit codes take 4 + 2
        bits there (quant/packing.py), against 8 in one 8-bit container."""
        return 2 if self.bits == 5 else 0


ROUNDINGS = ("nearest", "gptq")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: frozen, recorded whole (with method and version) in checkpoints.

    `rounding` is how codes are chosen on the method's grid: nearest, or GPTQ's error-compensating
    rounding (quant/gptq.py) with `damp` and `act_order`, which needs calibration for any method.
    `overrides` gives modules (full names) a scheme of their own: a byte budget's mixed precision
    (quant/budget.py); every other Linear takes `scheme`.
    """

    method: ClassVar[str]
    version: ClassVar[int] = 1
    scheme: QuantScheme = field(default_factory=QuantScheme)
    rounding: str = "nearest"  # one of ROUNDINGS
    damp: float = 0.01         # gptq: fraction of the Hessian's mean diagonal added to its diagonal
    act_order: bool = False    # gptq: round the columns of largest input energy first
    overrides: dict[str, QuantScheme] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS or not 0 < self.damp <= 1:
            raise InvalidQuantConfig(f"rounding={self.rounding!r} ({'/'.join(ROUNDINGS)}) or damp={self.damp} "
                                     "(0 < damp ≤ 1) is out of range", "use --rounding gptq with --damp 0.01")

    @property
    def needs_calibration(self) -> bool:
        return self.rounding == "gptq"

    @property
    def notes(self) -> list[str]:
        """Modules the method treats apart from its rule, and why, in words for the build's report."""
        return []

    def scheme_for(self, module: str) -> QuantScheme:
        return self.overrides.get(module, self.scheme)
