"""Writing drawn faults into a module's output tensor, and counting what they did.

The activation hooks' side of `faults.py` + `words.py`: an output is corrupted in place (or a
copy of it, when writing in place would corrupt an input too), and its module's `SiteStats` get
what `faults.count_by_site(...).add_to(...)` would add. A hook runs right after its module's
matrix products have evicted the caches, where every numpy call costs several times its warm
time, so the common case (bit flips in a CPU tensor) reads and writes the few hit words from
plain Python through the tensor's memory, with the counts that do not depend on the values
computed beforehand (`output_draws.PlannedFaults.known`).

On a GPU (or anywhere under `LM_EVAL_FAULTS_DEVICE_PATH=always`) planned faults are written where
the output lives and the counts that depend on its values are summed there too (`write_on_device`):
a plan's positions and masks go to the device once per forward pass (`PlannedFaults.on`), each
hook slices them and never waits for the device, so the hooks keep the GPU's queue full; the
counts are read once, when the report is read.
"""

from __future__ import annotations

import ctypes
import operator
from typing import Any

import numpy as np
import torch

from lm_eval_faults.core.faults.counts import becomes_nonfinite, count_by_site
from lm_eval_faults.core.faults.host import FaultBatch
from lm_eval_faults.core.faults.kinds import bit_fault_words
from lm_eval_faults.core.report import SiteStats, add_lists
from lm_eval_faults.core.storage.layouts import BitLayout, from_unsigned, to_unsigned
from lm_eval_faults.core.storage.words import WordAccess, flat_words

MANY_HITS = 64
"""Hits in one output above which numpy's fixed cost (~60-90 µs after a matrix product) beats
Python's ~1 µs per hit (a model's logits at p=1e-5 take hundreds)."""

_WORD_POINTERS: dict[int, Any] = {
    8: ctypes.POINTER(ctypes.c_uint8),
    16: ctypes.POINTER(ctypes.c_uint16),
    32: ctypes.POINTER(ctypes.c_uint32),
}


def writable(tensor: torch.Tensor, copies: int, args: tuple, kwargs: dict) -> torch.Tensor:
    """`tensor`, or a copy of it that may be corrupted in place: `copies` rows of a table shared by
    all rows (each row gets its own faults), a contiguous copy, or a clone of an output that
    aliases an input (Identity, eval-mode Dropout, views): the input may be read again (residual
    connections)."""
    if copies:
        with torch.no_grad():
            return tensor.expand(copies, *tensor.shape[1:]).contiguous()
    if not tensor.is_contiguous():
        with torch.no_grad():
            return tensor.contiguous()
    if _aliases(tensor.untyped_storage().data_ptr(), (*args, *kwargs.values())):
        with torch.no_grad():
            return tensor.clone()
    return tensor


def _aliases(storage: int, values: tuple) -> bool:
    """Whether a tensor among `values` (one level deep, as modules receive them) uses `storage`."""
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.untyped_storage().data_ptr() == storage:
                return True
        elif isinstance(value, (tuple, list)) and any(
            isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == storage for v in value
        ):
            return True
    return False


MAX_WIDTH = 32
"""The widest word: device count vectors pad their bit histogram to it, so vectors of every dtype stack."""


def on_device(target: torch.Tensor, mode: str) -> bool:
    """Whether faults in `target` are written and counted on its device (`write_on_device`), under
    `device_faults.device_path_mode()` (read once per injection: a hook has no time for it)."""
    return mode == "always" or (mode == "auto" and not target.is_cpu)


def write_on_device(target: torch.Tensor, layout: BitLayout, index: torch.Tensor, mask: torch.Tensor, fault: str) -> torch.Tensor:
    """Apply bit faults (`fault`: bitflip, stuck0 or stuck1) at flat positions `index` of contiguous
    `target`, with int64 `mask`s, both on `target`'s device. Returns the counts that depend on its
    values as one vector there: changed elements, flipped bits, non-finite values created, then the
    changed elements per bit position (`MAX_WIDTH` of them). Nothing is read back: the host never waits."""
    words = flat_words(target, layout)
    old = to_unsigned(words[index], layout)
    new = bit_fault_words(fault, old, mask)
    words[index] = from_unsigned(new, layout)
    diff = old ^ new
    shifts = torch.arange(MAX_WIDTH, device=words.device)
    histogram = ((diff[:, None] >> shifts) & 1).sum(dim=0)
    field = layout.nonfinite_mask
    created = (((new & field) == field) & ((old & field) != field)).sum() if field else histogram.new_zeros(())
    return torch.cat([(diff != 0).sum().view(1), histogram.sum().view(1), created.view(1), histogram])


def flip(target: torch.Tensor, layout: BitLayout, positions: list[int], masks: list[int], flat: np.ndarray, mask_array: np.ndarray) -> int:
    """XOR `masks` into the words of contiguous `target` at flat `positions` (ascending; the same as
    `flat` and `mask_array`, as arrays); returns the non-finite values this created.

    On the CPU and for up to MANY_HITS hits, plain Python on the tensor's memory: ~45 µs for 40
    flips right after a matrix product, against ~90 µs through a numpy view (warm: 16 against
    12 µs). Otherwise `WordAccess`.
    """
    if not target.is_cpu or len(positions) > MANY_HITS:
        access = WordAccess(target, layout)
        old = access.read(flat)
        new = old ^ mask_array
        access.write(flat, new)
        return nonfinite_created(old, new, layout)
    if positions[-1] >= target.numel():
        raise AssertionError(f"a planned fault at element {positions[-1]} of an output of shape {tuple(target.shape)}")
    words = ctypes.cast(target.data_ptr(), _WORD_POINTERS[layout.width])
    field = layout.nonfinite_mask
    created = 0
    for position, mask in zip(positions, masks, strict=True):
        old = words[position]
        new = old ^ mask
        words[position] = new
        if field and new & field == field and old & field != field:
            created += 1
    return created


def write_and_count(stats: SiteStats, access: WordAccess, flat: np.ndarray, batch: FaultBatch) -> None:
    """Write the words `batch` changed (its hits at flat positions `flat` of the output) and add its
    counts, summed over the output's sites, to its module's `stats` (`faults.count_by_site`)."""
    changed = batch.old != batch.new
    access.write(flat[changed], batch.new[changed])
    sites = int(batch.hits.site.max()) + 1
    count_by_site(batch, sites, access.layout).add_to([stats] * sites)


def add(stats: SiteStats, hits: int, fault_bits: int, changed: int, flipped: int, nonfinite: int, per_bit: list[int]) -> None:
    stats.hit_elements += hits
    stats.fault_bits += fault_bits
    stats.changed_elements += changed
    stats.flipped_bits += flipped
    stats.nonfinite_created += nonfinite
    histogram = stats.bit_histogram
    stats.bit_histogram = list(map(operator.add, histogram, per_bit)) if len(histogram) == len(per_bit) else add_lists(histogram, per_bit)


def nonfinite_created(old: np.ndarray, new: np.ndarray, layout: BitLayout) -> int:
    """Elements finite before the fault and NaN or +-Inf after it (`faults.becomes_nonfinite`)."""
    return int(np.count_nonzero(becomes_nonfinite(old, new, layout)))
