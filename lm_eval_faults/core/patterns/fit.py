"""Rates as hardware teams state them: FIT per Mbit over a deployment time, as a per-slot rate p.

A FIT is one failure per 10^9 device-hours. `fit=F` states F events per Mbit (2^20 stored bits,
as memory capacities count) per 10^9 hours, so one bit sees events at the constant rate
lambda = F / (10^9 h x 2^20). Over `hours=T` the number of events at one slot of b bits is
Poisson with mean lambda T b, and the slot is struck (at least once) with probability

    p = 1 - exp(-lambda T b)

which is what the sampler draws (a slot struck twice hits the same bits: a flip does not flip
back). b is 1 for iid bits and for the patterns with a slot per bit (burst, mcu, clustered), the
row's bits for `row:BYTES` and the line's rows for `column`: so a FIT rate counts events of any
pattern per stored Mbit.
"""

from __future__ import annotations

import math

HOURS_PER_FIT = 1e9
BITS_PER_MBIT = 2**20


def fit_to_probability(fit: float, hours: float, bits_per_slot: int = 1) -> float:
    """The probability that a slot of `bits_per_slot` bits sees an event in `hours` at `fit` FIT/Mbit."""
    events = fit * hours * bits_per_slot / (HOURS_PER_FIT * BITS_PER_MBIT)
    return -math.expm1(-events)


def expected_events(fit: float, hours: float, stored_bits: int) -> float:
    """Events expected in `stored_bits` bits over `hours` (before any two coincide)."""
    return fit * hours * stored_bits / (HOURS_PER_FIT * BITS_PER_MBIT)
