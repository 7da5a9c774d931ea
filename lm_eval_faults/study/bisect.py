"""Bisection to the culprit faults: a minimal subset of a damaging fault map that still does the damage.

A damaged run answers "did the score drop?"; bisection answers "which faults did it?". Given a
map (hundreds of flipped words) whose replay degrades a task beyond a threshold, delta debugging
(Zeller and Hildebrandt's ddmin) searches subsets of the map, replaying each on the one loaded
model with O(k) restore between trials, until no single fault can be removed without losing the
damage (a 1-minimal subset). Several faults may each do the damage alone: the search then
repeats on the faults not yet blamed until they no longer degrade the task, so that replaying
the rest is shown harmless. With c independent culprits among k faults it takes about
O(c log k) evaluations; faults that only do damage together are found together.

Each trial is one evaluation; identical subsets are evaluated once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lm_eval_faults.core.fault_map import FaultMap
from lm_eval_faults.core.storage.layouts import layout_named, word_value


def minimal_failing_subset(indices: np.ndarray, fails: Callable[[np.ndarray], bool]) -> np.ndarray:
    """ddmin over fault `indices`: a 1-minimal subset on which `fails` holds.

    `fails(indices)` must hold for the whole set. Tries each of n chunks, then each complement;
    keeps the first that still fails; otherwise doubles n. Sorted indices are returned.
    """
    current = np.sort(np.asarray(indices))
    chunks = 2
    while len(current) >= 2:
        parts = np.array_split(current, min(chunks, len(current)))
        reduced = next((part for part in parts if fails(part)), None)
        if reduced is not None:
            current, chunks = reduced, 2
            continue
        if len(parts) > 2:
            complement = next((np.setdiff1d(current, part) for part in parts if fails(np.setdiff1d(current, part))), None)
            if complement is not None:
                current, chunks = complement, max(chunks - 1, 2)
                continue
        if len(parts) == len(current):
            break
        chunks = min(len(current), 2 * chunks)
    return np.sort(current)


@dataclass
class Culprit:
    """One fault of the minimal subset, where it sits, what it did, and what it does alone."""

    param: str
    component: str
    layer: int | None
    index: int
    bits: list[int]
    old_value: float
    new_value: float
    score_alone: float


@dataclass
class Bisection:
    """The outcome: culprits, scores of the clean model, the whole map, the culprits and the rest."""

    faults: int
    clean_score: float
    full_score: float
    threshold: float
    indices: list[int] = field(default_factory=list)
    """The culprits' positions in the map: `fault_map.subset(indices)` replays just them."""
    fault_bits: list[int] = field(default_factory=list)
    """Flipped bits per bit position over the whole map: what the culprits' bits compare against."""
    culprits: list[Culprit] = field(default_factory=list)
    faults_by_field: dict[str, int] = field(default_factory=dict)
    """Under `storage=`, the whole map's faults per stored field (codes, scales, ...): what the
    culprits' fields compare against; empty for a map of plain tensors."""
    culprits_score: float = float("nan")
    rest_score: float = float("nan")
    """The residue's score: the map minus the culprits, replayed alone."""
    evaluations: int = 0
    tolerance: float = 0.05
    """How much of the clean score the residue may cost before the outcome warns, as a fraction of it."""

    @property
    def residue_cost(self) -> float:
        """What the faults not blamed still cost, as a fraction of the clean score: (clean − residue) / clean.

        "Harmless" in the search only means the residue stays above the threshold, so with
        fraction 0.5 it can still cost up to half the score."""
        return _share(self.clean_score - self.rest_score, self.clean_score)

    @property
    def explained(self) -> float:
        """The share of the whole map's damage the culprits do alone:
        (clean − culprits alone) / (clean − whole map); above 1 when the rest partly undoes them."""
        return _share(self.clean_score - self.culprits_score, self.clean_score - self.full_score)

    @property
    def residue_warning(self) -> str | None:
        """A warning when the residue costs more than the tolerance, else None."""
        if not self.residue_cost > self.tolerance:
            return None
        return (
            f"WARNING: the {self.faults - len(self.culprits)} faults not blamed still cost {self.residue_cost:.1%} of the clean score "
            f"on their own (tolerance {self.tolerance:.1%}): they are not harmless, only above the threshold; "
            "bisect again with a higher --fraction to blame them too"
        )

    @property
    def culprits_by_field(self) -> dict[str, int]:
        """Under `storage=`, the culprits per stored field, every field of the map listed."""
        if not self.faults_by_field:
            return {}
        counts = dict.fromkeys(self.faults_by_field, 0)
        for culprit in self.culprits:
            counts[culprit.param.rpartition(".")[2]] += 1  # a culprit is one of the map's faults
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "culprits_by_field": self.culprits_by_field,
            "residue_cost": self.residue_cost,
            "explained": self.explained,
            "residue_warning": self.residue_warning,
        }

    def format_table(self) -> str:
        lines = [
            f"{len(self.culprits)} culprit(s) among {self.faults} faults, found in {self.evaluations} evaluations "
            f"(clean {self.clean_score:.4g}, all faults {self.full_score:.4g}, threshold < {self.threshold:.4g}; "
            f"culprits alone {self.culprits_score:.4g}, all but the culprits {self.rest_score:.4g})",
            f"residue (the map minus the culprits) scores {self.rest_score:.4g}: it costs {self.residue_cost:.1%} of the clean score",
            f"the culprits explain {self.explained:.1%} of the damage: (clean − culprits alone) / (clean − all faults), what they do alone",
        ]
        if self.faults_by_field:
            lines.append(
                f"culprits by stored field: {_by_field(self.culprits_by_field)}; the map's faults: {_by_field(self.faults_by_field)}"
            )
        for c in self.culprits:
            layer = "-" if c.layer is None else str(c.layer)
            lines.append(
                f"  {c.component:<18} layer {layer:<3} {c.param}[{c.index}] bits {c.bits}: "
                f"{c.old_value:.6g} -> {c.new_value:.6g}; score with this fault alone {c.score_alone:.4g}"
            )
        if self.residue_warning:
            lines.append(self.residue_warning)
        return "\n".join(lines)


def _by_field(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in counts.items())


def _share(part: float, whole: float) -> float:
    """part / whole, NaN when the whole is zero (no damage to share out)."""
    return part / whole if whole else float("nan")


def bisect(
    fault_map: FaultMap,
    score: Callable[[FaultMap | None], float],
    fraction: float,
    sites: dict[str, tuple[str, int | None]],
    tolerance: float = 0.05,
) -> Bisection:
    """Find a 1-minimal subset of `fault_map` whose replay scores below `fraction` x the clean score.

    `score(map)` evaluates the model with exactly that map's faults replayed (None: clean) and
    returns the task score; `sites` maps parameter names to (component, layer) for the report.
    The residue (the map minus the culprits) is scored too; the outcome warns when it still costs
    more than `tolerance` of the clean score, since the search only proves it above the threshold.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction {fraction} is invalid: damage is a score below a fraction in (0, 1] of the clean score")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance {tolerance} is invalid: a fraction of the clean score in [0, 1), e.g. 0.05")
    memo: dict[bytes, float] = {}

    def subset_score(indices: np.ndarray) -> float:
        key = np.sort(indices).tobytes()
        if key not in memo:
            memo[key] = score(fault_map.subset(indices))
        return memo[key]

    clean = score(None)
    threshold = fraction * clean
    everything = np.arange(len(fault_map))
    flipped = fault_map.flipped
    outcome = Bisection(len(fault_map), clean, subset_score(everything), threshold, tolerance=tolerance)
    outcome.fault_bits = [int(np.count_nonzero(flipped >> bit & 1)) for bit in range(32)]
    stored = fault_map.spec.get("storage", "none") != "none"  # rows name "<weight>.<field>"
    if stored:
        names = np.array([info.name.rpartition(".")[2] for info in fault_map.params])[fault_map.param]
        outcome.faults_by_field = {name: int(count) for name, count in zip(*np.unique(names, return_counts=True), strict=True)}
    if not outcome.full_score < threshold:
        raise ValueError(f"the whole map scores {outcome.full_score:.4g}, not below the threshold {threshold:.4g}: nothing to bisect")

    def degrades(indices: np.ndarray) -> bool:
        return subset_score(indices) < threshold

    found = np.empty(0, dtype=np.int64)
    rest = everything
    while len(rest) and degrades(rest):  # until what is left is harmless
        group = minimal_failing_subset(rest, degrades)
        found, rest = np.union1d(found, group), np.setdiff1d(rest, group)
    outcome.indices = found.tolist()
    outcome.culprits_score = subset_score(found)
    outcome.rest_score = subset_score(rest)
    for fault in found:
        info = fault_map.params[int(fault_map.param[fault])]
        layout = layout_named(info.dtype)
        assert layout is not None  # a loaded map's dtypes are checked
        old, new = int(fault_map.old[fault]), int(fault_map.new[fault])
        component, layer = sites.get(info.name.rpartition(".")[0] if stored else info.name, ("?", None))
        outcome.culprits.append(
            Culprit(
                param=info.name,
                component=component,
                layer=layer,
                index=int(fault_map.index[fault]),
                bits=[bit for bit in range(layout.width) if (old ^ new) >> bit & 1],
                old_value=word_value(old, layout),
                new_value=word_value(new, layout),
                score_alone=subset_score(np.array([fault])),
            )
        )
    outcome.evaluations = len(memo) + 1  # every distinct subset, plus the clean run
    return outcome


def expected_evaluations(faults: int) -> tuple[int, int]:
    """The evaluations `bisect` takes on `faults` faults holding one culprit, at most, and what
    each further culprit adds: the clean run and the whole map, then per culprit two halves per
    halving down to one fault and the check that the rest is harmless (its score alone is
    memoised by then). Faults that only do damage together take more: a progress line's
    estimate, raised as the work outgrows it, not a bound."""
    per_culprit = 1 + 2 * max(1, math.ceil(math.log2(max(faults, 2))))
    return 2 + per_culprit, per_culprit
