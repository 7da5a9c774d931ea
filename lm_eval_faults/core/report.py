"""`FaultReport`: what was actually injected, so that a silent no-op can never pass unnoticed.

Counts are kept per site (parameter or module) and rolled up per component, per layer and per
bit position. "hit" counts fault events (a stuck-at bit that already had its value is hit but
not changed); "changed"/"flipped" count what really differs from the clean model.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lm_eval_faults import __version__ as PACKAGE_VERSION
from lm_eval_faults.core.faults.kinds import FAULT_KIND_TABLE
from lm_eval_faults.core.sites.registry import site_kind, site_names
from lm_eval_faults.core.text_table import Column, text_table

SILENT_NO_OP_EXPECTATION = 10.0
"""Zero faults when at least this many were expected has probability < e^-10: that is a bug."""


FAULT_COUNT_FIELDS = ("hit_elements", "fault_bits", "changed_elements", "flipped_bits", "nonfinite_created")
"""What an injection did at a site (as opposed to the site's size and expectations)."""

PROTECTION_COUNT_FIELDS = ("check_bit_faults", "masked_bits", "corrected", "detected", "miscorrected", "undetected", "clamped")
"""What protection did at a site (see `protection.py`). ECC outcomes count SECDED words (64 data
bits) or parity elements; `masked_bits` counts bits a fault would have changed in backed-up or
protected storage; `clamped` counts elements that range restriction changed. The fault counts
above them (changed, flipped, non-finite) count what the model reads, after protection."""

PROTECTION_FIELDS = ("protection_bits", *PROTECTION_COUNT_FIELDS)

_TOTAL_FIELDS = ("elements", "stored_bits", "eligible_bits", "expected_elements", "expected_bits", *FAULT_COUNT_FIELDS, *PROTECTION_FIELDS)
"""The counts that add up across sites and calls."""


@dataclass
class SiteStats:
    """Counts for one faulted site (a parameter tensor, or a module's outputs over all calls)."""

    name: str
    component: str
    layer: int | None
    dtype: str
    elements: int
    eligible_bits: int
    expected_elements: float
    expected_bits: float
    hit_elements: int = 0
    fault_bits: int = 0
    changed_elements: int = 0
    flipped_bits: int = 0
    nonfinite_created: int = 0
    stored_bits: int = 0
    protection_bits: int = 0
    check_bit_faults: int = 0
    masked_bits: int = 0
    corrected: int = 0
    detected: int = 0
    miscorrected: int = 0
    undetected: int = 0
    clamped: int = 0
    bit_histogram: list[int] = field(default_factory=list)
    shared_with: list[str] = field(default_factory=list)
    calls: int = 0

    def add(self, other: SiteStats) -> None:
        """Accumulate another record of the same site (e.g. its counts from another data-parallel rank)."""
        for name in (*_TOTAL_FIELDS, "calls"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.bit_histogram = add_lists(self.bit_histogram, other.bit_histogram)


def _with_overhead(row: dict[str, float]) -> dict[str, float | None]:
    """A component's protection counts and its overhead (extra bits over its stored bits)."""
    counts: dict[str, float | None] = {name: row[name] for name in PROTECTION_FIELDS}
    return {
        **counts,
        "stored_bits": row["stored_bits"],
        "overhead": row["protection_bits"] / row["stored_bits"] if row["stored_bits"] else None,
    }


def add_lists(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum of two histograms; the shorter one counts as zero-padded."""
    width = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(width)]


def _totals(sites: Iterable[SiteStats]) -> dict[str, float]:
    totals: dict[str, float] = dict.fromkeys(_TOTAL_FIELDS, 0)
    for site in sites:
        for name in _TOTAL_FIELDS:
            totals[name] += getattr(site, name)
    totals["expected_elements"] = round(totals["expected_elements"], 3)
    totals["expected_bits"] = round(totals["expected_bits"], 3)
    return totals


def _rollup(sites: Iterable[SiteStats], key) -> dict[str, dict[str, float]]:
    groups: dict[str, list[SiteStats]] = defaultdict(list)
    for site in sites:
        groups[key(site)].append(site)
    return {name: _totals(members) for name, members in sorted(groups.items())}


def _drop_key(data: Any, key: str) -> None:
    """Remove `key` from every dict nested in `data`."""
    if isinstance(data, dict):
        data.pop(key, None)
        for value in data.values():
            _drop_key(value, key)
    elif isinstance(data, list):
        for value in data:
            _drop_key(value, key)


@dataclass
class ReportPart:
    """One site's counts in a report: a record per faulted place, live while the faults are on.

    A persistent site (weights) lists its records, one per tensor, fixed once injected; a site
    faulted per forward call (activations) keeps one record per module that grows with every call,
    some of it summed on a device until `settle` brings it over.
    """

    stats: list[SiteStats] | dict[str, SiteStats]
    per_call: bool = False
    settle: Callable[[], None] | None = None
    storage: Callable[[], dict[str, Any]] | None = None
    """With simulated storage (`storage=`): per component, its weights, stored bits, faults per
    weight, weights the faults changed (the largest relative change, the non-finite ones), the
    clean quantization error, and the same per stored field; shown under the part's `storage` key."""
    entries: Callable[[], dict[str, dict[str, int]]] | None = None
    """For the KV cache: per layer and part, the entries written, corrupted, and read while
    corrupted (`injectors.kv_cache.EntryCounts`); shown under the part's `entries` key."""

    def sites(self) -> list[SiteStats]:
        if self.settle is not None:
            self.settle()
        return list(self.stats.values()) if isinstance(self.stats, dict) else list(self.stats)

    def to_dict(self) -> dict[str, Any]:
        """This part's JSON: the same keys the weights and activations parts have always had."""
        sites = self.sites()
        totals: dict[str, Any] = _totals(sites)
        data: dict[str, Any] = {
            "totals": {**totals, "calls": sum(s.calls for s in sites)} if self.per_call else totals,
            "by_component": _rollup(sites, lambda s: s.component),
            "by_layer": _rollup(sites, _layer_label),
            "bit_histogram": _bit_histogram(sites),
        }
        if self.storage is not None:
            data["storage"] = self.storage()
        if self.entries is not None:
            data["entries"] = self.entries()
        if not self.per_call:
            data["shared_tensors"] = {s.name: s.shared_with for s in sites if s.shared_with}
            data["sites"] = [asdict(s) for s in sites]
        return data

    @classmethod
    def stacked(cls, parts: list[ReportPart]) -> ReportPart:
        """Several injections' parts of one site as one: a persistent site lists every record (a
        tensor faulted twice appears twice, so totals add up); per-call records of one module add."""
        if not any(part.per_call for part in parts):
            return cls([site for part in parts for site in part.sites()])
        merged: dict[str, SiteStats] = {}
        for part in parts:
            for site in part.sites():
                if site.name in merged:
                    merged[site.name].add(site)
                else:
                    merged[site.name] = SiteStats(**vars(site))
        return cls(merged, per_call=True)


def stored_bits_per_weight(summary: Mapping[str, Mapping[str, Any]]) -> float:
    """Stored bits per weight over the components of a storage summary (`ReportPart.storage`)."""
    return sum(row["stored_bits"] for row in summary.values()) / sum(row["weights"] for row in summary.values())


def _storage_lines(summary: dict[str, Any]) -> list[str]:
    """The stored form per component (bits and faults per weight, weights the faults changed, the
    clean error), then a row per stored field."""
    lines = []
    for component, row in summary.items():
        clean = "the file is the reference" if row["storage"] == "file" else f"clean relative RMS error {row['clean_relative_rms']:.2e}"
        lines.append(
            f"stored as {row['storage']} ({component}): {row['bits_per_weight']:.2f} bits and {row.get('faults_per_weight', 0.0):.2e} "
            f"faults per weight, {row['weights_affected']:,} of {row['weights']:,} weights changed by faults, {clean}"
        )
        for field_name, stats in row.get("fields", {}).items():
            lines.append(
                f"  field {field_name:<10} ({stats['layout']}): {stats['eligible_bits']:,} bits, {stats['bits_hit']:,} hit, "
                f"{stats['words_changed']:,} words changed, {stats['weights_affected']:,} weights moved, "
                f"largest change {stats['largest_relative_change']:.3g} RMS, {stats['nonfinite_created']:,} made non-finite"
            )
    return lines


def _entry_lines(entries: dict[str, dict[str, int]]) -> list[str]:
    """The KV cache's entries per part, summed over layers (the JSON has them per layer)."""
    totals: dict[str, dict[str, int]] = {}
    for name, counts in entries.items():
        row = totals.setdefault(name.rpartition(".")[2], dict.fromkeys(counts, 0))
        for key, value in counts.items():
            row[key] += value
    return [
        f"KV cache {part}: {row['written']:,} entries written, {row['corrupted']:,} corrupted, "
        f"{row['reads_corrupted']:,} reads of corrupted entries"
        for part, row in totals.items()
    ]


def _layer_label(site: SiteStats) -> str:
    return "-" if site.layer is None else f"{site.layer:03d}"


def _bit_histogram(sites: Iterable[SiteStats]) -> dict[str, list[int]]:
    """Changed elements per bit position, per dtype (positions differ between dtypes)."""
    histograms: dict[str, list[int]] = {}
    for site in sites:
        histograms[site.dtype] = add_lists(histograms.get(site.dtype, []), site.bit_histogram)
    return histograms


def _default_parts() -> dict[str, ReportPart]:
    """An empty part for every site a report always shows (see `SiteKind.always_reported`)."""
    kinds = [site_kind(name) for name in site_names()]
    return {kind.name: ReportPart({} if kind.per_call else [], per_call=kind.per_call) for kind in kinds if kind.always_reported}


@dataclass
class FaultReport:
    """Everything injected under one spec: a part per site (weights once, activations per call)."""

    spec: dict[str, Any]
    version: str = field(default_factory=lambda: PACKAGE_VERSION)
    """The package version whose sampler drew the map: a map is a function of (seed, name, spec, version)."""
    parts: dict[str, ReportPart] = field(default_factory=_default_parts)
    """Per site, its counts, in registration order."""
    requests: dict[str, int] = field(default_factory=dict)
    nonfinite_requests: dict[str, int] = field(default_factory=dict)
    degenerate_requests: dict[str, int] = field(default_factory=dict)
    cached_requests: dict[str, int] = field(default_factory=dict)
    clamp_counts: Callable[[], dict[str, int]] | None = None
    """Range restriction on activations: reads per module the output elements clamped so far."""
    activation_bound_bits: int = 0
    """Storage of the calibrated activation bounds (two values per clamped module)."""
    protection_notes: list[str] = field(default_factory=list)
    """Why a chosen scheme protects nothing under this spec (also warned when injecting)."""

    @classmethod
    def stacked(cls, reports: list[FaultReport]) -> FaultReport:
        """One report for several injections stacked on a model: the specs side by side, every
        faulted site of each."""
        names = dict.fromkeys(name for report in reports for name in report.parts)
        return cls(
            spec={
                "stack": [report.spec for report in reports],
                "description": " + ".join(report.spec["description"] for report in reports),
            },
            parts={name: ReportPart.stacked([report.parts[name] for report in reports if name in report.parts]) for name in names},
            protection_notes=[note for report in reports for note in report.protection_notes],
        )

    # The two original sites by name: the Python API has always offered them as attributes.
    @property
    def weights(self) -> list[SiteStats]:
        """The weights part's per-tensor records."""
        return self._sites("weights")

    @weights.setter
    def weights(self, sites: list[SiteStats]) -> None:
        self.parts["weights"] = ReportPart(sites)

    @property
    def activations(self) -> dict[str, SiteStats]:
        """The activations part's per-module records, up to date."""
        part = self.parts.get("activations")
        if part is None:
            return {}
        part.sites()  # settles
        return part.stats if isinstance(part.stats, dict) else {s.name: s for s in part.stats}

    @activations.setter
    def activations(self, stats: dict[str, SiteStats]) -> None:
        self.parts["activations"] = ReportPart(stats, per_call=True)

    @property
    def activation_clamps(self) -> dict[str, int]:
        """Per module, the output elements range restriction clamped over all calls so far."""
        return self.clamp_counts() if self.clamp_counts is not None else {}

    def settle(self) -> None:
        """Bring every part up to date: on a GPU some counts are summed on the device between
        reads (one transfer here instead of one per forward). Every summary below calls it."""
        for part in self.parts.values():
            part.sites()

    @property
    def protected(self) -> bool:
        return any(key in self.spec for key in ("protect", "ecc", "clamp"))

    def protection_summary(self) -> dict[str, Any]:
        """Overhead (extra bits over the protected weights' bits) and what protection did, in total."""
        totals = self.totals("weights")
        extra = totals["protection_bits"] + self.activation_bound_bits
        return {
            "overhead": extra / totals["stored_bits"] if totals["stored_bits"] else None,
            "extra_bits": int(extra),
            "stored_bits": int(totals["stored_bits"]),
            **{name: int(totals[name]) for name in PROTECTION_COUNT_FIELDS},
            "activations_clamped": int(sum(self.activation_clamps.values())),
        }

    def set_request_counts(
        self, requests: dict[str, int], nonfinite: dict[str, int], degenerate: dict[str, int], cached: dict[str, int]
    ) -> None:
        """Per task: requests, those with NaN/Inf results, those with flat logits or tied choices
        (a collapsed model), and those answered from lm-eval's request cache."""
        self.requests, self.nonfinite_requests = dict(requests), dict(nonfinite)
        self.degenerate_requests, self.cached_requests = dict(degenerate), dict(cached)

    def totals(self, part: str = "weights") -> dict[str, float]:
        return _totals(self._sites(part))

    def _sites(self, part: str) -> list[SiteStats]:
        return self.parts[part].sites() if part in self.parts else []

    def by_component(self, part: str = "weights") -> dict[str, dict[str, float]]:
        return _rollup(self._sites(part), lambda s: s.component)

    def by_layer(self, part: str = "weights") -> dict[str, dict[str, float]]:
        return _rollup(self._sites(part), _layer_label)

    def bit_histogram(self, part: str = "weights") -> dict[str, list[int]]:
        """Changed elements per bit position, per dtype (positions differ between dtypes)."""
        return _bit_histogram(self._sites(part))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form that goes into lm-eval's results under config.fault_injection.

        Element faults (value, zero) have no expected bit count (it depends on each drawn value
        and the stored word), so `expected_bits` is left out for them rather than shown as 0.
        """
        data: dict[str, Any] = {
            "spec": self.spec,
            "version": self.version,
            **{name: part.to_dict() for name, part in self.parts.items()},
            "requests": dict(self.requests),
            "nonfinite_requests": dict(self.nonfinite_requests),
            "degenerate_requests": dict(self.degenerate_requests),
            "cached_requests": dict(self.cached_requests),
        }
        if self.protected:
            data["protection"] = {
                **self.protection_summary(),
                "by_component": {name: _with_overhead(row) for name, row in self.by_component("weights").items()},
                "activation_clamps": dict(self.activation_clamps),
                "notes": list(self.protection_notes),
            }
        else:
            for name in PROTECTION_FIELDS:
                _drop_key(data, name)
        kind = FAULT_KIND_TABLE.get(str(self.spec.get("fault")))
        if kind is not None and not kind.per_bit:
            _drop_key(data, "expected_bits")
        return data

    def format_table(self) -> str:
        """A short human-readable summary, printed after an lm-eval run."""
        lines = [f"Fault injection: {self.spec.get('description', self.spec)}"]
        columns = [
            Column("site", 12, align="<"),
            Column("component", 22, align="<"),
            Column("elements", 14, ","),
            Column("expected", 12, ".1f"),
            Column("hit", 10, ","),
            Column("changed", 10, ","),
            Column("bits", 10, ","),
            Column("non-finite", 12, ","),
        ]
        for part in self.parts:
            if not self._sites(part):
                continue
            rows = [
                (
                    part,
                    component,
                    int(row["elements"]),
                    row["expected_elements"],
                    int(row["hit_elements"]),
                    int(row["changed_elements"]),
                    int(row["flipped_bits"]),
                    int(row["nonfinite_created"]),
                )
                for component, row in self.by_component(part).items()
            ]
            lines.extend(text_table(columns, rows))
            entries = self.parts[part].entries
            if entries is not None:
                lines.extend(_entry_lines(entries()))
            storage = self.parts[part].storage
            if storage is not None:
                lines.append("(stored words above: elements, hit, changed and non-finite count words; weights below)")
                lines.extend(_storage_lines(storage()))
        if self.protected:
            lines.extend(self._protection_table())
        for task, total in sorted(self.requests.items()):
            cached = self.cached_requests.get(task, 0)
            lines.append(
                f"requests of {task}: {total}, non-finite {self.nonfinite_requests.get(task, 0)}, "
                f"degenerate (flat logits or tied choices) {self.degenerate_requests.get(task, 0)}"
                + (f", {cached} answered from the request cache" if cached else "")
            )
        return "\n".join(lines)

    def _protection_table(self) -> list[str]:
        summary = self.protection_summary()
        overhead = "n/a" if summary["overhead"] is None else f"{100 * summary['overhead']:.2f}%"
        lines = [f"Protection: {self.spec.get('description', '').partition('protection: ')[2]} (storage overhead {overhead})"]
        columns = [
            Column("component", 22, align="<"),
            Column("overhead", 10, align=">"),
            Column("masked bits", 13, ","),
            Column("check faults", 14, ","),
            Column("corrected", 11, ","),
            Column("detected", 10, ","),
            Column("miscorrected", 14, ","),
            Column("undetected", 12, ","),
            Column("clamped", 10, ","),
        ]
        rows = [
            (
                component,
                f"{100 * row['protection_bits'] / row['stored_bits']:.2f}%" if row["stored_bits"] else "n/a",
                *(
                    int(row[name])
                    for name in ("masked_bits", "check_bit_faults", "corrected", "detected", "miscorrected", "undetected", "clamped")
                ),
            )
            for component, row in self.by_component("weights").items()
        ]
        if rows:
            lines.extend(text_table(columns, rows))
        if self.clamp_counts is not None:
            lines.append(f"range restriction clamped {summary['activations_clamped']:,} activation elements")
        lines.extend(f"WARNING: {note}" for note in self.protection_notes)
        return lines

    def check_not_silent(self, part: str) -> None:
        """Shout when faults were asked for on `part` and none landed (the RRAM study shipped such a no-op).

        Zero faults despite >= 10 expected is a bug and raises; fewer expected is a loud warning.
        """
        sites = self._sites(part)
        if sites and any(site.elements for site in sites):
            totals = self.totals(part)
            if totals["hit_elements"] > 0:
                return
            expected = totals["expected_elements"]
            if expected >= SILENT_NO_OP_EXPECTATION:
                raise RuntimeError(
                    f"lm_eval_faults: {expected:.1f} faults expected on {part} but none injected; "
                    f"this is a bug, please report it with the spec {self.spec}"
                )
            chance = math.exp(-expected)
            message = (
                f"lm_eval_faults: NO FAULTS were injected on {part} (expected {expected:.3g}; "
                f"P(zero faults) = {chance:.2f}). This run measures the clean model. Raise p or widen the target."
            )
            warnings.warn(message, stacklevel=2)
