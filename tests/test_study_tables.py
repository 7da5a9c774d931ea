"""Tables that say what their figures are: drift's agreement beside ties and its two non-finite
columns, bisect's residue, and analyze's refusals and notes where its figures are not the spec's."""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import pytest
from lm_eval_faults.cli.analyze import add_arguments, main
from lm_eval_faults.core.fault_map import FaultMap, ParamInfo
from lm_eval_faults.core.spec import FaultSpecError
from lm_eval_faults.study.bisect import bisect
from lm_eval_faults.study.drift import DriftReport
from lm_eval_faults.study.drift_table import format_drift_table
from lm_eval_faults.study.sample_drift import compare_samples

NAN = math.nan


def mc(doc_id: int, lls: list[float]) -> dict[str, Any]:
    """A multiple_choice sample as lm-eval writes it (stringified pairs)."""
    pairs = [[str(ll), "False"] for ll in lls]
    return {"doc_id": doc_id, "filtered_resps": pairs, "filter": "none", "metrics": [], "doc_hash": f"h{doc_id}"}


# (clean log-likelihoods, faulted log-likelihoods, flipped, agrees, kept only by the tie-break)
DRIFT_CASES = {
    "same-unique-top": ([-1.0, -2.0, -3.0], [-1.5, -2.5, -2.9], False, True, False),
    "same-tie-both-sides": ([-1.0, -1.0, -2.0], [-3.0, -3.0, -5.0], False, True, False),
    "tie-only-faulted": ([-1.0, -2.0, -3.0], [-2.0, -2.0, -2.0], False, False, True),
    "tie-only-clean": ([-1.0, -1.0, -3.0], [-1.0, -2.0, -3.0], False, False, True),
    "different-ties-same-first": ([-1.0, -1.0, -3.0], [-1.0, -3.0, -1.0], False, False, True),
    "flip": ([-1.0, -2.0, -3.0], [-3.0, -2.0, -1.0], True, False, False),
    "nonfinite-unchanged": ([-1.0, -2.0, -3.0], [-1.0, -2.0, -math.inf], False, False, False),
}


@pytest.mark.parametrize("clean, faulty, flipped, agrees, kept", DRIFT_CASES.values(), ids=DRIFT_CASES.keys())
def test_agreement_counts_a_tie_the_same_way_on_both_sides(clean, faulty, flipped, agrees, kept) -> None:
    task = compare_samples([mc(0, clean)], [mc(0, faulty)], "multiple_choice")
    (sample,) = task.samples
    assert (sample.flipped, sample.agrees) == (flipped, agrees)
    assert (task.flips, task.agreement, task.tie_kept) == (int(flipped), float(agrees), int(kept))


def test_unchanged_tied_answers_are_not_shown_as_zero_agreement() -> None:
    """The issue's case: 41 answers unchanged, every choice tied the same way in both runs."""
    tied = [-2.0, -2.0, -2.0, -2.0]
    task = compare_samples([mc(i, tied) for i in range(41)], [mc(i, tied) for i in range(41)], "multiple_choice")
    assert (task.flips, task.ties, task.agreement, task.tie_kept) == (0, 41, 1.0, 0)


def test_the_two_nonfinite_columns_say_what_they_count() -> None:
    task = compare_samples([mc(0, [-1.0, -2.0])], [mc(0, [NAN, -2.0])], "multiple_choice", task="t")
    task.nonfinite_requests, task.degenerate_requests = 1, 0
    header = format_drift_table(DriftReport("c", "f", tasks=[task]))[0]
    assert "nonfin samples" in header and "nonfin requests" in header and "degen requests" in header
    assert " nonfinite " not in header and "nonfin req " not in header and "tie-kept" in header


# -- bisect: the residue -----------------------------------------------------------------------


def additive_map(costs: list[float]) -> tuple[FaultMap, Any]:
    """A map of len(costs) faults and a score that each fault lowers by its own cost from 1."""
    n = len(costs)
    words = np.arange(n, dtype=np.int64)
    fault_map = FaultMap((ParamInfo("w", "float32", n),), np.zeros(n, dtype=np.int64), words, words, words ^ 1)

    def score(subset: FaultMap | None) -> float:
        return 1.0 if subset is None else 1.0 - sum(costs[int(i)] for i in subset.index)

    return fault_map, score


# (costs per fault, tolerance, expected culprits, residue cost, share explained, warns)
BISECT_CASES = {
    "residue-costs-a-third": ([0.6] + [0.04] * 9, 0.05, [0], 0.36, 0.6 / 0.96, True),
    "residue-within-tolerance": ([0.6] + [0.004] * 9, 0.05, [0], 0.036, 0.6 / 0.636, False),
    "culprit-explains-all": ([0.0] * 5 + [0.7], 0.05, [5], 0.0, 1.0, False),
}


@pytest.mark.parametrize("costs, tolerance, culprits, residue, explained, warns", BISECT_CASES.values(), ids=BISECT_CASES.keys())
def test_bisect_reports_the_residue_and_the_share_explained(costs, tolerance, culprits, residue, explained, warns) -> None:
    fault_map, score = additive_map(costs)
    outcome = bisect(fault_map, score, 0.5, {}, tolerance=tolerance)
    assert outcome.indices == culprits
    assert outcome.residue_cost == pytest.approx(residue) and outcome.explained == pytest.approx(explained)
    table = outcome.format_table()
    assert "residue (the map minus the culprits) scores" in table and "the culprits explain" in table
    assert ("WARNING" in table) is warns and (outcome.residue_warning is not None) is warns
    assert outcome.to_dict()["explained"] == pytest.approx(explained)


def test_bisect_accepts_a_fraction_of_one_as_its_command_does() -> None:
    fault_map, score = additive_map([0.1, 0.0])
    assert bisect(fault_map, score, 1.0, {}).indices == [0]


# -- analyze: figures under their own title ----------------------------------------------------


def analyze_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


REFUSED = {
    "activations-only": ("p=1e-5,site=activations", "site='activations'"),
    "replay": ("replay=/nonexistent/map.npz", "replay="),
}


@pytest.mark.parametrize("model_args, named", REFUSED.values(), ids=REFUSED.keys())
def test_analyze_refuses_what_it_would_misreport(model_args, named, monkeypatch) -> None:
    def no_load(*_: Any, **__: Any) -> None:
        raise AssertionError("the model must not load")

    monkeypatch.setattr("lm_eval_faults.cli.analyze.load_model", no_load)
    with pytest.raises(FaultSpecError, match=named):
        main(analyze_args("--model_args", model_args))


NOTED = {
    "weights+activations": (["--model_args", "p=1e-5,site=weights+activations,target=norm"], "only the weight faults are analysed"),
    "clamp-activations": (
        ["--model_args", "p=1e-5,target=norm", "--protections", "none;clamp=activations"],
        "'clamp=activations': activation clamping is not modelled by the weight analysis",
    ),
    "clamp-in-model-args": (["--model_args", "p=1e-5,target=norm,clamp=activations"], "activation clamping is not modelled"),
}


@pytest.mark.parametrize("argv, note", NOTED.values(), ids=NOTED.keys())
def test_analyze_notes_what_its_figures_leave_out(argv, note, capsys) -> None:
    assert main(analyze_args(*argv)) == 0
    assert note in capsys.readouterr().out
