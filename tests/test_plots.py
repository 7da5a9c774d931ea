"""Figures and the Markdown report, built from a small synthetic results.jsonl."""

from __future__ import annotations

import json
import re

import pytest
from lm_eval_faults.study import plots, sweep_report
from lm_eval_faults.study.metrics import build_series
from lm_eval_faults.study.sweep_report import (
    REPORT_FILE,
    build_report,
    default_layer_bar_p,
)

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
    curves = [sweep_report.drift_curve(s, by_id) for s in components]
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
