"""Activation faults drawn for many module outputs at once, before the modules run.

An activation hook draws faults for a handful of sites (one per request row, or the whole output)
at every call of every targeted module: hundreds of times per forward pass. Drawn hook by hook,
`faults.draw_faults` spends about a hundred small numpy calls on each, whatever p, and a hook runs
right after its module's matrix products have flushed the caches, where each such call costs
several times its warm microsecond: more than the faults, and at p=1e-5 most of a forward pass.
Yet where faults land and which bits they flip depend only on each site's key and size, never
on the values, and both are known before the pass starts: the keys from the stream layout, the
sizes from the previous call. So `PlannedFaults` draws the bit faults of every output of the next
pass in one vectorised pass (the counts from `CountTables`, then the sampler's own
`distinct_uniform` and `nonzero_masks`, whose draws for a site never depend on the other sites
drawn with it), and each hook only takes its slice, flips those words and counts
(`output_writes`). An output that does not match its plan draws its own (`OutputSampler.draw`).

The only place a site's draw could depend on its company is the binomial inverse CDF, whose
pmf table spans the widest site drawn with it; a count that reaches the end of the site's own
table (a uniform in the far tail, probability < 1e-30) is therefore drawn again with its own
output's sites, as before.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lm_eval_faults.core.faults.host import NO_FAULTS, FaultBatch, WordReader, draw_faults
from lm_eval_faults.core.faults.kinds import bit_fault_words
from lm_eval_faults.core.random.streams import Purpose, random_words, to_uniform
from lm_eval_faults.core.sampling.host import (
    DENSE_ABOVE,
    SMALL_MEAN,
    WINDOW_SIGMAS,
    Hits,
    distinct_uniform,
    element_rate,
    nonzero_masks,
)
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import BitLayout


class OutputSampler:
    """One spec's faults on outputs of one dtype: the element rate, and whether faults can be planned."""

    def __init__(self, spec: FaultSpec, layout: BitLayout, eligible: tuple[int, ...]) -> None:
        self.spec = spec
        self.layout = layout
        self.eligible = eligible
        self.rate = spec.rate
        self.q = element_rate(self.rate, len(eligible)) if spec.per_bit else spec.p
        """The element rate `draw_faults` hands to `bernoulli_hits`."""
        # Up to DENSE_ABOVE, `bernoulli_hits` draws a count per site first: no count, no fault.
        # A correlated pattern draws events over its own slots (`patterns`), so it is not screened.
        self.screens = 0.0 < self.q < 1.0 and self.q <= DENSE_ABOVE and spec.pattern_shape is None
        self._log_clean = math.log1p(-self.q) if self.screens else 0.0
        # Value faults and asymmetric flips depend on the old words; symmetric and stuck-at bit
        # faults do not, so they can be drawn before the module has run.
        self.plannable = self.screens and spec.per_bit and not spec.asymmetric
        self.tables = CountTables(self.q) if self.plannable else None

    def zero_probability(self, numels: np.ndarray) -> np.ndarray:
        """P(no fault) per site, exactly as `sampling.fault_counts` computes it (numpy's exp, not math's)."""
        return np.exp(numels * self._log_clean)

    def draw(self, numels: np.ndarray, keys: np.ndarray, p_zero: np.ndarray, read_words: WordReader) -> FaultBatch:
        """`draw_faults(numels, keys, read_words, ...)` for one output; `p_zero` from `zero_probability`.

        Most calls at small p end at the first comparison: no site's COUNT uniform reaches P(0).
        """
        if self.screens and not (to_uniform(random_words(keys, Purpose.COUNT, 0)) >= p_zero).any():
            return NO_FAULTS
        return draw_faults(numels, keys, read_words, self.spec, self.layout, self.eligible)


class PlannedFaults:
    """The bit faults of many outputs of one dtype, drawn together; output g owns a contiguous run of sites.

    For each output: the flat element positions hit (within its own tensor) and each hit's bit
    mask, in the order `draw_faults` would give them; for symmetric flips, where the change is the
    mask itself, also every count of the report but the non-finite values created (`known`).
    """

    def __init__(self, sampler: OutputSampler, numels: np.ndarray, keys: np.ndarray, offsets: np.ndarray, sites: np.ndarray) -> None:
        """`numels`, `keys`, `offsets` per site; `sites[g]`: how many sites output g has."""
        assert sampler.tables is not None
        self.sampler = sampler
        first_site = np.concatenate([[0], np.cumsum(sites)])
        counts, alone = sampler.tables.counts(numels, keys)
        hits = distinct_uniform(numels, counts, keys)
        self.flat = offsets[hits.site] + hits.position
        self.masks = nonzero_masks(sampler.rate, sampler.eligible, keys[hits.site], hits.rank) if len(hits) else hits.rank
        bounds = np.searchsorted(hits.site, first_site)
        self.bounds = bounds.tolist()
        """Output g's hits are [bounds[g], bounds[g + 1])."""
        self.redraw = set(np.unique(np.searchsorted(first_site, alone, side="right") - 1).tolist())
        """Outputs to draw on their own (see the module docstring): almost always none."""
        self.flips = sampler.spec.kind.flips
        self.known = _mask_counts(self.masks, bounds, sampler.layout.width) if self.flips else {}
        """Per output with hits (flips only): hit elements, fault bits (= flipped bits), changed elements, bit histogram."""
        self.flat_list: list[int] = self.flat.tolist() if self.flips else []
        self.mask_list: list[int] = self.masks.tolist() if self.flips else []
        """Positions and masks as Python ints, for hooks that flip a CPU tensor's words from Python."""
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions and masks as int64 tensors on `device`, copied once per plan and device: hooks
        that write on a GPU slice them, so no transfer (and no wait for the device) happens per hook."""
        arrays = self._on_device.get(device)
        if arrays is None:
            arrays = self._on_device[device] = (
                torch.from_numpy(self.flat).to(device),
                torch.from_numpy(self.masks.astype(np.int64, copy=False)).to(device),
            )
        return arrays

    def batch(self, start: int, stop: int, old: np.ndarray) -> FaultBatch:
        """Hits [start, stop) of one output as `faults.draw_faults` gives them (one site), with their
        words `old` before the fault."""
        masks = self.masks[start:stop]
        hits = Hits(np.zeros(stop - start, dtype=np.int64), self.flat[start:stop], np.arange(stop - start, dtype=np.int64))
        return FaultBatch(hits, masks, old, bit_fault_words(self.sampler.spec.fault, old, masks))


def _mask_counts(masks: np.ndarray, bounds: np.ndarray, width: int) -> dict[int, tuple[int, int, int, list[int]]]:
    """Per run of hits [bounds[g], bounds[g + 1]) that is not empty: hits, set bits, non-zero masks
    and set bits per position (the runs of non-empty outputs tile the hits: one `reduceat`)."""
    present = np.flatnonzero(bounds[1:] > bounds[:-1])
    if not len(present):
        return {}
    starts = bounds[present]
    bits = np.unpackbits(masks.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :width]
    histograms = np.add.reduceat(bits, starts, axis=0, dtype=np.int64)
    nonzero = np.add.reduceat(masks != 0, starts, dtype=np.int64)
    hits = (bounds[present + 1] - starts).tolist()
    counts = zip(hits, histograms.sum(axis=1).tolist(), nonzero.tolist(), histograms.tolist(), strict=True)
    return dict(zip(present.tolist(), counts, strict=True))


MAX_TABLES = 256
"""Site sizes whose tables are kept; beyond it they are built afresh (memory stays bounded)."""


class CountTables:
    """The fault count of every site of a plan, as `sampling.fault_counts` draws it, from tables kept
    between plans.

    `fault_counts` rebuilds the binomial pmf of the widest site of every call, and that of each
    large-mean site one by one; yet a table depends only on the site's size n (and q), and a pass
    has few distinct sizes, the same from one pass to the next. Each table here is the one
    `sampling._binomial_inverse_cdf` (mean n q <= SMALL_MEAN) or
    `sampling._binomial_inverse_cdf_around_mean` builds for a site of n elements, by the same
    float64 operations in the same order, so a count is one binary search into it (a CDF is
    non-decreasing: the entries <= u are a prefix). `tests/test_activation_cost.py` holds the
    counts to `fault_counts`'.
    """

    def __init__(self, q: float) -> None:
        self.q = q
        self._log_clean = math.log1p(-q)
        self._tables: dict[int, tuple[int, np.ndarray, bool]] = {}

    def counts(self, numels: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`fault_counts(numels, q, keys)`, and the sites whose count reached the end of their small
        table, where `fault_counts` would continue the table of the widest site drawn with them
        (not theirs alone: such a site must be drawn with its own output's sites, see the module
        docstring)."""
        counts = np.zeros(len(numels), dtype=np.int64)
        u = to_uniform(random_words(keys, Purpose.COUNT, 0))
        some = np.flatnonzero(u >= np.exp(numels * self._log_clean))
        alone: list[np.ndarray] = []
        if not len(some):
            return counts, counts[:0]
        sizes = numels[some]
        for n in np.unique(sizes).tolist():
            sites = some[sizes == n]
            low, cdf, small = self._table(n)
            if small:
                found = np.searchsorted(cdf, u[sites], side="right")
                alone.append(sites[found == len(cdf)])
                counts[sites] = np.minimum(found, n)
            else:
                counts[sites] = low + np.searchsorted(cdf, u[sites] * cdf[-1], side="right")
        return counts, np.concatenate(alone) if alone else counts[:0]

    def _table(self, n: int) -> tuple[int, np.ndarray, bool]:
        table = self._tables.get(n)
        if table is None:
            if len(self._tables) >= MAX_TABLES:
                self._tables.clear()
            small = n * self.q <= SMALL_MEAN  # as fault_counts splits sites
            table = self._tables[n] = (0, self._small_table(n), True) if small else (*self._table_around_mean(n), False)
        return table

    def _small_table(self, n: int) -> np.ndarray:
        """`sampling._binomial_inverse_cdf`'s CDF row for one site of n elements."""
        q, sizes = self.q, np.array([n], dtype=np.int64)
        p_zero = np.exp(sizes * self._log_clean)
        mean = float(n) * q
        width = int(mean + 12.0 * math.sqrt(mean) + 16.0)
        k = np.arange(width - 1, dtype=np.float64)
        ratio = np.clip(sizes[:, None] - k, 0.0, None) / (k + 1.0) * (q / (1.0 - q))
        pmf = np.concatenate([p_zero[:, None], p_zero[:, None] * np.cumprod(ratio, axis=1)], axis=1)
        return np.cumsum(pmf, axis=1)[0]

    def _table_around_mean(self, n: int) -> tuple[int, np.ndarray]:
        """`sampling._binomial_inverse_cdf_around_mean`'s window: its first count and its CDF."""
        q = self.q
        mode = min(n, int((n + 1) * q))
        half = int(WINDOW_SIGMAS * math.sqrt(n * q * (1.0 - q))) + 16
        low, high = max(0, mode - half), min(n, mode + half)
        k_up = np.arange(mode, high, dtype=np.float64)
        k_down = np.arange(mode - 1, low - 1, -1, dtype=np.float64)
        log_odds = math.log(q) - math.log1p(-q)
        up = np.cumsum(np.log((n - k_up) / (k_up + 1.0)) + log_odds)
        down = np.cumsum(np.log((k_down + 1.0) / (n - k_down)) - log_odds)
        log_pmf = np.concatenate([down[::-1], [0.0], up])
        pmf = np.exp(log_pmf - log_pmf.max())
        return low, np.cumsum(pmf)
