"""The comparison of storage formats: one curve per storage's sweep, one table and one figure.

p is the probability per *stored* bit; "faults per weight" is p times the storage's stored bits
per weight, which is what compares a 5-bit format with a 32-bit one. Each storage is measured
against its own clean score (the storage at p=0), and that clean score against the float
model's. "Tolerated" is the highest p at which this and every lower p score within 5% of the
storage's own clean score (mean over seeds). Points where most requests were degenerate or
non-finite are *collapsed* (`collapse.is_collapsed`): their score is lm-eval's tie-break, so the
figure draws them hollow and the table says from which p the storage collapses, lest a
collapsed model read as a chance-level one.
"""

from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lm_eval_faults.core.files import write_atomically
from lm_eval_faults.core.report import stored_bits_per_weight
from lm_eval_faults.study.collapse import is_collapsed
from lm_eval_faults.study.metrics import baseline_score, baseline_tasks, record_score
from lm_eval_faults.study.records import RESULTS_FILE, load_records

TOLERANCE = 0.05
TABLE_FILE, FIGURE_FILE, CURVES_FILE = "storages.md", "storages.png", "storages.json"


@dataclass(frozen=True)
class StoragePoint:
    p: float
    score: float
    """Mean over seeds."""
    seeds: int
    collapsed: int
    """Seeds whose point collapsed (most requests degenerate or non-finite)."""


@dataclass(frozen=True)
class StorageCurve:
    label: str
    bits_per_weight: float
    clean: float
    points: tuple[StoragePoint, ...]

    def tolerated(self) -> float | None:
        """The highest p at which this and every lower p score within TOLERANCE of the clean score."""
        best = None
        for point in self.points:
            if not point.score >= (1 - TOLERANCE) * self.clean:
                break
            best = point.p
        return best

    def collapses_at(self) -> float | None:
        """The lowest p at which most seeds collapsed."""
        return next((point.p for point in self.points if 2 * point.collapsed > point.seeds), None)


def curve_of(label: str, run_dir: Path, float_bits: float) -> StorageCurve:
    """A storage's curve from its sweep's records; `float_bits` is the run dtype's width, the
    stored bits per weight of a sweep without `storage=` (whose records carry no storage summary)."""
    records = load_records(run_dir / RESULTS_FILE)
    tasks = baseline_tasks(records)
    by_p: dict[float, list[tuple[float, bool]]] = defaultdict(list)
    bits = None
    for record in records:
        if record.get("baseline"):
            continue
        by_p[float(record["p"])].append((record_score(record, tasks), bool(is_collapsed(record))))
        if bits is None and record.get("storage"):
            bits = stored_bits_per_weight(record["storage"])
    points = tuple(
        StoragePoint(p, sum(score for score, _ in runs) / len(runs), len(runs), sum(collapsed for _, collapsed in runs))
        for p, runs in sorted(by_p.items())
    )
    return StorageCurve(label, float_bits if bits is None else bits, baseline_score(records, tasks), points)


def table_lines(curves: list[StorageCurve]) -> list[str]:
    """The markdown table: per storage its clean score (and against the float model's), its
    stored bits per weight, the tolerated p and the faults per weight there, and where it collapses."""
    reference = curves[0].clean if curves else math.nan  # the float model comes first (`parse_storages`)
    lines = [
        "| storage | clean score | / float model's | stored bits per weight | highest p within 5% of clean | faults per weight there | collapsed from p |",
        "|---|---|---|---|---|---|---|",
    ]
    for curve in curves:
        best, collapse = curve.tolerated(), curve.collapses_at()
        ratio = f"{curve.clean / reference:.3f}" if reference else "—"
        lines.append(
            f"| {curve.label} | {curve.clean:.3f} | {ratio} | {curve.bits_per_weight:.2f} | "
            f"{'< lowest p' if best is None else f'{best:.2g}'} | {'—' if best is None else f'{best * curve.bits_per_weight:.2g}'} | "
            f"{'—' if collapse is None else f'{collapse:.2g}'} |"
        )
    return lines


def write_comparison(out: Path, curves: list[StorageCurve], title: str) -> Path:
    """storages.md, storages.png and storages.json in `out`; returns the table's path."""
    out.mkdir(parents=True, exist_ok=True)
    table = out / TABLE_FILE
    image = io.BytesIO()
    _figure(curves).savefig(image, format="png", dpi=120)
    write_atomically(out / FIGURE_FILE, image.getvalue())
    write_atomically(out / CURVES_FILE, json.dumps([asdict(curve) for curve in curves], indent=1).encode())
    text = f"# Storage formats ({title})\n\n" + "\n".join(table_lines(curves)) + f"\n\n![the curves]({FIGURE_FILE})\n"
    write_atomically(table, text.encode())
    return table


def load_curves(path: Path) -> list[StorageCurve]:
    """The curves a comparison saved (`storages.json`)."""
    return [
        StorageCurve(item["label"], item["bits_per_weight"], item["clean"], tuple(StoragePoint(**point) for point in item["points"]))
        for item in json.loads(path.read_text())
    ]


def _figure(curves: list[StorageCurve]) -> Figure:
    """Score over the storage's own clean score, against p per stored bit and faults per weight."""
    figure = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(figure)
    per_bit, per_weight = figure.subplots(1, 2, sharey=True)
    for curve in curves:
        relative = [point.score / curve.clean if curve.clean else math.nan for point in curve.points]
        for axis, scale in ((per_bit, 1.0), (per_weight, curve.bits_per_weight)):
            xs = [point.p * scale for point in curve.points]
            (line,) = axis.plot(xs, relative, marker="o", label=curve.label)
            hollow = [(x, y) for x, y, point in zip(xs, relative, curve.points, strict=True) if 2 * point.collapsed > point.seeds]
            if hollow:
                axis.plot(
                    [x for x, _ in hollow],
                    [y for _, y in hollow],
                    linestyle="none",
                    marker="o",
                    markersize=9,
                    markerfacecolor="white",
                    color=line.get_color(),
                )
    for axis, xlabel in ((per_bit, "p per stored bit"), (per_weight, "faults per weight (p x stored bits per weight)")):
        axis.set_xscale("log")
        axis.axhline(1 - TOLERANCE, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(xlabel)
    per_bit.set_ylabel("score / the storage's own clean score")
    per_bit.set_title("hollow: most seeds collapsed (degenerate or non-finite answers)", fontsize=9)
    per_weight.legend(fontsize=8)
    figure.tight_layout()
    return figure
