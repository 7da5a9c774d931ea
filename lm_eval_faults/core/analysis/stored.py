"""Know before you run, under `storage=`: the expected damage of faults in a storage's fields,
computed from the stored words, field by field.

A float weight's damage is decided by its own word (`analysis.exact`). A stored weight's is
decided by several words in several fields: its code, its block's scale, min or shared exponent.
One scale word decides a whole block, and the damage depends on the decode (a scale flip scales
32 weights; a code flip moves one by a few steps). So the expectation is taken by decoding. For
each eligible bit position of a field, that bit is changed in the field's words, the blocks are
decoded, and the weights are counted that moved, moved by more than a threshold, or became NaN
or Inf.

A bit can be changed in all of a field's words at once, with every word's single fault still
measured on its own, because a weight reads one word of each field (its code, its block's
scale): each weight's change is its own word's, at the rate set by the value that word holds in
that bit. The one kind of field whose weights read several of its words (Q4_K's sub-scales,
`BlockCodec.coupled_fields`) is done one word position of the block at a time. The expected
count is the sum over stored bits of (the bit's change rate) x (what its single change does).
This is exact to first order in p. What it leaves out is a second fault landing in the same
block, whose relative weight is below p x the stored bits one weight reads
(`second_order_bound`, printed with the figures).

Cost: one decode of a field's weights per eligible bit (per word position too, for a coupled
field): q4_1 takes 40 decodes of the model, int8 24, q4_k about 130. Decoding is the format's
own (gguf's numpy codecs for the GGUF types), in chunks of blocks spread over the CPU threads;
there is no sampling and no evaluation run. On SmolLM2-135M's own Q4_1 blocks this is minutes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lm_eval_faults.core.analysis.risk import AtLeastOne, log1m
from lm_eval_faults.core.protection.schemes import backed_up, protected_positions
from lm_eval_faults.core.sites.targets import ParamSite, select_params
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError
from lm_eval_faults.core.storage.codecs import Encoding
from lm_eval_faults.core.storage.layouts import BitLayout, resolve_bits
from lm_eval_faults.core.text_table import Column, text_table

DEFAULT_CHANGE_THRESHOLD = 10.0
"""A weight counts as "huge" when a fault moves it by more than this many RMS of its tensor (a
code fault moves a weight within its block's range, a few RMS; a scale or exponent fault can
move a whole block by orders of magnitude)."""

CHUNK_WEIGHTS = 1 << 20
"""Weights decoded at a time: every decode of a chunk stays in cache-sized memory."""


@dataclass
class FieldExpectation(AtLeastOne):
    """Expected damage from faults in one stored field (or a sum of fields).

    `words` and `eligible_bits` count the field's stored words and the bits that can be hit.
    `weights` counts the weights those words serve. `faults` is the expected number of stored
    bits that change. `weights_changed`, `nan`, `inf` and `huge` are expected numbers of weights:
    changed at all; finite before and NaN / +-Inf after; finite after but moved by more than the
    threshold. `log_no_nonfinite` and `log_no_bad` are sums of log(1 - rate) over the stored bits
    whose single change makes a weight non-finite (or non-finite or huge), so "at least one"
    probabilities combine across fields by adding them."""

    words: int = 0
    eligible_bits: int = 0
    weights: int = 0
    faults: float = 0.0
    weights_changed: float = 0.0
    nan: float = 0.0
    inf: float = 0.0
    huge: float = 0.0
    log_no_nonfinite: float = 0.0
    log_no_bad: float = 0.0

    def add(self, other: FieldExpectation) -> None:
        for name in asdict(self):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "p_any_nonfinite": self.p_any_nonfinite, "p_any_bad": self.p_any_bad}


@dataclass
class StoredFieldExpectation:
    """`FieldExpectation` of one field of one weight, with where it sits."""

    name: str
    field: str
    component: str
    layer: int | None
    layout: str
    expectation: FieldExpectation


@dataclass
class StoredAnalysis:
    """Expected damage of `spec` on a model's stored form, per weight and field, per component, per field, in total."""

    spec: FaultSpec
    change_threshold: float
    second_order_bound: float = 0.0
    """An upper bound on the relative error of the first-order figures: p times the most stored
    bits one weight reads (its code and its block's other fields)."""
    sites: list[StoredFieldExpectation] = field(default_factory=list)

    def total(self) -> FieldExpectation:
        total = FieldExpectation()
        for site in self.sites:
            total.add(site.expectation)
        return total

    def grouped(self, key: str) -> dict[str, FieldExpectation]:
        """Sums by `component` or by `field`."""
        groups: dict[str, FieldExpectation] = defaultdict(FieldExpectation)
        for site in self.sites:
            groups[getattr(site, key)].add(site.expectation)
        return dict(sorted(groups.items()))

    def notes(self) -> list[str]:
        notes = [
            f"first order in p: a second fault in one block is left out; it changes these figures by less than "
            f"{self.second_order_bound:.2g} of their value"
        ]
        if self.second_order_bound >= 1:
            notes.append(
                "p is too high for these figures to be expectations: they count each fault as if alone in its block, "
                "and can exceed the weights there are; measure this p with a run"
            )
        if self.spec.protected:
            notes.append(
                "after protection: a backed-up field (protect_fields=, protect=) has no faults left, and protected bits "
                "(protect_bits=) are not counted as eligible"
            )
        return notes

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": {**self.spec.to_dict(), "description": self.spec.describe()},
            "notes": self.notes(),
            "change_threshold_rms": self.change_threshold,
            "second_order_bound": self.second_order_bound,
            "total": self.total().to_dict(),
            "by_component": {name: e.to_dict() for name, e in self.grouped("component").items()},
            "by_field": {name: e.to_dict() for name, e in self.grouped("field").items()},
            "sites": [
                {
                    "name": s.name,
                    "field": s.field,
                    "component": s.component,
                    "layer": s.layer,
                    "layout": s.layout,
                    **s.expectation.to_dict(),
                }
                for s in self.sites
            ],
        }

    def format_table(self) -> str:
        lines = [
            f"Expected damage of: {self.spec.describe()}",
            f"(huge = finite but moved by more than {self.change_threshold:g} RMS of its weight's tensor; "
            "P(...) = probability of at least one such weight)",
            *(f"note: {note}" for note in self.notes()),
        ]
        columns = [
            Column("component", 22, align="<"),
            Column("field", 12, align="<"),
            Column("words", 13, ","),
            Column("bits", 15, ","),
            Column("E[faults]", 11, ".4g"),
            Column("E[weights]", 12, ".4g"),
            Column("E[NaN]", 10, ".3g"),
            Column("E[Inf]", 10, ".3g"),
            Column("E[huge]", 10, ".3g"),
            Column("P(NaN/Inf)", 12, ".3g"),
            Column("P(any bad)", 12, ".3g"),
        ]
        by_both: dict[tuple[str, str], FieldExpectation] = defaultdict(FieldExpectation)
        for site in self.sites:
            by_both[(site.component, site.field)].add(site.expectation)
        named = [(c, f, e) for (c, f), e in sorted(by_both.items())]
        if len({c for c, _ in by_both}) > 1:  # per field over components, unless that repeats the rows above
            named += [("all", f, e) for f, e in self.grouped("field").items()]
        rows = [_row(c, f, e) for c, f, e in [*named, ("total", "all", self.total())]]
        lines.extend(text_table(columns, rows))
        return "\n".join(lines)


def _row(component: str, field_name: str, e: FieldExpectation) -> tuple[Any, ...]:
    return (
        component,
        field_name,
        e.words,
        e.eligible_bits,
        e.faults,
        e.weights_changed,
        e.nan,
        e.inf,
        e.huge,
        e.p_any_nonfinite,
        e.p_any_bad,
    )


def check_storage_analysable(spec: FaultSpec) -> None:
    """Refuse what a first-order count over single faults in stored words cannot give exactly:
    fault kinds whose effect on a word is not a fixed function of it, and protections that act on
    several faults together (an ECC word corrects one fault, so what gets through is second order)
    or on the decoded values (clamping)."""
    if not spec.kind.per_bit and not spec.kind.zeroes:
        raise FaultSpecError(
            f"analyze: fault={spec.fault!r} with storage={spec.storage!r} is not analysed: a uniform value drawn into a stored "
            "word (a code, a scale) has no fixed effect to count; analyze a bit fault or fault=zero, or measure it with a run"
        )
    for key, value in (("ecc", spec.ecc), ("clamp", spec.clamp)):
        if value != "none":
            raise FaultSpecError(
                f"analyze: {key}={value} with storage={spec.storage!r} is not analysed (what gets through it is not a sum over "
                "single faults in stored words); protect_fields=, protect= and protect_bits= are, or measure it with a run"
            )


def analyze_stored(
    model: nn.Module, spec: FaultSpec, change_threshold: float | None = None, progress: Callable[[str, int], None] | None = None
) -> StoredAnalysis:
    """Expected damage of weight faults in `spec.storage`'s fields, from the stored words.

    `change_threshold` (default `DEFAULT_CHANGE_THRESHOLD`) is the move, in RMS of the weight's
    tensor, above which a finite weight counts as huge. The fields are read as they are now: on
    a model carrying faults, it is the faulted stored form that is analysed. `progress(name,
    total)` is called after each of the `total` stored fields (this takes minutes on a real model)."""
    check_storage_analysable(spec)
    threshold = DEFAULT_CHANGE_THRESHOLD if change_threshold is None else change_threshold
    analysis = StoredAnalysis(spec, threshold)
    block_bits = 0
    with torch.no_grad():
        sites = select_params(model, spec)
        for site in sites:
            encoding = site.encoding
            if encoding is None:  # select_params gives encoded sites whenever storage= is set
                raise AssertionError(f"{site.name}: no encoding under storage={spec.storage}")
            expectation = field_expectation(encoding, site, spec, threshold)
            analysis.sites.append(
                StoredFieldExpectation(site.name, site.field_name, site.component, site.layer, site.layout.name, expectation)
            )
            block_bits = max(block_bits, encoding.stored_bits() // encoding.blocks)
            if progress is not None:
                progress(site.name, len(sites))
    rate = max(spec.bit_rates()) if spec.kind.per_bit else spec.p
    analysis.second_order_bound = rate * block_bits
    return analysis


def field_expectation(encoding: Encoding, site: ParamSite, spec: FaultSpec, threshold: float) -> FieldExpectation:
    """The expectation for one field of one weight (see the module docstring)."""
    codec, name, layout = encoding.codec, site.field_name, site.layout
    words_per_block = encoding.words_per_block(name)
    if backed_up(spec, site):  # kept in fault-free storage: nothing reaches its weights
        return FieldExpectation(words=site.param.numel(), weights=encoding.weight.numel())
    rms = math.sqrt(float((encoding.original.double() ** 2).sum()) / encoding.weight.numel()) or 1.0
    eligible = resolve_bits(layout, spec.bits) if spec.kind.per_bit else layout.all_bits
    protected = set(protected_positions(spec, layout)) if spec.kind.per_bit else set()
    eligible = tuple(bit for bit in eligible if bit not in protected)
    coupled = name in codec.coupled_fields
    word_of = torch.zeros(encoding.block, dtype=torch.int64) if coupled else _word_of_weight(encoding, name)
    fields = {field_name: words.view(encoding.blocks, -1) for field_name, words in encoding.fields.items()}
    step = max(1, CHUNK_WEIGHTS // encoding.block)

    def chunk_expectation(start: int) -> FieldExpectation:
        chunk = {field_name: words[start : start + step] for field_name, words in fields.items()}
        part = FieldExpectation()
        clean = codec.decode(chunk).double()
        words = chunk[name].view(layout.int_view)
        for position in range(words_per_block) if coupled else [None]:
            for change in _changes(words, layout, eligible, spec, position):
                new = codec.decode({**chunk, name: change.words.view(chunk[name].dtype)}).double()
                _count(part, new, clean, change, threshold * rms, word_of)
        part.faults = _expected_faults(words, layout, eligible, spec)
        return part

    result = FieldExpectation(words=site.param.numel(), eligible_bits=site.param.numel() * len(eligible), weights=encoding.weight.numel())
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:  # gguf's numpy decodes release the GIL
        for part in pool.map(chunk_expectation, range(0, encoding.blocks, step)):
            result.add(part)
    return result


@dataclass(frozen=True)
class _Change:
    """A field's words [blocks, words per block] with one change applied to every word it may
    hit, and the rate of that change for each word: `rate_if_set` where `held` is 1, else
    `rate_if_clear`. `held` covers the changed words only (one column for a coupled position)."""

    words: torch.Tensor
    held: torch.Tensor
    rate_if_clear: float
    rate_if_set: float


def _changes(words: torch.Tensor, layout: BitLayout, eligible: tuple[int, ...], spec: FaultSpec, position: int | None) -> Iterator[_Change]:
    """One change per eligible bit (the bit flipped in every word, each word's rate set by the
    value it holds there), or every word zeroed for fault=zero; only the words at `position` of
    each block when it is given (a coupled field)."""
    columns = slice(None) if position is None else slice(position, position + 1)
    if not spec.kind.per_bit:
        changed = words.clone()
        changed[:, columns] = 0
        yield _Change(changed, torch.zeros_like(words[:, columns], dtype=torch.bool), spec.p, spec.p)
        return
    flip0, flip1 = spec.bit_rates()
    for bit in eligible:
        mask = torch.tensor(1 << bit, dtype=torch.int64).to(layout.int_view)
        changed = words.clone()
        changed[:, columns] ^= mask
        yield _Change(changed, ((words[:, columns] >> bit) & 1).bool(), flip0, flip1)


def _word_of_weight(encoding: Encoding, name: str) -> torch.Tensor:
    """For each weight of a block, the position of the word of field `name` it reads. Found by
    decoding: every bit of one word position changed in a block of random weights moves exactly
    the weights that read it (a 4-bit code's byte holds two weights, which GGUF interleaves)."""
    codec, words_per_block = encoding.codec, encoding.words_per_block(name)
    if words_per_block == 1:
        return torch.zeros(encoding.block, dtype=torch.int64)
    if words_per_block == encoding.block:  # one word per weight: any one-to-one map counts the same
        return torch.arange(encoding.block)
    word_of = torch.full((encoding.block,), -1, dtype=torch.int64)
    generator = torch.Generator().manual_seed(0)
    probe = codec.encode(torch.randn(1, encoding.block, generator=generator))
    clean = codec.decode(probe)
    layout = codec.field_layouts[name]
    for position in range(words_per_block):
        changed = probe[name].view(layout.int_view).clone()
        changed[0, position] ^= torch.tensor((1 << layout.width) - 1, dtype=torch.int64).to(layout.int_view)
        moved = codec.decode({**probe, name: changed.view(probe[name].dtype)})[0] != clean[0]
        word_of[moved] = position
    if bool((word_of < 0).any()):
        raise AssertionError(f"{codec.name}: some weights of a block read no word of field {name!r}")
    return word_of


def _count(result: FieldExpectation, new: torch.Tensor, clean: torch.Tensor, change: _Change, limit: float, word_of: torch.Tensor) -> None:
    """Add one change's effect on a chunk of blocks [blocks, block]: each weight's change comes
    from the one changed word it reads (`word_of`, into `change.held`'s columns), weighted by that
    word's rate."""
    finite = clean.isfinite()
    held = change.held[:, word_of]
    moved = (new != clean) & ~(new.isnan() & clean.isnan())
    nan = new.isnan() & finite
    inf = new.isinf() & finite
    huge = new.isfinite() & finite & ((new - clean).abs() > limit)
    for flags, name in ((moved, "weights_changed"), (nan, "nan"), (inf, "inf"), (huge, "huge")):
        setattr(result, name, getattr(result, name) + _rated(flags, held, change))
    # Events, for "at least one": the changed words that make some weight non-finite (or huge).
    for flags, name in ((nan | inf, "log_no_nonfinite"), (nan | inf | huge, "log_no_bad")):
        per_word = torch.zeros(change.held.shape, dtype=torch.int64)
        per_word.index_add_(1, word_of, flags.to(torch.int64))
        hit = per_word > 0
        setattr(
            result,
            name,
            getattr(result, name)
            + _log_none(float((hit & change.held).sum()), change.rate_if_set)
            + _log_none(float((hit & ~change.held).sum()), change.rate_if_clear),
        )


def _log_none(events: float, rate: float) -> float:
    """log P(none of `events` independent events of probability `rate`): 0 without events, even
    at rate 1 (where each event's log is -inf)."""
    return events * log1m(rate) if events else 0.0


def _rated(flags: torch.Tensor, held: torch.Tensor, change: _Change) -> float:
    """Sum of flagged weights, each at its word's rate."""
    set_ = float((flags & held).sum())
    return change.rate_if_set * set_ + change.rate_if_clear * (float(flags.sum()) - set_)


def _expected_faults(words: torch.Tensor, layout: BitLayout, eligible: tuple[int, ...], spec: FaultSpec) -> float:
    """Expected stored bits changed in these words."""
    if not spec.kind.per_bit:
        ones = sum(float(((words >> bit) & 1).sum()) for bit in layout.all_bits)
        return spec.p * ones
    flip0, flip1 = spec.bit_rates()
    total = 0.0
    for bit in eligible:
        ones = float(((words >> bit) & 1).sum())
        total += flip1 * ones + flip0 * (words.numel() - ones)
    return total
