"""The error-detecting and -correcting codes `ecc=` chooses, one entry each: their geometry.

How many data elements a codeword covers and how many check bits it adds is what the storage
overhead, the simulation and the exact analysis all need; each asks the entry rather than
comparing `ecc` with a name (it was compared in three modules). A new code is one entry here
plus its simulation (`schemes.WeightProtection`) and its analysis (`analysis.protected`), each
found by the code's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from lm_eval_faults.core.protection import ecc, reed_solomon
from lm_eval_faults.core.storage.layouts import BitLayout


@dataclass(frozen=True)
class EccCode:
    """A code over fixed-size data words: `data_bits` per codeword (None: one element each),
    `check_bits` added to each."""

    name: str
    description: str
    check_bits: int
    data_bits: int | None = None

    def elements_per_word(self, layout: BitLayout) -> int:
        """Elements of `layout` one codeword covers (its slots)."""
        return 1 if self.data_bits is None else self.data_bits // layout.width

    def words(self, numel: int, layout: BitLayout) -> int:
        """Codewords covering `numel` elements (the last one zero-padded)."""
        if self.data_bits is None:
            return numel
        return -(-numel * layout.width // self.data_bits)

    def overhead_bits(self, numel: int, layout: BitLayout) -> int:
        """Check bits stored for `numel` elements."""
        return self.words(numel, layout) * self.check_bits


ECC_CODES: dict[str, EccCode] = {
    code.name: code
    for code in (
        EccCode(
            "secded",
            "SECDED(72,64): 8 check bits per 64-bit word of the tensor's bytes; 1 error corrected, 2 detected; interleave=D "
            "spreads D words bit by bit over D*64 bits, so a burst of up to D bits is one error in each",
            check_bits=ecc.CHECK_BITS,
            data_bits=ecc.DATA_BITS,
        ),
        EccCode(
            "chipkill",
            "chipkill: RS(18,16) over 8-bit symbols, 2 check bytes per 16 data bytes; any error within one byte of a codeword "
            "corrected (a failing x8 chip), other errors detected or miscorrected",
            check_bits=reed_solomon.CHECK_SYMBOLS * 8,
            data_bits=reed_solomon.DATA_SYMBOLS * 8,
        ),
        EccCode("parity", "one parity bit per element: an odd number of errors is detected and the element zeroed", check_bits=1),
    )
}
