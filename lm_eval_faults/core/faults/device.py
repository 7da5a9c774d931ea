"""`faults.draw_faults` on the tensors' own device, and the weight injector's device path.

The faults of a group of sites are drawn (`device_sampling`), read, computed and written where
the tensors live; the host receives the drawn words once per group, as the `FaultBatch` the host
path would have drawn, so the undo log, the report and the fault map are built from the same
arrays either way. A parameter on a GPU thus costs no transfer per faulted tensor.

`LM_EVAL_FAULTS_DEVICE_PATH` chooses the path of weight faults: `auto` (default: this path when
a batch of sites holds a tensor off the CPU), `always` (CPU tensors too: how the tests and the
bench compare the two paths on a CPU), `never` (the host path everywhere).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lm_eval_faults.core.faults.host import NO_FAULTS, THIN_STRIDE, FaultBatch
from lm_eval_faults.core.faults.kinds import bit_fault_words
from lm_eval_faults.core.random import torch_streams as ts
from lm_eval_faults.core.random.streams import Purpose
from lm_eval_faults.core.sampling.device import DeviceHits, bernoulli_hits, nonzero_masks
from lm_eval_faults.core.sampling.host import Hits, element_rate, group_ranks
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import BitLayout, from_unsigned, to_unsigned
from lm_eval_faults.core.storage.words import flat_words

DEVICE_PATH_ENV = "LM_EVAL_FAULTS_DEVICE_PATH"
_MODES = ("auto", "always", "never")

DeviceWordReader = Callable[[DeviceHits], torch.Tensor]
"""Reads the stored words at the hits, on their device, as unsigned int64."""


def device_path_mode() -> str:
    """`LM_EVAL_FAULTS_DEVICE_PATH`, validated: auto, always or never."""
    mode = os.environ.get(DEVICE_PATH_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{DEVICE_PATH_ENV}={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def device_path_wanted(tensors: list[torch.Tensor]) -> bool:
    """Whether a batch of tensors takes the device path, by `LM_EVAL_FAULTS_DEVICE_PATH`."""
    mode = device_path_mode()
    return mode == "always" or (mode == "auto" and any(tensor.device.type != "cpu" for tensor in tensors))


@dataclass(frozen=True)
class DeviceFaults:
    """The faults drawn for a group of sites, on their device: `faults.FaultBatch`'s columns.

    Asymmetric flips keep their thinned-out candidates here (no host round trip to learn how many
    survive); `to_host` drops them, as the host path does.
    """

    hits: DeviceHits
    fault_bits: torch.Tensor
    old: torch.Tensor
    new: torch.Tensor
    thinned: bool = False

    def to_host(self) -> FaultBatch:
        """The batch the host path draws: one copy of each column from the device (none from the CPU)."""
        position, fault_bits, old, new = (column.cpu().numpy() for column in (self.hits.position, self.fault_bits, self.old, self.new))
        hits = Hits(np.repeat(self.hits.sites, self.hits.sizes), position, group_ranks(self.hits.sizes))
        batch = FaultBatch(hits, fault_bits, old, new)
        if not self.thinned:
            return batch
        kept = fault_bits != 0
        return FaultBatch(hits.select(kept), fault_bits[kept], old[kept], new[kept])


def draw_faults(
    numels: np.ndarray,
    keys: np.ndarray,
    read_words: DeviceWordReader,
    spec: FaultSpec,
    layout: BitLayout,
    eligible_bits: tuple[int, ...],
    device: torch.device,
) -> DeviceFaults | None:
    """`faults.draw_faults` on `device`; None where no fault landed (then nothing is read)."""
    keys = np.asarray(keys, dtype=np.uint64)
    rate = spec.rate  # per bit, or per element
    hits = bernoulli_hits(numels, element_rate(rate, len(eligible_bits)) if spec.per_bit else rate, keys, device)
    if not len(hits):
        return None
    hit_keys = ts.to_device(keys, device)[hits.site]
    if not spec.per_bit:
        old = read_words(hits)
        if spec.kind.zeroes:
            return DeviceFaults(hits, torch.zeros_like(old), old, torch.zeros_like(old))
        low, high = spec.value_range
        u = ts.to_uniform(ts.random_words(hit_keys, Purpose.VALUE, hits.rank))
        return DeviceFaults(hits, torch.zeros_like(old), old, uniform_words(low + (high - low) * u, layout))
    masks = nonzero_masks(rate, eligible_bits, hit_keys, hits.rank)
    old = read_words(hits)
    if spec.asymmetric:  # bit flips only (the spec refuses p01/p10 with another fault)
        keep = ((spec.p01 or 0.0) / rate, (spec.p10 or 0.0) / rate)
        masks = _thin_by_bit_value(masks, old, keep, eligible_bits, hit_keys, hits.rank)
        return DeviceFaults(hits, masks, old, old ^ masks, thinned=True)
    return DeviceFaults(hits, masks, old, bit_fault_words(spec.fault, old, masks))


def _thin_by_bit_value(
    masks: torch.Tensor,
    old: torch.Tensor,
    keep: tuple[float, float],
    bits: tuple[int, ...],
    hit_keys: torch.Tensor,
    rank: torch.Tensor,
) -> torch.Tensor:
    """`faults._thin_by_bit_value`: a candidate flip of a 0-bit survives w.p. keep[0], of a 1-bit keep[1].

    Draws the THIN word of every (hit, eligible bit), candidate or not, so the shapes stay fixed
    on the device; only candidates use theirs, so the result is the host path's.
    """
    keep_if_zero, keep_if_one = (torch.tensor(value, dtype=torch.float64, device=masks.device) for value in keep)
    kept = masks.clone()
    first_word = rank * THIN_STRIDE
    for bit in bits:
        candidate = (masks >> bit & 1).to(torch.bool)
        u = ts.to_uniform(ts.random_words(hit_keys, Purpose.THIN, first_word + bit))
        survive = u < torch.where((old >> bit & 1).to(torch.bool), keep_if_one, keep_if_zero)
        kept = torch.where(candidate & ~survive, kept & ~(1 << bit), kept)
    return kept


def uniform_words(values: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """`faults.uniform_words` on the values' device: float64 values stored in the layout's dtype.

    Floats are rounded to float32 first, then to the layout's dtype: that is what torch does on
    the CPU (its float16 and bfloat16 convert from float32), written out so that every device
    rounds the same way twice.
    """
    if layout.is_float:
        stored = values.to(torch.float32).to(layout.dtype).view(layout.int_view)
    else:
        info = torch.iinfo(layout.dtype)
        stored = values.round().clamp(info.min, info.max).to(layout.dtype)
    return to_unsigned(stored, layout)


@dataclass(frozen=True)
class TensorFaults:
    """A batch of parameter sites faulted on their devices: the host batch, and its writer."""

    batch: FaultBatch
    tensors: list[torch.Tensor]
    layout: BitLayout
    drawn: list[tuple[np.ndarray, DeviceFaults]]

    def write(self) -> None:
        """Store the new words on the devices: only changed words, as the host path writes."""
        for members, faults in self.drawn:
            for site, where in faults.hits.by_site():
                words = flat_words(self.tensors[members[site]], self.layout)
                index = faults.hits.position[where]
                changed = faults.old[where] != faults.new[where]
                words.scatter_(0, index, torch.where(changed, from_unsigned(faults.new[where], self.layout), words.index_select(0, index)))


def fault_tensors(
    numels: np.ndarray, keys: np.ndarray, tensors: list[torch.Tensor], spec: FaultSpec, layout: BitLayout, eligible_bits: tuple[int, ...]
) -> TensorFaults:
    """Draw the faults of parameter sites (one dtype) on each tensor's device; nothing is written yet.

    Sites on different devices are drawn apart (a site's faults do not depend on the others) and
    their batches merged in site order, as the host path orders them.
    """
    devices = [tensor.device for tensor in tensors]
    drawn: list[tuple[np.ndarray, DeviceFaults]] = []
    for device in dict.fromkeys(devices):
        members = np.array([i for i, d in enumerate(devices) if d == device], dtype=np.int64)

        def read_words(hits: DeviceHits, members: np.ndarray = members) -> torch.Tensor:
            parts = [
                to_unsigned(flat_words(tensors[members[site]], layout).index_select(0, hits.position[where]), layout)
                for site, where in hits.by_site()
            ]
            return torch.cat(parts)

        # Nothing can be drawn on the meta device: draw on the CPU, and reading a hit word raises
        # the host path's error about offloaded weights.
        draw_on = torch.device("cpu") if device.type == "meta" else device
        faults = draw_faults(numels[members], keys[members], read_words, spec, layout, eligible_bits, draw_on)
        if faults is not None:
            drawn.append((members, faults))
    return TensorFaults(_merge([(members, faults.to_host()) for members, faults in drawn]), tensors, layout, drawn)


def _merge(parts: list[tuple[np.ndarray, FaultBatch]]) -> FaultBatch:
    """One batch in site order from batches of disjoint groups of sites (`members`: each group's sites)."""
    if not parts:
        return NO_FAULTS
    site = np.concatenate([members[batch.hits.site] for members, batch in parts])
    order = np.argsort(site, kind="stable")

    def merged(name: str) -> np.ndarray:
        return np.concatenate([getattr(batch, name) for _, batch in parts])[order]

    hits = Hits(
        site[order], np.concatenate([b.hits.position for _, b in parts])[order], np.concatenate([b.hits.rank for _, b in parts])[order]
    )
    return FaultBatch(hits, merged("fault_bits"), merged("old"), merged("new"))
