"""Sweep metrics against values worked out by hand (the arithmetic is in each test)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from lm_eval_faults.study.awrcl import awrcl, grid_weights, threshold_crossing
from lm_eval_faults.study.bootstrap import task_sizes
from lm_eval_faults.study.metrics import baseline_score, baseline_tasks, primary_metric, record_score, relative_change
from lm_eval_faults.study.rankings import rank, rankings, summarize_series
from lm_eval_faults.study.records import MalformedRecordError, load_records
from lm_eval_faults.study.series import build_series, layer_sort_key


def record(point_id, *, target="attention", layers="all", p=1e-5, seed=0, acc=0.5, elements=10, baseline=False):
    return {
        "point_id": point_id,
        "baseline": baseline,
        "fault": "bitflip",
        "site": "weights",
        "target": "none" if baseline else target,
        "layers": layers,
        "p": 0 if baseline else p,
        "seed": seed,
        "injected": {"elements": elements, "bits": elements},
        "nonfinite": {"weights": 0, "requests": {}},
        "metrics": {"task_a": {"acc": acc, "acc_stderr": 0.01}},
        "elapsed_s": 1.0,
    }


# --------------------------------------------------------------------------- loading


def write_lines(tmp_path, lines, trailing_newline=True):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


def test_truncated_last_line_is_skipped_with_warning(tmp_path):
    good = [json.dumps(record("a")), json.dumps(record("b"))]
    path = write_lines(tmp_path, [*good, '{"point_id": "c", "metr'], trailing_newline=False)
    with pytest.warns(UserWarning, match="partial last line"):
        records = load_records(path)
    assert [r["point_id"] for r in records] == ["a", "b"]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = write_lines(tmp_path, [json.dumps(record("a")), json.dumps(record("b"))], trailing_newline=False)
    assert [r["point_id"] for r in load_records(path)] == ["a", "b"]


def test_malformed_middle_line_raises_with_line_number(tmp_path):
    path = write_lines(tmp_path, [json.dumps(record("a")), "{broken", json.dumps(record("b"))])
    with pytest.raises(MalformedRecordError, match=r"results.jsonl:2"):
        load_records(path)


def test_malformed_middle_line_can_be_skipped(tmp_path):
    path = write_lines(tmp_path, [json.dumps(record("a")), "[1, 2]", "", json.dumps(record("b"))])
    with pytest.warns(UserWarning, match="not a JSON object"):
        records = load_records(path, skip_malformed=True)
    assert [r["point_id"] for r in records] == ["a", "b"]


def test_rerun_point_keeps_the_later_record(tmp_path):
    path = write_lines(tmp_path, [json.dumps(record("a", acc=0.1)), json.dumps(record("b")), json.dumps(record("a", acc=0.9))])
    records = load_records(path)
    assert [r["point_id"] for r in records] == ["a", "b"]
    assert records[0]["metrics"]["task_a"]["acc"] == 0.9


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"acc_norm": 0.3, "acc": 0.2, "acc_stderr": 0.01}, ("acc", 0.2)),
        ({"acc_norm": 0.3, "acc_norm_stderr": 0.01}, ("acc_norm", 0.3)),
        ({"f1": 0.9, "exact_match": 0.4}, ("exact_match", 0.4)),
        ({"bleu_stderr": 0.1, "alias": "x", "bleu": 12.5, "chrf": 40.0}, ("bleu", 12.5)),
        ({"alias": "x", "acc_stderr": "N/A"}, None),
    ],
)
def test_primary_metric_preference(metrics, expected):
    assert primary_metric(metrics) == expected


def test_record_score_is_mean_of_primary_metrics():
    r = {"metrics": {"a": {"acc": 0.6}, "b": {"exact_match": 0.2}, "c": {"acc_norm": 0.7}}}
    # (0.6 + 0.2) / 2 = 0.4 over the chosen tasks; task c is not part of the score.
    assert record_score(r, ["a", "b"]) == pytest.approx(0.4)
    assert math.isnan(record_score(r, ["a", "missing"]))


def test_baseline_tasks_and_score():
    records = [record("base", baseline=True, acc=0.8), record("x", acc=0.1)]
    assert baseline_tasks(records) == ["task_a"]
    assert baseline_score(records, ["task_a"]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no baseline"):
        baseline_tasks([record("x")])


def test_relative_change():
    # (0.8 - 0.6) / 0.8 = 0.25; a faulty score above baseline gives a negative change.
    assert relative_change(0.8, 0.6) == pytest.approx(0.25)
    assert relative_change(0.8, 1.0) == pytest.approx(-0.25)
    np.testing.assert_allclose(relative_change(0.5, np.array([0.5, 0.25, 0.0])), [0, 0.5, 1])
    assert math.isnan(relative_change(0.0, 0.3))


# --------------------------------------------------------------------------- AWRCL

X = [1e-9, 1e-7, 1e-6]
R = [0.0, 0.2, 0.6]


def test_grid_weights():
    np.testing.assert_allclose(grid_weights(X, "uniform"), [1, 1, 1])
    # log10 x = -9, -7, -6; cell edges -9, -8, -6.5, -6 -> widths 1, 1.5, 0.5.
    np.testing.assert_allclose(grid_weights(X, "log_p"), [1.0, 1.5, 0.5])
    np.testing.assert_allclose(grid_weights(X, "p"), X)
    # A zero count has no log position: weight 0, and the others are spaced among themselves.
    np.testing.assert_allclose(grid_weights([0, 10, 1000], "log_p"), [0, 1, 1])
    with pytest.raises(ValueError, match="unknown weighting"):
        grid_weights(X, "linear")


def test_awrcl_weightings():
    # uniform: (0 + 0.2 + 0.6) / 3
    assert awrcl(X, R, "uniform") == pytest.approx(0.8 / 3)
    # log_p: (1*0 + 1.5*0.2 + 0.5*0.6) / (1 + 1.5 + 0.5) = 0.6 / 3
    assert awrcl(X, R, "log_p") == pytest.approx(0.2)
    # p: (1e-9*0 + 1e-7*0.2 + 1e-6*0.6) / (1e-9 + 1e-7 + 1e-6) = 6.2e-7 / 1.101e-6
    assert awrcl(X, R, "p") == pytest.approx(6.2e-7 / 1.101e-6)


def test_awrcl_edge_cases():
    # Input order does not matter: the grid is sorted first.
    assert awrcl(X[::-1], R[::-1], "log_p") == pytest.approx(0.2)
    # NaN relative changes are dropped: uniform over (0, 0.6) = 0.3.
    assert awrcl(X, [0.0, math.nan, 0.6]) == pytest.approx(0.3)
    # A single point is its own average under any weighting.
    assert awrcl([1e-5], [0.7], "log_p") == pytest.approx(0.7)
    assert math.isnan(awrcl([], []))
    assert math.isnan(awrcl([0, 0], [0.1, 0.2], "p"))


# --------------------------------------------------------------------------- thresholds


def test_threshold_interpolates_in_log_p():
    # Level 0.5 lies between (1e-5, 0.3) and (1e-4, 0.7): t = (0.5 - 0.3) / (0.7 - 0.3) = 0.5,
    # log10 p = -5 + 0.5 * (-4 - -5) = -4.5.
    x, r = [1e-6, 1e-5, 1e-4], [0.1, 0.3, 0.7]
    assert threshold_crossing(x, r) == pytest.approx(10**-4.5)
    # fraction 0.25 lies between (1e-6, 0.1) and (1e-5, 0.3): t = 0.15 / 0.2 = 0.75 -> -5.25.
    assert threshold_crossing(x, r, fraction=0.25) == pytest.approx(10**-5.25)


def test_threshold_edge_cases():
    # Exactly at the level counts as crossed, at that grid point.
    assert threshold_crossing([1e-6, 1e-5], [0.1, 0.5]) == pytest.approx(1e-5)
    # Already crossed at the first grid point: that point (an upper bound).
    assert threshold_crossing([1e-6, 1e-5], [0.6, 0.9]) == pytest.approx(1e-6)
    assert threshold_crossing([1e-6, 1e-5], [0.1, 0.49]) is None
    # The first crossing wins on a non-monotone curve: between (1, 0.2) and (10, 0.6),
    # t = 0.3 / 0.4 = 0.75 -> 10**0.75.
    assert threshold_crossing([1, 10, 100, 1000], [0.2, 0.6, 0.1, 0.9]) == pytest.approx(10**0.75)
    # Zero counts and NaN changes are skipped: the crossing falls between 10 and 100,
    # t = (0.5 - 0.0) / 1.0 = 0.5 -> 10**1.5.
    assert threshold_crossing([0, 10, 50, 100], [0.0, 0.0, math.nan, 1.0]) == pytest.approx(10**1.5)


# --------------------------------------------------------------------------- intervals


def bounded_records(n=40):
    """Baseline 1.0 (nothing to lose but everything), two seeds at 0.9 and 0.0 at one rate."""
    samples = {"samples": {"task_a": n}}
    return [
        {**record("base", baseline=True, acc=1.0), **samples},
        {**record("a1", p=1e-5, seed=0, acc=0.9), **samples},
        {**record("a2", p=1e-5, seed=1, acc=0.0), **samples},
    ]


def test_intervals_respect_the_bounds_of_accuracy_and_relative_change():
    # The old t-interval over these two seeds was 0.45 +- 12.7 * 0.45: [-5.3, 6.2].
    _base, (s,) = build_series(bounded_records())
    (g,) = s.grid
    assert 0.0 <= g.score.ci_low <= g.score.mean <= g.score.ci_high <= 1.0
    # Baseline 1.0: relative change lies in [1 - 1/1, 1] = [0, 1].
    assert 0.0 <= g.relchange.ci_low <= g.relchange.ci_high <= 1.0
    summary = summarize_series(s)
    assert 0.0 <= summary.awrcl_p.ci_low <= summary.awrcl_p.mean <= summary.awrcl_p.ci_high <= 1.0


def test_relative_change_interval_allows_a_gain_down_to_one_minus_one_over_baseline():
    records = [
        {**record("base", baseline=True, acc=0.5), "samples": {"task_a": 20}},
        {**record("a1", p=1e-5, seed=0, acc=1.0), "samples": {"task_a": 20}},
        {**record("a2", p=1e-5, seed=1, acc=0.95), "samples": {"task_a": 20}},
    ]
    _, (s,) = build_series(records)
    change = s.grid[0].relchange
    assert change.mean == pytest.approx(1 - 0.975 / 0.5)
    assert 1 - 1 / 0.5 <= change.ci_low < change.mean < change.ci_high <= 1.0


def test_intervals_are_reproducible():
    first = summarize_series(build_series(bounded_records())[1][0])
    again = summarize_series(build_series(bounded_records())[1][0])
    assert first == again


def test_one_seed_gets_a_document_only_interval_or_none_without_a_count():
    # n known: Binomial(40, 0.9)/40 still varies; n unknown (no stderr, no samples): no interval.
    _, (s,) = build_series(bounded_records()[:2])
    assert s.grid[0].score.n == 1 and s.grid[0].score.ci_low < 0.9 < s.grid[0].score.ci_high
    bare = [dict(r, metrics={"task_a": {"acc": r["metrics"]["task_a"]["acc"]}}) for r in bounded_records()[:2]]
    for r in bare:
        r.pop("samples")
    _, (s,) = build_series(bare)
    assert math.isnan(s.grid[0].score.ci_low)


def test_task_sizes_from_samples_or_from_stderr():
    # lm-eval's stderr of a 0/1 mean is sqrt(v (1 - v) / (n - 1)): 0.9875 over 160 documents.
    inferred = {"metrics": {"t": {"acc": 0.9875, "acc_stderr": 0.008810995846029103}}}
    assert task_sizes([inferred], ["t"]) == {"t": 160}
    assert task_sizes([inferred, {"samples": {"t": 80}}], ["t"]) == {"t": 80}
    assert task_sizes([{"metrics": {"t": {"acc": 1.0, "acc_stderr": 0.0}}}], ["t"]) == {"t": 0}


def simulated_sweep(rng, *, seeds=3, seed_sd=0.03, n=160, base=0.9, means=(0.6, 0.3)):
    """One sweep with known truth: per-seed true accuracies scatter around `means` by
    `seed_sd` (the fault maps differ), then each is observed over `n` documents."""

    def rec(point_id, acc, **fields):
        return {
            "point_id": point_id,
            "fault": "bitflip",
            "site": "weights",
            "target": "mlp",
            "layers": "all",
            "metrics": {"t": {"acc": rng.binomial(n, acc) / n}},
            "samples": {"t": n},
            **fields,
        }

    records = [rec("base", base, baseline=True, p=0, seed=0)]
    for g, mean in enumerate(means):
        for seed in range(seeds):
            true = float(np.clip(mean + seed_sd * rng.standard_normal(), 0, 1))
            records.append(rec(f"{g}-{seed}", true, p=10.0 ** (g - 6), seed=seed))
    return records


def test_nominal_95_percent_intervals_cover_the_truth_in_simulated_sweeps():
    base, means = 0.9, (0.6, 0.3)
    rng = np.random.default_rng(7)
    truths = {"score": means[0], "relchange": (base - means[0]) / base, "awrcl": float(np.mean([(base - m) / base for m in means]))}
    hits = dict.fromkeys(truths, 0)
    sims = 200
    for _ in range(sims):
        _, (s,) = build_series(simulated_sweep(rng, base=base, means=means))
        found = {"score": s.grid[0].score, "relchange": s.grid[0].relchange, "awrcl": summarize_series(s).awrcl_p}
        for name, stats in found.items():
            hits[name] += stats.ci_low <= truths[name] <= stats.ci_high
    for name, hit in hits.items():
        assert hit / sims >= 0.90, (name, hit / sims)


# --------------------------------------------------------------------------- series, rankings


def two_seed_records():
    """Baseline 0.8; attention at p = 1e-6, 1e-5 with two seeds each; counts 10/30, 100/300."""
    return [
        record("base", baseline=True, acc=0.8),
        record("a1", p=1e-6, seed=0, acc=0.8, elements=10),
        record("a2", p=1e-6, seed=1, acc=0.6, elements=30),
        record("a3", p=1e-5, seed=0, acc=0.4, elements=100),
        record("a4", p=1e-5, seed=1, acc=0.0, elements=300),
    ]


def test_build_series_aggregates_seeds():
    base, series = build_series(two_seed_records())
    assert base == pytest.approx(0.8)
    (s,) = series
    # relchange: p=1e-6 -> 0 and 0.25 (mean 0.125); p=1e-5 -> 0.5 and 1.0 (mean 0.75).
    np.testing.assert_allclose(s.p, [1e-6, 1e-5])
    np.testing.assert_allclose(s.mean_relchange, [0.125, 0.75])
    np.testing.assert_allclose(s.mean_injected, [20, 200])
    assert s.seeds == [0, 1]


def test_summarize_series_matches_hand_values():
    _, (s,) = build_series(two_seed_records())
    summary = summarize_series(s, weighting="uniform")
    # Per-seed uniform AWRCL: seed 0 (0 + 0.5) / 2 = 0.25, seed 1 (0.25 + 1.0) / 2 = 0.625;
    # mean 0.4375 = uniform AWRCL of the mean curve (0.125 + 0.75) / 2.
    assert summary.awrcl_p.mean == pytest.approx(0.4375)
    assert summary.awrcl_p.n == 2
    # The bootstrap interval holds the estimate and stays inside [1 - 1/0.8, 1] = [-0.25, 1].
    assert -0.25 <= summary.awrcl_p.ci_low < 0.4375 < summary.awrcl_p.ci_high <= 1.0
    # Mean curve crosses 0.5 between 0.125 and 0.75: t = 0.375 / 0.625 = 0.6.
    assert summary.threshold_p == pytest.approx(10 ** (-6 + 0.6))
    # Against mean counts 20 and 200: log10 = 1.30103 + 0.6 * 1.
    assert summary.threshold_count == pytest.approx(10 ** (math.log10(20) + 0.6))


def test_rankings_order_components_and_layer_groups():
    records = [record("base", baseline=True, acc=1.0)]
    for target, acc in [("attention", 0.4), ("mlp", 0.2), ("norm", 0.9)]:
        records.append(record(f"{target}-1", target=target, p=1e-6, acc=acc))
        records.append(record(f"{target}-2", target=target, p=1e-5, acc=acc))
    for layers, acc in [("0-3", 0.7), ("4-7", 0.3)]:
        records.append(record(f"L{layers}", target="all", layers=layers, p=1e-5, acc=acc))
    _, series = build_series(records)
    summaries = [summarize_series(s) for s in series]

    by_awrcl = {r.title: r for r in rankings(summaries, "awrcl_p")}
    components = by_awrcl["bitflip/weights, layers=all"]
    assert components.kind == "component"
    # relative changes: mlp 0.8, attention 0.6, norm 0.1.
    assert [row.label for row in components.rows] == ["mlp", "attention", "norm"]
    assert [row.value for row in components.rows] == pytest.approx([0.8, 0.6, 0.1])
    layer = by_awrcl["bitflip/weights, target=all"]
    assert [row.label for row in layer.rows] == ["4-7", "0-3"]

    by_threshold = {r.title: r for r in rankings(summaries, "threshold_p")}
    rows = by_threshold["bitflip/weights, layers=all"].rows
    # mlp and attention cross at their first grid point (1e-6); norm never does -> last.
    assert [row.label for row in rows] == ["attention", "mlp", "norm"]
    assert rows[-1].value is None and rows[-1].rank == 3


def test_rank_rejects_unknown_criterion():
    _, series = build_series(two_seed_records())
    with pytest.raises(ValueError, match="unknown ranking"):
        rank([summarize_series(series[0])], "speed", "target")


def test_layer_sort_key_is_numeric():
    labels = ["12-15", "all", "4-7", "0-3"]
    assert sorted(labels, key=layer_sort_key) == ["0-3", "4-7", "12-15", "all"]
