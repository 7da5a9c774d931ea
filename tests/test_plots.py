"""Figures and the Markdown report, built from a small synthetic results.jsonl."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from lm_eval_faults.study import drift_curves, plots
from lm_eval_faults.study.report_figures import default_layer_bar_p
from lm_eval_faults.study.series import build_series
from lm_eval_faults.study.sweep_report import REPORT_FILE, build_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
P_GRID = [1e-7, 1e-5, 1e-3]


def point(point_id, *, target, layers, p, seed, acc, elements, expected=True):
    record = {
        "point_id": point_id,
        "baseline": False,
        "fault": "bitflip",
        "site": "weights",
        "target": target,
        "layers": layers,
        "p": p,
        "seed": seed,
        "injected": {"elements": elements, "bits": elements + 1},
        "nonfinite": {"weights": int(p > 1e-4), "requests": {"task_b": 2} if p > 1e-4 else {}},
        "metrics": {"task_a": {"acc": acc, "acc_stderr": 0.02}, "task_b": {"exact_match": acc / 2}},
        "elapsed_s": 0.5,
    }
    if expected:
        record["expected"] = {"elements": elements * 1.01, "bits": elements * 1.02}
    return record


def synthetic_records():
    """Baseline acc 0.8; three components x three rates x two seeds; two layer groups, one seed."""
    records = [
        {
            "point_id": "baseline",
            "baseline": True,
            "fault": "bitflip",
            "site": "weights",
            "target": "none",
            "layers": "all",
            "p": 0,
            "seed": 0,
            "injected": {"elements": 0, "bits": 0},
            "nonfinite": {"weights": 0, "requests": {}},
            "metrics": {"task_a": {"acc": 0.8}, "task_b": {"exact_match": 0.4}},
            "elapsed_s": 0.4,
        }
    ]
    for target, size, drop in [("attention", 1e5, 0.3), ("mlp", 2e5, 0.5), ("norm", 1e2, 0.05)]:
        for i, p in enumerate(P_GRID):
            for seed in (0, 1):
                acc = max(0.0, 0.8 - drop * i - 0.02 * seed)
                records.append(point(f"{target}|{p}|{seed}", target=target, layers="all", p=p, seed=seed, acc=acc, elements=int(p * size)))
    for layers, drop in [("0-3", 0.35), ("4-7", 0.1)]:
        for i, p in enumerate(P_GRID):
            records.append(
                point(f"L{layers}|{p}", target="all", layers=layers, p=p, seed=0, acc=0.8 - drop * i, elements=int(p * 5e4), expected=False)
            )
    return records


@pytest.fixture
def run_dir(tmp_path):
    lines = [json.dumps(r) for r in synthetic_records()]
    # A killed sweep's half-written last line must not stop the report.
    text = "\n".join(lines) + '\n{"point_id": "mlp|0.1|0", "baseline": fal'
    (tmp_path / "results.jsonl").write_text(text, encoding="utf-8")
    return tmp_path


def assert_png(path):
    assert path.is_file()
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_each_plot_writes_a_png(tmp_path):
    baseline, series = build_series(synthetic_records())
    components = [s for s in series if s.key.layers == "all"]
    layer_groups = [s for s in series if s.key.layers != "all"]
    written = [
        plots.plot_accuracy_vs_p(components, baseline, tmp_path / "acc.png", chance=0.25),
        plots.plot_relchange_vs_p(components, tmp_path / "rel_p.png"),
        plots.plot_relchange_vs_count(components, tmp_path / "sub" / "rel_n.png"),
        plots.plot_layer_bars(layer_groups, 1e-3, tmp_path / "bars.png", title="layers"),
    ]
    assert written == [tmp_path / n for n in ["acc.png", "rel_p.png", "sub/rel_n.png", "bars.png"]]
    for path in written:
        assert_png(path)


def test_layer_bars_reject_a_rate_that_was_not_run(tmp_path):
    _, series = build_series(synthetic_records())
    with pytest.raises(ValueError, match="no series has a grid point"):
        plots.plot_layer_bars(series, 0.5, tmp_path / "bars.png")


def test_series_labels_name_only_what_varies():
    _, series = build_series(synthetic_records())
    components = [s.key for s in series if s.key.layers == "all"]
    assert plots.series_labels(components) == ["attention", "mlp", "norm"]
    layer_groups = [s.key for s in series if s.key.layers != "all"]
    assert plots.series_labels(layer_groups) == ["layers=0-3", "layers=4-7"]


def test_default_layer_bar_p_is_first_rate_with_a_50_percent_drop():
    _, series = build_series(synthetic_records())
    layer_groups = [s for s in series if s.key.layers != "all"]
    # Baseline score (0.8 + 0.4) / 2 = 0.6. Group 0-3 at p = 1e-5 scores
    # (0.45 + 0.225) / 2 = 0.3375: change 0.4375 < 0.5; at 1e-3 (0.1 + 0.05) / 2 = 0.075:
    # change 0.875 >= 0.5.
    assert default_layer_bar_p(layer_groups) == pytest.approx(1e-3)
    # With the level at 40%, 1e-5 already qualifies.
    assert default_layer_bar_p(layer_groups, fraction=0.4) == pytest.approx(1e-5)


def test_build_report_writes_markdown_and_figures(run_dir):
    with pytest.warns(UserWarning, match="partial last line"):
        report = build_report(run_dir, weighting="log_p")
    assert report == run_dir / REPORT_FILE
    text = report.read_text(encoding="utf-8")
    for heading in [
        "## Baseline",
        "## Thresholds and AWRCL per series",
        "## Rankings",
        "### Components — bitflip/weights, layers=all",
        "### Layer groups — bitflip/weights, target=all",
        "## Figures",
        "## Points",
    ]:
        assert heading in text
    assert "weighting `log_p`" in text
    assert "| expected elements |" in text and "| expected bits |" in text
    assert "2 (task_b: 2)" in text  # non-finite requests with their per-task breakdown
    assert "mlp|0.1|0" not in text  # the truncated point is not reported

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    # Two families x three line plots, plus the layer-group bars.
    assert len(images) == 7
    for rel in images:
        assert_png(run_dir / rel)
    assert {p.parent for p in (run_dir / rel for rel in images)} == {run_dir / "figures"}


def test_build_report_layer_bars_at_requested_rate(run_dir):
    with pytest.warns(UserWarning):
        text = build_report(run_dir, p_for_layer_bars=1e-5).read_text(encoding="utf-8")
    assert "relative change per layer group at p=1e-05" in text
    with pytest.warns(UserWarning):
        text = build_report(run_dir, p_for_layer_bars=0.5).read_text(encoding="utf-8")
    assert "Not drawn: no layer group was run at p=0.5." in text


def test_build_report_rejects_unknown_weighting(run_dir):
    with pytest.raises(ValueError, match="unknown weighting"):
        build_report(run_dir, weighting="linear")


def test_report_command_rebuilds_from_the_results_file_alone(run_dir, capsys):
    from lm_eval_faults.cli import main

    with pytest.warns(UserWarning, match="partial last line"):
        assert main(["report", str(run_dir), "--weighting", "p"]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / REPORT_FILE)
    assert "weighting `p`" in (run_dir / REPORT_FILE).read_text(encoding="utf-8")
    assert any((run_dir / "figures").glob("*.png"))


def test_axes_say_which_direction_means_accuracy_lost(tmp_path, monkeypatch):
    labels = []
    original = plots._save

    def spy(fig, ax, out_path, title, **kwargs):
        labels.append(ax.get_ylabel())
        return original(fig, ax, out_path, title, **kwargs)

    monkeypatch.setattr(plots, "_save", spy)
    baseline, series = build_series(synthetic_records())
    plots.plot_accuracy_vs_p(series, baseline, tmp_path / "a.png")
    plots.plot_relchange_vs_p(series, tmp_path / "r.png")
    assert labels == ["accuracy (higher is better)", "relative accuracy loss (1 = all lost, 0 = none, < 0 = gain)"]


def test_report_marks_collapsed_points_and_old_records_as_unknown(tmp_path):
    records = synthetic_records()
    for r in records:
        if r["point_id"] == "mlp|0.001|0":
            r["degenerate"] = {"requests": {"task_a": 30, "task_b": 5}}
            r["requests"] = {"task_a": 40, "task_b": 10}
        elif r["point_id"] == "mlp|1e-05|0":
            r["degenerate"] = {"requests": {"task_a": 1, "task_b": 0}}
            r["requests"] = {"task_a": 40, "task_b": 10}
        elif r["point_id"] == "attention|0.001|0":  # NaN everywhere: the tie-break again, not chance
            r["degenerate"] = {"requests": {"task_a": 0, "task_b": 0}}
            r["requests"] = {"task_a": 40, "task_b": 10}
            r["nonfinite"] = {**r.get("nonfinite", {}), "requests": {"task_a": 40, "task_b": 10}}
    mlp_nonfinite = sum(next(r for r in records if r["point_id"] == "mlp|0.001|0").get("nonfinite", {}).get("requests", {}).values())
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert "| degenerate requests |" in text and "| collapsed points |" in text
    assert f"**collapsed** (35 degenerate, {mlp_nonfinite} non-finite of 50)" in text
    assert "**collapsed** (0 degenerate, 50 non-finite of 50)" in text
    assert "1 (task_a: 1, task_b: 0)" in text
    mlp_row = next(line for line in text.splitlines() if line.startswith("| bitflip | weights | mlp |"))
    assert mlp_row.endswith("| 1 of 2 |")
    norm_row = next(line for line in text.splitlines() if line.startswith("| bitflip | weights | norm |"))
    assert norm_row.endswith("| — |")


def with_drift(records):
    """The synthetic records with a drift entry on every faulty point: flips and KL grow with p,
    a generative task counts its changed outputs, and the norm series never moves (zero drift)."""
    for r in records:
        if r["baseline"]:
            continue
        step = P_GRID.index(r["p"])
        moved = 0 if r["target"] == "norm" else step + 1
        r["drift"] = {
            "task_a": {"output_type": "multiple_choice", "matched": 40, "nonfinite": 0, "flips": 4 * moved, "mean_kl": 0.1 * moved},
            "task_b": {"output_type": "generate_until", "matched": 10, "nonfinite": 0, "flips": None, "diverged": moved, "mean_kl": None},
        }
    return records


def test_drift_figure_sits_under_the_score_and_its_axes_say_which_way_is_damage():
    records = with_drift(synthetic_records())
    baseline, series = build_series(records)
    by_id = {r["point_id"]: r for r in records}
    components = [s for s in series if s.key.layers == "all"]
    curves = [drift_curves.drift_curve(s, by_id) for s in components]
    mlp = next(c for c in curves if c.key.target == "mlp")
    # Pooled over tasks: (4 + 1) of 50 answers at the first rate, both seeds alike.
    assert mlp.flip_rate[0].mean == pytest.approx(0.1) and mlp.flip_rate[0].ci_low < 0.1 < mlp.flip_rate[0].ci_high
    assert mlp.kl[2].mean == pytest.approx(0.3) and (mlp.kl[2].ci_low, mlp.kl[2].ci_high) == pytest.approx((0.3, 0.3))
    norm = next(c for c in curves if c.key.target == "norm")
    assert [st.mean for st in norm.flip_rate] == [0.0, 0.0, 0.0] and [st.mean for st in norm.kl] == [0.0, 0.0, 0.0]
    figure = plots.drift_figure(components, curves, baseline, chance=0.25, title="components")
    assert [ax.get_ylabel() for ax in figure.axes] == [plots.ACCURACY_LABEL, plots.FLIP_LABEL, plots.KL_LABEL]
    assert "0 = none" in plots.FLIP_LABEL and "KL(clean ‖ faulted) over choices" in plots.KL_LABEL
    assert figure.axes[2].get_yscale() == "log" and figure.axes[2].get_xscale() == "log"


def test_report_draws_drift_beside_the_score_and_tabulates_the_flip_rate(tmp_path):
    records = with_drift(synthetic_records())
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    text = build_report(tmp_path).read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 9  # the 7 of an old sweep plus one drift figure per family
    drift_images = [rel for rel in images if "drift_vs_p__" in rel]
    assert drift_images == [
        "figures/drift_vs_p__bitflip_weights_components.png",
        "figures/drift_vs_p__bitflip_weights_target_all_layer_groups.png",
    ]
    for rel in drift_images:
        assert_png(tmp_path / rel)
    assert images.index(drift_images[0]) == images.index("figures/accuracy_vs_p__bitflip_weights_components.png") + 1
    assert "| flip rate vs clean | KL vs clean |" in text
    assert "| 15/50 (0.3) | 0.3 |" in text  # attention or mlp at the largest rate
    assert "| 0/50 (0) | 0 |" in text  # norm: no answer moved
    baseline_row = next(line for line in text.splitlines() if line.startswith("| baseline |"))
    assert "| ref | ref |" in baseline_row


def test_records_without_drift_still_report(run_dir):
    with pytest.warns(UserWarning, match="partial last line"):
        text = build_report(run_dir).read_text(encoding="utf-8")
    assert "Not drawn: no point of this family recorded drift" in text
    assert not (run_dir / "figures" / "drift_vs_p__bitflip_weights_components.png").exists()
    row = next(line for line in text.splitlines() if line.startswith("| mlp\\|0.001\\|0 |"))
    assert "| — | — |" in row


# --------------------------------------------------------------------------- figures that can't mislead


@pytest.fixture
def drawn(monkeypatch):
    """Every figure the code under test saves, by file name, read through matplotlib's objects."""
    figures = {}
    original = plots._write

    def spy(fig, out_path):
        figures[Path(out_path).name] = fig
        return original(fig, out_path)

    monkeypatch.setattr(plots, "_write", spy)
    return figures


def set_point(records, point_id, **fields):
    record = next(r for r in records if r["point_id"] == point_id)
    record.update(fields)


def collapse(records):
    """mlp at the largest rate, seed 0: 35 of 50 requests degenerate (the report's "collapsed")."""
    set_point(records, "mlp|0.001|0", degenerate={"requests": {"task_a": 30, "task_b": 5}}, requests={"task_a": 40, "task_b": 10})


def all_nonfinite(records):
    """attention at the largest rate, seed 1: every request NaN."""
    set_point(
        records,
        "attention|0.001|1",
        degenerate={"requests": {"task_a": 0, "task_b": 0}},
        requests={"task_a": 40, "task_b": 10},
        nonfinite={"weights": 1, "requests": {"task_a": 40, "task_b": 10}},
    )


def attention_as_mlp(records):
    """attention's points score, and are hit, exactly as mlp's: its lines would hide under mlp's."""
    mlp = {(r["p"], r["seed"]): r for r in records if r.get("target") == "mlp"}
    for r in records:
        if r.get("target") == "attention":
            twin = json.loads(json.dumps(mlp[(r["p"], r["seed"])]))
            r.update(metrics=twin["metrics"], injected=twin["injected"])


def unchanged(records):
    pass


LINE_FIGURES = [
    "accuracy_vs_p__bitflip_weights_components.png",
    "relchange_vs_p__bitflip_weights_components.png",
    "relchange_vs_count__bitflip_weights_components.png",
    "drift_vs_p__bitflip_weights_components.png",
]
COLLAPSED_LABEL = plots.MARK_STYLES[plots.COLLAPSED]["label"]
NONFINITE_LABEL = plots.MARK_STYLES[plots.NONFINITE]["label"]
# (case, how the records are spoilt, legend entries expected, marker lines expected as (marker, colour, number of points))
MARK_CASES = [
    ("clean", unchanged, [], []),
    ("collapsed", collapse, [COLLAPSED_LABEL], [("x", "red", 1)]),
    ("all non-finite", all_nonfinite, [NONFINITE_LABEL], [("X", "darkred", 1)]),
    ("both", lambda r: (collapse(r), all_nonfinite(r)), [NONFINITE_LABEL, COLLAPSED_LABEL], [("X", "darkred", 1), ("x", "red", 1)]),
    ("coinciding", attention_as_mlp, ["mlp (= attention)"], []),
]


def legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def report_figures(tmp_path, drawn, spoil):
    records = with_drift(synthetic_records())
    spoil(records)
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    build_report(tmp_path)
    return drawn


@pytest.mark.parametrize(("case", "spoil", "entries", "marker_lines"), MARK_CASES, ids=[c[0] for c in MARK_CASES])
def test_line_figures_mark_collapsed_points_and_coinciding_series(tmp_path, drawn, case, spoil, entries, marker_lines):
    figures = report_figures(tmp_path, drawn, spoil)
    for name in LINE_FIGURES:
        check_marks(figures[name].axes[0], case, entries, marker_lines)


def check_marks(ax, case, entries, marker_lines):
    texts = legend_texts(ax)
    special = [t for t in texts if t in (COLLAPSED_LABEL, NONFINITE_LABEL) or "(=" in t]
    assert special == entries
    crosses = [
        (line.get_marker(), line.get_color(), len(line.get_xdata()))
        for line in ax.get_lines()
        if line.get_marker() in ("x", "X") and line.get_linestyle() == "None"
    ]
    assert crosses == marker_lines
    if case == "coinciding":
        lines = {line.get_label(): line for line in ax.get_lines()}
        under, over = lines["attention"], lines["mlp (= attention)"]
        assert list(over.get_ydata()) == list(under.get_ydata())  # same points, yet both visible:
        assert (under.get_linestyle(), under.get_marker()) == ("-", "o")
        assert over.get_linestyle() == "--" and over.get_marker() == "s" and over.get_markerfacecolor() == "none"
        assert over.get_markersize() > under.get_markersize()


def test_the_collapsed_cross_sits_on_the_collapsed_grid_point(tmp_path, drawn):
    ax = report_figures(tmp_path, drawn, collapse)["accuracy_vs_p__bitflip_weights_components.png"].axes[0]
    cross = next(line for line in ax.get_lines() if line.get_marker() == "x")
    mlp = next(line for line in ax.get_lines() if line.get_label() == "mlp")
    assert list(cross.get_xdata()) == [pytest.approx(1e-3)]
    assert list(cross.get_ydata()) == [pytest.approx(mlp.get_ydata()[-1])]


def test_layer_bars_mark_a_collapsed_group(tmp_path, drawn):
    def spoil(records):
        set_point(records, "L0-3|0.001", degenerate={"requests": {"task_a": 40, "task_b": 10}}, requests={"task_a": 40, "task_b": 10})

    ax = report_figures(tmp_path, drawn, spoil)["layer_bars__bitflip_weights_target_all_layer_groups.png"].axes[0]
    assert legend_texts(ax) == [COLLAPSED_LABEL]
    cross = next(line for line in ax.get_lines() if line.get_marker() == "x")
    assert list(cross.get_xdata()) == [0]  # the first bar, layers 0-3


def test_drift_panels_tell_coinciding_curves_apart(tmp_path, drawn):
    figure = report_figures(tmp_path, drawn, unchanged)["drift_vs_p__bitflip_weights_components.png"]
    # with_drift moves attention and mlp alike: their flip and KL curves coincide.
    for ax in figure.axes[1:]:
        assert legend_texts(ax) == ["mlp (= attention)"]


def kl_zero_in_one_seed(records):
    """attention at the smallest rate: seed 0's KL is 0, seed 1's 0.1, so the band starts at 0."""
    for r in records:
        if r.get("target") == "attention" and r["p"] == P_GRID[0] and r["seed"] == 0:
            r["drift"]["task_a"]["mean_kl"] = 0.0


def no_kl_anywhere(records):
    for r in records:
        if "drift" in r:
            r["drift"]["task_a"]["mean_kl"] = 0.0


# (case, spoil, y scale, the floor zeros are drawn at: a decade under the smallest positive KL; None on a linear axis)
KL_CASES = [
    ("one seed at 0", kl_zero_in_one_seed, "log", 0.005),  # attention's mean (0 + 0.1) / 2 is the smallest
    ("a series all 0 (norm)", unchanged, "log", 0.01),
    ("every KL 0", no_kl_anywhere, "linear", None),
]


@pytest.mark.parametrize(("case", "spoil", "scale", "floor"), KL_CASES, ids=[c[0] for c in KL_CASES])
def test_kl_zeros_sit_at_a_stated_floor_on_the_log_axis(tmp_path, drawn, case, spoil, scale, floor):
    kl_ax = report_figures(tmp_path, drawn, spoil)["drift_vs_p__bitflip_weights_components.png"].axes[2]
    assert kl_ax.get_ylabel() == plots.KL_LABEL and kl_ax.get_yscale() == scale
    texts = " ".join(t.get_text() for t in kl_ax.texts)
    assert ("drawn at the floor" in texts) == (floor is not None)
    if floor is not None:
        assert f"floor {floor:g}" in texts
        band_ys = [y for band in kl_ax.collections for path in band.get_paths() for y in path.vertices[:, 1]]
        assert band_ys and min(band_ys) == pytest.approx(floor)  # no band edge falls off the axis
        norm = [line for line in kl_ax.get_lines() if line.get_marker() == "v"]
        assert norm and all(list(line.get_ydata()) == [pytest.approx(floor)] * len(line.get_ydata()) for line in norm)
        all_at_floor = [line for line in kl_ax.get_lines() if line.get_marker() == "o" and set(line.get_ydata()) == {floor}]
        assert len(all_at_floor) == 1  # norm's line is drawn, at the floor, not left out


def test_protection_figure_marks_a_collapsed_unprotected_point(tmp_path, drawn):
    def spoil(records):
        collapse(records)  # mlp, unprotected, at 1e-3
        protected = [dict(r, point_id=f"{r['point_id']}|secded", protection="secded") for r in records if r.get("target") == "mlp"]
        for r in protected:
            r.pop("degenerate", None)
        records += protected

    figures = report_figures(tmp_path, drawn, spoil)
    ax = figures["accuracy_vs_p__protections__bitflip_weights_mlp_layers_all.png"].axes[0]
    assert legend_texts(ax) == ["protection=none", "protection=secded (= protection=none)", "baseline (p=0)", COLLAPSED_LABEL]


def test_the_report_names_the_fault_keys_every_point_shares(run_dir):
    """A sweep under `--fault_args pattern=burst:4` must say so: its series keys do not."""
    (run_dir / "sweep.json").write_text(json.dumps({"fault_args": "pattern=burst:4"}), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = build_report(run_dir).read_text(encoding="utf-8")
    assert "Fault keys fixed across the grid (`--fault_args`): `pattern=burst:4`." in text
