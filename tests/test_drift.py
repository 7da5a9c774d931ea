"""Drift against the clean run, on crafted lm-eval output directories whose answers are worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from lm_eval_faults.cli import main
from lm_eval_faults.study.drift import drift, find_sample_files
from lm_eval_faults.study.sample_drift import compare_samples, first_divergent_token, kl_divergence, tokens

STAMP = "2026-01-02T03-04-05.000001"
OLD_STAMP = "2025-12-31T23-59-59.999999"
LN4, LN15 = math.log(4), math.log(1.5)
P = [0.4, 0.3, 0.2, 0.1]
STEPS = [-1.0, -2.0, -3.0, -4.0]


def mc_sample(doc_id: int, lls: list[Any], acc: float, target: int = 0) -> dict[str, Any]:
    """A multiple_choice sample as lm-eval writes it: every response stringified."""
    pairs = [[str(ll), "False"] for ll in lls]
    return {
        "doc_id": doc_id,
        "doc": {"question": f"q{doc_id}"},
        "target": str(target),
        "resps": [[pair] for pair in pairs],
        "filtered_resps": pairs,
        "filter": "none",
        "metrics": ["acc"],
        "doc_hash": f"h{doc_id}",
        "acc": acc,
    }


def gen_sample(doc_id: int, text: str, exact: float) -> dict[str, Any]:
    """A generate_until sample."""
    return {
        "doc_id": doc_id,
        "target": "t",
        "resps": [[text]],
        "filtered_resps": [text],
        "filter": "none",
        "metrics": ["exact_match"],
        "doc_hash": f"h{doc_id}",
        "exact_match": exact,
    }


def roll_sample(doc_id: int, ll: float, words: int | None) -> dict[str, Any]:
    """A loglikelihood_rolling sample; `words=None` leaves out the perplexity metrics."""
    sample: dict[str, Any] = {"doc_id": doc_id, "resps": [[str(ll)]], "filtered_resps": [str(ll)], "filter": "none", "metrics": []}
    if words is not None:
        sample["metrics"] = ["word_perplexity", "byte_perplexity"]
        sample["word_perplexity"] = [ll, words]
        sample["byte_perplexity"] = [ll, words * 5]
    return sample


CLEAN = {
    "mc_task": [
        mc_sample(0, [math.log(p) for p in P], 1.0),
        mc_sample(1, STEPS, 1.0),
        mc_sample(2, STEPS, 1.0),
        mc_sample(3, STEPS, 1.0),
        mc_sample(4, STEPS, 1.0),
    ],
    "gen_task": [gen_sample(0, "The answer is 42.", 1.0), gen_sample(1, "Paris", 1.0), gen_sample(2, "a b c", 0.0)],
    "roll_task": [roll_sample(0, -10.0, 5), roll_sample(1, -6.0, 3)],
}
FAULTY = {
    "mc_task": [
        mc_sample(0, [math.log(p) for p in reversed(P)], 0.0),  # flip 0 -> 3
        mc_sample(1, STEPS, 1.0),  # unchanged
        mc_sample(2, [-2.0, -2.0, -2.0, -2.0], 1.0),  # tied: lm-eval picks choice 0, right by luck
        mc_sample(3, [-1.0, math.nan, -3.0, -math.inf], 0.0),  # non-finite; np.argmax picks the NaN
    ],
    "gen_task": [gen_sample(0, "The answer is 41.", 0.0), gen_sample(1, "Paris", 1.0), gen_sample(2, "a b", 0.0)],
    "roll_task": [roll_sample(0, -20.0, 5), roll_sample(1, -6.0, 3)],
}
OUTPUT_TYPES = {"mc_task": "multiple_choice", "gen_task": "generate_until", "roll_task": "loglikelihood_rolling"}


def write_run(root: Path, samples: dict[str, list[dict[str, Any]]], fault_counts: bool) -> Path:
    """An lm-eval output directory: a model-named subdirectory with results_<stamp>.json and samples files."""
    run = root / "model__name"
    run.mkdir(parents=True)
    results: dict[str, Any] = {
        "results": {task: {} for task in samples},
        "configs": {task: {"task": task, "output_type": OUTPUT_TYPES[task]} for task in samples},
        "config": {"model": "faulty_hf"},
    }
    if fault_counts:
        results["config"]["fault_injection"] = {
            "requests": {"mc_task": 16},
            "degenerate_requests": {"mc_task": 4, "gen_task": 0},
            "nonfinite_requests": {"mc_task": 1, "gen_task": 0},
        }
    (run / f"results_{STAMP}.json").write_text(json.dumps(results))
    for task, rows in samples.items():
        # json.dumps writes NaN and -Infinity as lm-eval does
        (run / f"samples_{task}_{STAMP}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    clean = write_run(tmp_path / "clean", CLEAN, fault_counts=False)
    faulty = write_run(tmp_path / "faulty", FAULTY, fault_counts=True)
    # an older faulted run of mc_task that must be ignored (it would show no drift at all)
    (faulty / "model__name" / f"samples_mc_task_{OLD_STAMP}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CLEAN["mc_task"]))
    return clean, faulty


def by_task(clean: Path, faulty: Path) -> dict[str, Any]:
    return {task.task: task for task in drift(clean, faulty).tasks}


def test_multiple_choice_flip_delta_kl_tie_and_nan(runs: tuple[Path, Path]) -> None:
    mc = by_task(*runs)["mc_task"]
    kl0 = 0.4 * LN4 + 0.3 * LN15 + 0.2 * math.log(2 / 3) + 0.1 * math.log(1 / 4)  # = 0.3 ln 4 + 0.1 ln 1.5
    softmax = [math.exp(v) / sum(math.exp(u) for u in STEPS) for v in STEPS]
    kl2 = sum(p * math.log(p / 0.25) for p in softmax)  # against the uniform distribution of the tie
    samples = {sample.doc_id: sample for sample in mc.samples}

    assert (mc.matched, mc.only_clean, mc.only_faulty) == (4, 1, 0)
    assert samples[0].flipped and (samples[0].clean_choice, samples[0].faulty_choice) == (0, 3)
    assert samples[0].abs_delta_ll == pytest.approx((LN4 + LN15) / 2)
    assert samples[0].kl == pytest.approx(kl0) and kl0 == pytest.approx(0.3 * LN4 + 0.1 * LN15)
    assert samples[1].flipped is False and samples[1].kl == 0 and samples[1].abs_delta_ll == 0
    assert samples[2].tied and not samples[2].flipped and samples[2].abs_delta_ll == pytest.approx(1.0)
    assert samples[3].finite is False and samples[3].flipped and samples[3].faulty_choice == 1
    assert samples[3].kl is None and samples[3].abs_delta_ll is None

    assert (mc.flips, mc.ties, mc.nonfinite) == (2, 1, 1)
    assert mc.agreement == pytest.approx(1 / 4)  # only doc 1: the tie is not agreement
    assert mc.mean_abs_delta_ll == pytest.approx(((LN4 + LN15) / 2 + 0 + 1) / 3)
    assert mc.mean_kl == pytest.approx((kl0 + 0 + kl2) / 3)
    assert mc.metric_deltas == {"acc": pytest.approx(-0.5)}
    assert (mc.requests, mc.degenerate_requests, mc.nonfinite_requests) == (16, 4, 1)


def test_generative_agreement_first_divergent_token_and_metric(runs: tuple[Path, Path]) -> None:
    gen = by_task(*runs)["gen_task"]
    positions = [sample.first_divergent_token for sample in gen.samples]

    assert positions == [3, None, 2]  # "42" vs "41"; identical; "a b" is a prefix of "a b c"
    assert gen.exact_agreement == pytest.approx(1 / 3)
    assert (gen.diverged, gen.mean_first_divergence) == (2, pytest.approx(2.5))
    assert gen.metric_deltas == {"exact_match": pytest.approx(-1 / 3)}
    assert gen.flips is None and gen.degenerate_requests == 0


def test_rolling_perplexity_ratio(runs: tuple[Path, Path]) -> None:
    roll = by_task(*runs)["roll_task"]

    assert [sample.perplexity_ratio for sample in roll.samples] == [pytest.approx(math.exp(2)), pytest.approx(1.0)]
    assert roll.perplexity_ratio == pytest.approx(math.exp((-16 + 26) / 8))  # Σ words = 8
    assert roll.perplexity_unit == "word"
    assert roll.degenerate_requests is None  # absent from the results JSON


def test_rolling_without_word_counts_is_a_per_document_ratio() -> None:
    clean = [roll_sample(0, -10.0, None), roll_sample(1, -6.0, None)]
    faulty = [roll_sample(0, -20.0, None), roll_sample(1, -6.0, None)]

    result = compare_samples(clean, faulty, "loglikelihood_rolling")

    assert result.perplexity_ratio == pytest.approx(math.exp((-16 + 26) / 2))
    assert result.perplexity_unit == "document" and result.samples[0].perplexity_ratio is None
    assert any("per document" in note for note in result.notes)


def test_in_memory_samples_match_repeats_in_order_and_infer_type() -> None:
    """lm-eval's evaluate() returns unstringified tuples; a repeated doc_id is matched by order."""
    clean = [
        {"doc_id": 7, "filter": "none", "filtered_resps": [(-1.0, True), (-2.0, False)]},
        {"doc_id": 7, "filter": "none", "filtered_resps": [(-1.0, True), (-2.0, False)]},
    ]
    faulty = [
        {"doc_id": 7, "filter": "none", "filtered_resps": [(-1.0, True), (-2.0, False)]},
        {"doc_id": 7, "filter": "none", "filtered_resps": [(-3.0, False), (-2.0, True)]},
        {"doc_id": 8, "filter": "none", "filtered_resps": [(-1.0, True), (-2.0, False)]},
    ]

    result = compare_samples(clean, faulty, None)

    assert result.output_type == "multiple_choice"
    assert [(sample.index, sample.flipped) for sample in result.samples] == [(0, False), (1, True)]
    assert (result.flips, result.greedy_changes, result.only_faulty) == (1, 1, 1)


def test_tokens_and_kl_helpers() -> None:
    assert tokens("Hello, world!") == ["Hello", ",", "world", "!"]
    assert first_divergent_token("Hello, world", "Hello world") == 1
    assert first_divergent_token("same  text", "same text") is None  # whitespace is not a token
    assert kl_divergence([0.0, 0.0], [5.0, 5.0]) == pytest.approx(0.0, abs=1e-12)  # a shift of every log-likelihood changes nothing
    assert kl_divergence([math.log(0.5)] * 2, [math.log(0.9), math.log(0.1)]) == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    )


def test_newest_samples_file_is_used_and_said(runs: tuple[Path, Path]) -> None:
    files = find_sample_files(runs[1])
    report = drift(*runs)

    assert files.samples["mc_task"].name == f"samples_mc_task_{STAMP}.jsonl"
    assert any("2 sample files" in note and "newest" in note for note in report.notes)


def test_cli_end_to_end(runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "drift.json"

    code = main(["drift", str(runs[0]), str(runs[1]), "--json", str(out)])
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.split() and line.split()[0].endswith("_task")}
    written = {task["task"]: task for task in json.loads(out.read_text())["tasks"]}

    assert code == 0
    assert rows["mc_task"][1:5] == ["mc", "4", "1", "2/4"]  # type, matched, unmatched, flips
    assert rows["gen_task"][1:5] == ["gen", "3", "0", "2/3"]
    assert rows["roll_task"][1] == "rolling"
    assert "acc -0.5" in printed and "1 sample(s) with a non-finite log-likelihood" in printed
    assert written["mc_task"]["flips"] == 2 and len(written["mc_task"]["samples"]) == 4
    assert written["roll_task"]["perplexity_ratio"] == pytest.approx(math.exp(10 / 8))


def test_cli_reports_a_directory_without_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()

    code = main(["drift", str(tmp_path / "empty"), str(tmp_path / "empty")])

    assert code == 2
    assert "--log_samples" in capsys.readouterr().err


def test_cli_html_shows_generative_texts_side_by_side(runs: tuple[Path, Path], tmp_path: Path) -> None:
    page = tmp_path / "pages" / "drift.html"

    assert main(["drift", str(runs[0]), str(runs[1]), "--html", str(page)]) == 0
    html = page.read_text()

    assert html.count('class="text clean"') == 3, "one row per generative sample, none for the other tasks"
    assert 'The answer is<span class="lost first"> 42</span>' in html
    assert 'The answer is<span class="new first"> 41</span>' in html
    assert html.count('data-failure="identical"') == 1 and html.count('data-failure="diverged"') == 2
    assert "exact_match -1" in html


def test_text_pieces_join_back_to_the_text() -> None:
    from lm_eval_faults.study.drift_pages import text_pieces

    for text in ["The answer is 42.", "  lead and trail  ", "", "a\n\nb"]:
        assert "".join(text_pieces(text)) == text
    assert text_pieces("a b.") == ["a", " b", "."]
