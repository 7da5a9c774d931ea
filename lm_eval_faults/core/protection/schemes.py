"""Protection schemes for stored weights, simulated exactly on the drawn fault map.

Faults are drawn exactly as without protection (protection keys are not part of the sampling
key), so a protected and an unprotected run at the same seed see the same physical faults; the
scheme then decides what the model reads. The stages run in the order the hardware applies them:

1. backed-up components (`protect=`): their tensors live in fault-free storage, so their faults
   have no effect;
2. protected bit fields (`protect_bits=`): faults in those bit positions are stored safely;
3. an error-detecting or -correcting code (`ecc=`): SECDED(72,64) over each 64-bit word of the
   tensor's bytes (bit-interleaved `interleave=` deep: `codewords.py`), chipkill RS(18,16) over
   its bytes (`reed_solomon.py`), or one parity bit per element. The check bits are memory too: bit faults hit
   them at the same rate, drawn from their own stream (`StreamKind.CHECK_BITS`), and the decoder
   sees data and check errors together (see `ecc.py`). Element faults (value, zero) corrupt the
   stored data after it was encoded, so its check bits stay intact;
4. range restriction (`clamp=weights`): each value read is clamped to the clean tensor's
   [min, max]; NaN reads as 0, clamped into that range.

Each stage is O(faults): it touches the words that faults hit, plus the other elements of the
64-bit words an ECC decoder rewrites.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lm_eval_faults.core.faults.host import NO_FAULTS, FaultBatch, draw_faults
from lm_eval_faults.core.protection import codewords, ecc
from lm_eval_faults.core.protection.codes import ECC_CODES
from lm_eval_faults.core.random.streams import StreamKind, site_key
from lm_eval_faults.core.report import PROTECTION_COUNT_FIELDS
from lm_eval_faults.core.sampling.host import POSITION_BITS, Hits  # word ids pack (site, word index) like hits
from lm_eval_faults.core.sites.targets import ModuleSite, ParamSite
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import BitLayout, from_unsigned, resolve_bits, to_unsigned
from lm_eval_faults.core.storage.words import WordAccess

_CHECK_LAYOUT = BitLayout("check bits", torch.uint8, torch.uint8, 8, (), (), tuple(range(8)))
"""Check bits drawn as 8-bit words: SECDED's 8 per data word, or parity's bit 0 per element."""


def protection_bits(spec: FaultSpec, site: ParamSite, layout: BitLayout) -> int:
    """Extra bits of storage this site's protection costs (its overhead is this over its data bits)."""
    numel = site.param.numel()
    if backed_up(spec, site):
        return numel * layout.width  # a fault-free copy of every bit
    extra = numel * len(protected_positions(spec, layout))
    if spec.ecc in ECC_CODES:
        extra += ECC_CODES[spec.ecc].overhead_bits(numel, layout)
    if "weights" in spec.clamp:
        extra += 2 * layout.width  # the clean tensor's min and max
    return extra


def protection_gaps(spec: FaultSpec, selected: Mapping[str, Sequence[ParamSite | ModuleSite]]) -> list[str]:
    """Each chosen scheme that can protect nothing under `spec`, with why: said loudly, since a
    protected run that equals the unprotected one would otherwise pass for a robust model.
    `selected` holds each site's selection; the bit and ECC schemes cover stored weights only."""
    notes = []
    weight_sites = [site for site in selected.get("weights", ()) if isinstance(site, ParamSite)]
    labels = [site.component for sites in selected.values() for site in sites]
    components = {part for label in labels for part in label.split("+")}
    if spec.protect and "all" not in spec.protect and not components & set(spec.protect):
        notes.append(
            f"protect={'+'.join(spec.protect)} protects nothing: the faulted sites are in {', '.join(sorted(components)) or 'no component'}"
        )
    if spec.protect_bits != "none" and spec.per_bit and weight_sites:
        layouts = {site.layout for site in weight_sites}
        if all(not set(protected_positions(spec, layout)) & set(resolve_bits(layout, spec.bits)) for layout in layouts):
            notes.append(f"protect_bits={spec.protect_bits} protects nothing: faults only hit bits={spec.bits}")
    weight_only = [
        key
        for key, on in (
            ("ecc", spec.ecc != "none"),
            ("protect_bits", spec.protect_bits != "none"),
            ("clamp=weights", "weights" in spec.clamp),
        )
        if on
    ]
    if spec.on_activations and weight_only:
        where = "these faults hit only activations" if not spec.on_weights else "the activation faults of this spec are not covered"
        notes.append(f"{', '.join(weight_only)} protect stored weights; {where} (use clamp=activations)")
    if "kv_cache" in spec.sites and spec.protected:
        notes.append("no protection scheme covers the KV cache: its entries' faults are not protected")
    return notes


def backed_up(spec: FaultSpec, site: ParamSite | ModuleSite) -> bool:
    """Whether `site` lives in fault-free storage: a tied tensor ("embedding+lm_head") is backed up
    when any of its components is."""
    if isinstance(site, ParamSite) and site.field_name in spec.protect_fields:
        return True  # a field of simulated storage kept in fault-free storage (`protect_fields=`)
    return "all" in spec.protect or bool(set(site.component.split("+")) & set(spec.protect))


def protected_positions(spec: FaultSpec, layout: BitLayout) -> tuple[int, ...]:
    return () if spec.protect_bits == "none" else resolve_bits(layout, spec.protect_bits)


Elements = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(site, element position, old word, new word) per faulted element, as protection rewrites them."""


@dataclass(frozen=True)
class Protected:
    """What the model reads after protection: the changed elements, and per-site counts."""

    batch: FaultBatch
    counts: dict[str, np.ndarray]


class WeightProtection:
    """Applies a spec's protection schemes to the faults drawn for one batch of sites."""

    def __init__(self, spec: FaultSpec, spec_key: bytes) -> None:
        self.spec = spec
        self._spec_key = spec_key

    def apply(self, batch: FaultBatch, sites: list[ParamSite], layout: BitLayout, access: Callable[[int], WordAccess]) -> Protected:
        """Protect `batch` (faults at `sites`, all of `layout`); `access(i)` gives site i's words."""
        counts = {name: np.zeros(len(sites), dtype=np.int64) for name in PROTECTION_COUNT_FIELDS}
        site, position, old = batch.hits.site, batch.hits.position, batch.old
        new = self._mask_storage(batch, sites, layout, counts)
        if self.spec.ecc in ECC_CODES:
            simulate = {"secded": self._secded, "parity": self._parity, "chipkill": self._codewords}[self.spec.ecc]
            simulate = self._codewords if self.spec.interleave > 1 else simulate
            site, position, old, new = simulate(site, position, old, new, sites, layout, access, counts)
        if "weights" in self.spec.clamp:
            new = self._clamp(site, old, new, sites, layout, counts)
        changed = old != new
        hits = Hits(site[changed], position[changed], np.zeros(int(changed.sum()), dtype=np.int64))
        zeros = np.zeros(len(hits), dtype=np.int64)
        return Protected(FaultBatch(hits, zeros, old[changed], new[changed]), counts)

    def _mask_storage(self, batch: FaultBatch, sites: list[ParamSite], layout: BitLayout, counts: dict[str, np.ndarray]) -> np.ndarray:
        """Stages 1 and 2: faults on backed-up sites and in protected bit fields do nothing."""
        diff = batch.old ^ batch.new
        safe = np.zeros(len(batch), dtype=np.int64)
        protected_mask = sum(1 << bit for bit in protected_positions(self.spec, layout))
        safe[:] = protected_mask
        backed = np.array([backed_up(self.spec, s) for s in sites], dtype=bool)
        safe[backed[batch.hits.site]] = (1 << layout.width) - 1
        counts["masked_bits"] += np.bincount(batch.hits.site, weights=np.bitwise_count(diff & safe), minlength=len(sites)).astype(np.int64)
        return batch.new ^ (diff & safe)

    # -- ECC ----------------------------------------------------------------------------

    def _check_faults(self, sites: list[ParamSite], numels: np.ndarray, read_check: Callable[[Hits], np.ndarray], bits: int) -> FaultBatch:
        """Bit faults in the check bits of every site (none for element faults, see the module doc)."""
        if not self.spec.per_bit:
            return NO_FAULTS
        keys = np.array([site_key(self._spec_key, s.name, StreamKind.CHECK_BITS) for s in sites], dtype=np.uint64)
        return draw_faults(numels, keys, read_check, self.spec, _CHECK_LAYOUT, tuple(range(bits))).only_changed()

    def _secded(
        self,
        site: np.ndarray,
        position: np.ndarray,
        old: np.ndarray,
        new: np.ndarray,
        sites: list[ParamSite],
        layout: BitLayout,
        access: Callable[[int], WordAccess],
        counts: dict[str, np.ndarray],
    ) -> Elements:
        per_word = ecc.DATA_BITS // layout.width
        numels = np.array([s.param.numel() for s in sites], dtype=np.int64)
        unprotected = np.array([not backed_up(self.spec, s) for s in sites], dtype=bool)

        def clean_words(word_site: np.ndarray, word: np.ndarray) -> np.ndarray:
            """The clean 64-bit data words (as int64 bit patterns) of (site, word index) pairs."""
            data = np.zeros(len(word), dtype=np.int64)
            for slot in range(per_word):
                element = word * per_word + slot
                inside = element < numels[word_site]
                for s in np.unique(word_site[inside]):
                    rows = np.flatnonzero(inside & (word_site == s))
                    data[rows] |= access(int(s)).read(element[rows]) << (slot * layout.width)
            return data

        check = self._check_faults(
            sites,
            np.where(unprotected, [ECC_CODES["secded"].words(int(n), layout) for n in numels], 0),
            lambda hits: ecc.data_syndrome(clean_words(hits.site, hits.position)),
            ecc.CHECK_BITS,
        )
        counts["check_bit_faults"] += np.bincount(check.hits.site, minlength=len(sites))
        data_ids = site << POSITION_BITS | position // per_word
        check_ids = check.hits.site << POSITION_BITS | check.hits.position
        words, inverse = np.unique(np.concatenate([data_ids, check_ids]), return_inverse=True)
        data_error = np.zeros(len(words), dtype=np.int64)
        np.bitwise_or.at(data_error, inverse[: len(data_ids)], (old ^ new) << (position % per_word * layout.width))
        check_error = np.zeros(len(words), dtype=np.int64)
        check_error[inverse[len(data_ids) :]] = check.old ^ check.new
        residual, detected, decoder_acted = ecc.decode_actions(data_error, check_error)
        word_site, word = words >> POSITION_BITS, words & ((1 << POSITION_BITS) - 1)
        erroneous = (data_error != 0) | (check_error != 0)
        outcome = {
            "detected": detected,
            "corrected": erroneous & ~detected & (residual == 0),
            "miscorrected": ~detected & (residual != 0) & decoder_acted,
            "undetected": ~detected & (residual != 0) & ~decoder_acted,
        }
        for name, where in outcome.items():
            counts[name] += np.bincount(word_site[where], minlength=len(sites))
        clean = clean_words(word_site, word)
        zeroed = detected & (self.spec.ecc_policy == "zero")
        read = np.where(zeroed, 0, clean ^ np.where(detected, data_error, residual))
        return _element_writes(word_site, word, clean, read, per_word, numels, layout)

    def _codewords(
        self,
        site: np.ndarray,
        position: np.ndarray,
        old: np.ndarray,
        new: np.ndarray,
        sites: list[ParamSite],
        layout: BitLayout,
        access: Callable[[int], WordAccess],
        counts: dict[str, np.ndarray],
    ) -> Elements:
        """Chipkill and bit-interleaved SECDED: codewords over the tensor's bit stream (`codewords`)."""
        numels = np.array([s.param.numel() for s in sites], dtype=np.int64)
        unprotected = np.array([not backed_up(self.spec, s) for s in sites], dtype=bool)

        def check_faults(check_numels: np.ndarray, read_check: Callable[[Hits], np.ndarray]) -> FaultBatch:
            check = self._check_faults(sites, np.where(unprotected, check_numels, 0), read_check, 8)
            counts["check_bit_faults"] += np.bincount(check.hits.site, minlength=len(sites))
            return check

        run = codewords.simulate(
            codewords.word_code(self.spec.ecc, self.spec.interleave),
            site,
            position,
            old ^ new,
            numels,
            layout.width,
            lambda s, positions: access(s).read(positions),
            check_faults,
            zero_detected=self.spec.ecc_policy == "zero",
        )
        for name, where in run.outcomes.items():
            counts[name] += np.bincount(where, minlength=len(sites))
        return run.site, run.element, run.old, run.new

    def _parity(
        self,
        site: np.ndarray,
        position: np.ndarray,
        old: np.ndarray,
        new: np.ndarray,
        sites: list[ParamSite],
        layout: BitLayout,
        access: Callable[[int], WordAccess],
        counts: dict[str, np.ndarray],
    ) -> Elements:
        numels = np.array([s.param.numel() for s in sites], dtype=np.int64)
        unprotected = np.array([not backed_up(self.spec, s) for s in sites], dtype=bool)

        def clean_parity(hits: Hits) -> np.ndarray:
            words = np.zeros(len(hits), dtype=np.int64)
            for s, where in hits.by_site():
                words[where] = access(s).read(hits.position[where])
            return np.bitwise_count(words).astype(np.int64) & 1  # even parity: the stored bit makes the count even

        check = self._check_faults(sites, np.where(unprotected, numels, 0), clean_parity, 1)
        counts["check_bit_faults"] += np.bincount(check.hits.site, minlength=len(sites))
        ids, inverse = np.unique(
            np.concatenate([site << POSITION_BITS | position, check.hits.site << POSITION_BITS | check.hits.position]), return_inverse=True
        )
        error = np.zeros(len(ids), dtype=np.int64)
        error[inverse[: len(site)]] = old ^ new
        check_error = np.zeros(len(ids), dtype=np.int64)
        check_error[inverse[len(site) :]] = check.old ^ check.new
        detected = (np.bitwise_count(error).astype(np.int64) + check_error) & 1 == 1
        id_site, element = ids >> POSITION_BITS, ids & ((1 << POSITION_BITS) - 1)
        counts["detected"] += np.bincount(id_site[detected], minlength=len(sites))
        counts["undetected"] += np.bincount(id_site[~detected & (error != 0)], minlength=len(sites))
        clean = np.zeros(len(ids), dtype=np.int64)
        for s in np.unique(id_site):
            rows = np.flatnonzero(id_site == s)
            clean[rows] = access(int(s)).read(element[rows])
        return id_site, element, clean, np.where(detected, 0, clean ^ error)

    # -- range restriction ------------------------------------------------------------------

    def _clamp(
        self, site: np.ndarray, old: np.ndarray, new: np.ndarray, sites: list[ParamSite], layout: BitLayout, counts: dict[str, np.ndarray]
    ) -> np.ndarray:
        """Stage 4: every faulted value read is clamped to its clean tensor's [min, max]."""
        changed = np.flatnonzero(old != new)
        if not len(changed):
            return new
        low = np.zeros(len(sites))
        high = np.zeros(len(sites))
        for s in np.unique(site[changed]).tolist():
            low[s], high[s] = clean_bounds(sites[s].param)
        values = words_to_values(new[changed], layout)
        clamped = np.clip(np.nan_to_num(values, nan=0.0, posinf=np.inf, neginf=-np.inf), low[site[changed]], high[site[changed]])
        moved = ~(clamped == values)  # NaN compares unequal: a NaN read is always clamped
        result = new.copy()
        result[changed[moved]] = values_to_words(clamped[moved], layout)
        counts["clamped"] += np.bincount(site[changed[moved]], minlength=len(sites))
        return result


def clean_bounds(param: torch.Tensor) -> tuple[float, float]:
    """The tensor's [min, max] before this injection wrote to it (range restriction's two values)."""
    low, high = param.detach().aminmax()
    return float(low), float(high)


def words_to_values(words: np.ndarray, layout: BitLayout) -> np.ndarray:
    return from_unsigned(torch.from_numpy(words), layout).view(layout.dtype).double().numpy()


def values_to_words(values: np.ndarray, layout: BitLayout) -> np.ndarray:
    """Stored words of values that are already representable in the layout's dtype (clamp bounds
    are values of the tensor, so clamping never needs rounding)."""
    return to_unsigned(torch.from_numpy(values).to(layout.dtype).view(layout.int_view), layout).numpy()


def _element_writes(
    word_site: np.ndarray, word: np.ndarray, clean: np.ndarray, read: np.ndarray, per_word: int, numels: np.ndarray, layout: BitLayout
) -> Elements:
    """Split 64-bit words (clean and as read) back into (site, element, old, new) per element."""
    element_mask = (1 << layout.width) - 1
    slots = np.arange(per_word, dtype=np.int64)
    element = (word[:, None] * per_word + slots).ravel()
    site = np.repeat(word_site, per_word)
    shift = (slots * layout.width).astype(np.uint64)
    old = ((clean.astype(np.uint64)[:, None] >> shift) & np.uint64(element_mask)).astype(np.int64).ravel()
    new = ((read.astype(np.uint64)[:, None] >> shift) & np.uint64(element_mask)).astype(np.int64).ravel()
    inside = element < numels[site]
    return site[inside], element[inside], old[inside], new[inside]
