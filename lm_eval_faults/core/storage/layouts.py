"""Bit layouts of the dtypes we can fault: which integer view, which bits are sign/exponent/mantissa.

Bit 0 is the least significant bit of the stored word; the sign bit is the most significant.
Faults act on the integer view of a tensor, so a float's bits are flipped exactly as a memory
cell would flip them, with no rounding through float arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class BitLayout:
    """How one dtype stores a value: total width and the positions of each field."""

    name: str
    dtype: torch.dtype
    int_view: torch.dtype
    width: int
    sign: tuple[int, ...]
    exponent: tuple[int, ...]
    mantissa: tuple[int, ...]
    nonfinite_bits: int | None = None
    """The bits that all read 1 exactly when a word is NaN or Inf; None: the exponent's (IEEE-like
    formats). FP8 E4M3 has no Inf and one NaN per sign, S.1111.111, so its all-ones exponent with
    any other mantissa is a finite number (256 to 448) and its mask takes the mantissa too."""

    @property
    def nonfinite_mask(self) -> int:
        """`nonfinite_bits`, or the exponent field's bits (0 for an integer layout: always finite)."""
        if self.nonfinite_bits is not None:
            return self.nonfinite_bits
        return ((1 << len(self.exponent)) - 1) << self.exponent[0] if self.exponent else 0

    @property
    def all_bits(self) -> tuple[int, ...]:
        return tuple(range(self.width))

    @property
    def is_float(self) -> bool:
        return bool(self.exponent)

    def field(self, name: str) -> tuple[int, ...]:
        """Bit positions of a named field, with an error that lists what this dtype has."""
        fields = {"all": tuple(range(self.width)), **({"sign": self.sign} if self.sign else {})}  # packed codes have none
        if self.is_float:
            fields.update(exponent=self.exponent, exponent_msb=self.exponent[-1:], mantissa=self.mantissa)
        if name not in fields:
            raise ValueError(
                f"bits={name!r} does not exist in {self.name}; valid names: {', '.join(fields)}, or positions 0-{self.width - 1}"
            )
        return fields[name]


def _float_layout(
    name: str, dtype: torch.dtype, int_view: torch.dtype, exp_bits: int, man_bits: int, nonfinite_bits: int | None = None
) -> BitLayout:
    width = 1 + exp_bits + man_bits
    return BitLayout(
        name=name,
        dtype=dtype,
        int_view=int_view,
        width=width,
        sign=(width - 1,),
        exponent=tuple(range(man_bits, man_bits + exp_bits)),
        mantissa=tuple(range(man_bits)),
        nonfinite_bits=nonfinite_bits,
    )


def _int_layout(name: str, dtype: torch.dtype, int_view: torch.dtype, width: int, signed: bool) -> BitLayout:
    value_bits = tuple(range(width - 1)) if signed else tuple(range(width))
    return BitLayout(name, dtype, int_view, width, (width - 1,) if signed else (), (), value_bits)


LAYOUTS: dict[torch.dtype, BitLayout] = {
    layout.dtype: layout
    for layout in (
        _float_layout("float32", torch.float32, torch.int32, 8, 23),
        _float_layout("float16", torch.float16, torch.int16, 5, 10),
        _float_layout("bfloat16", torch.bfloat16, torch.int16, 8, 7),
        _int_layout("int8", torch.int8, torch.int8, 8, signed=True),
        _int_layout("uint8", torch.uint8, torch.uint8, 8, signed=False),
    )
}


FIELD_LAYOUTS: dict[str, BitLayout] = {
    layout.name: layout
    for layout in (
        BitLayout("int4x2", torch.uint8, torch.uint8, 8, (), (), ()),
        BitLayout("uint4", torch.uint8, torch.uint8, 4, (), (), tuple(range(4))),
        BitLayout("e8m0", torch.uint8, torch.uint8, 8, (), tuple(range(8)), ()),
        BitLayout("e2m1x2", torch.uint8, torch.uint8, 8, (), (), ()),
        BitLayout("k_scales", torch.uint8, torch.uint8, 8, (), (), ()),
        _float_layout("float8_e4m3fn", torch.float8_e4m3fn, torch.int8, 4, 3, nonfinite_bits=0x7F),
        _float_layout("float8_e5m2", torch.float8_e5m2, torch.int8, 5, 2),
    )
}
"""Words only stored fields have (a model never computes in them, so `dtype=` and activation
faults do not offer them): two 4-bit codes packed in a byte (low nibble first, as GGUF and GPTQ
pack them; NF4 packs the first code high), a 4-bit integer zero point (GPTQ's and AWQ's, one per
group, held in a byte's low nibble here: only its 4 bits are stored bits, and SECDED packs 16 of them
per 64-bit word as GPTQ packs them 8 per int32), two FP4 (E2M1) codes packed likewise, the E8M0 shared
exponent of MX blocks (a power of two; 0xFF is NaN), the bytes of Q4_K's 6-bit sub-block scales
and mins (packed as llama.cpp's `get_scale_min_k4` reads them), and the two FP8 formats (E4M3
has no Inf, and its NaN is S.1111.111; E5M2 is IEEE-like)."""


def layout_named(name: str) -> BitLayout | None:
    """The layout a fault map or report names, dtype or packed field alike."""
    return next((layout for layout in LAYOUTS.values() if layout.name == name), None) or FIELD_LAYOUTS.get(name)


def layout_of(dtype: torch.dtype) -> BitLayout:
    """The layout of `dtype`, or an error naming the dtypes that can be faulted."""
    try:
        return LAYOUTS[dtype]
    except KeyError:
        valid = ", ".join(layout.name for layout in LAYOUTS.values())
        raise TypeError(f"cannot inject bit faults into {dtype}; supported dtypes: {valid}") from None


@lru_cache(maxsize=256)
def resolve_bits(layout: BitLayout, bits: str) -> tuple[int, ...]:
    """Turn a `bits` selector ("all", "exponent", "sign+mantissa", "0-6+15") into sorted positions."""
    positions: set[int] = set()
    for part in bits.split("+"):
        part = part.strip()
        if part and (part[0].isdigit()):
            low, _, high = part.partition("-")
            first, last = int(low), int(high or low)
            if not 0 <= first <= last < layout.width:
                raise ValueError(f"bits={bits!r}: position range {part!r} is outside 0-{layout.width - 1} for {layout.name}")
            positions.update(range(first, last + 1))
        else:
            positions.update(layout.field(part))
    return tuple(sorted(positions))


def to_unsigned(words: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """Integer-view words as non-negative int64, so bit arithmetic needs no sign tricks."""
    return words.to(torch.int64) & ((1 << layout.width) - 1)


def word_value(word: int, layout: BitLayout) -> float:
    """The number a stored word (as an unsigned integer) represents in `layout`'s dtype."""
    return float(from_unsigned(torch.tensor([word]), layout).view(layout.dtype)[0])


def from_unsigned(values: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """Inverse of `to_unsigned`: wrap to the signed integer view of the layout."""
    if layout.int_view == torch.uint8:
        return values.to(torch.uint8)
    half = 1 << (layout.width - 1)
    signed = torch.where(values >= half, values - (1 << layout.width), values)
    return signed.to(layout.int_view)
