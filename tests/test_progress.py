"""One honest progress line, quiet lm-eval, sensible defaults, true docs."""

from __future__ import annotations

import importlib
import io

import pytest
from lm_eval_faults.study.progress import ProgressLine, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# (total, done before, approximate, regrow, seconds per item (the first item slow: warm-up), items, expected last line)
LINE_CASES = [
    (10, 0, False, 1, [30.0], "lm-eval-faults sweep: 1/10 points, 30s elapsed, time left known after the next one (p1)"),
    # the time left is measured after the slow first item: 2 s a point, 8 points left
    (10, 0, False, 1, [30.0, 2.0], "lm-eval-faults sweep: 2/10 points, 32s elapsed, about 16s left (p2)"),
    # a resumed sweep: 5 points done before, they count in done but not in the rate
    (10, 5, False, 1, [30.0, 4.0, 4.0], "lm-eval-faults sweep: 8/10 points, 38s elapsed, about 8s left (p3)"),
    (2, 0, False, 1, [5.0, 1.0], "lm-eval-faults sweep: 2/2 points, 6s elapsed (p2)"),
    # an estimate the work reaches grows by `regrow`, and says "of about"
    (3, 0, True, 5, [1.0, 1.0, 1.0], "lm-eval-faults sweep: 3 of about 8 points, 3s elapsed, about 5s left (p3)"),
]


@pytest.mark.parametrize(("total", "before", "approximate", "regrow", "steps", "expected"), LINE_CASES)
def test_progress_line_text(total: int, before: int, approximate: bool, regrow: int, steps: list[float], expected: str) -> None:
    clock, stream = FakeClock(), io.StringIO()
    with ProgressLine(
        "lm-eval-faults sweep", total, done=before, approximate=approximate, regrow=regrow, stream=stream, clock=clock
    ) as line:
        for number, seconds in enumerate(steps, 1):
            clock.now += seconds
            line.advance(f"p{number}")
    lines = stream.getvalue().splitlines()
    assert lines[-1] == expected  # the last state is written, whenever the line before it was
    assert len(lines) <= len(steps) + 1, "not a TTY: a line at the start and at most one per item"
    assert "\r" not in stream.getvalue()


def test_a_log_gets_a_line_every_ten_seconds_and_the_last_not_one_per_item() -> None:
    clock, stream = FakeClock(), io.StringIO()
    with ProgressLine("lm-eval-faults analyze", 700, unit="stored fields", stream=stream, clock=clock) as line:
        for number in range(700):
            clock.now += 0.125  # 87.5 s in all
            line.advance(f"f{number}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 + 8 + 1  # the start, one per 10 s, the end
    assert lines[-1].startswith("lm-eval-faults analyze: 700/700 stored fields, 1m28s elapsed")
    slow, stream = FakeClock(), io.StringIO()
    with ProgressLine("lm-eval-faults sweep", 3, stream=stream, clock=slow) as line:
        for _ in range(3):
            slow.now += 12.0  # points slower than the interval: every one logged
            line.advance()
    assert len(stream.getvalue().splitlines()) == 4


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (59, "59s"), (65, "1m05s"), (7620, "2h07m")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_silenced_lm_eval_disables_new_bars_only_and_restores() -> None:
    from lm_eval import evaluator
    from lm_eval_faults.harness.lm_eval_silencing import silenced_lm_eval
    from tqdm import tqdm

    before = (evaluator.get_git_commit_hash, evaluator.add_env_info, vars(tqdm)["__init__"])
    outer = tqdm(total=3, file=io.StringIO())
    with silenced_lm_eval():
        inner = tqdm(range(3), file=io.StringIO())
        assert inner.disable and not outer.disable
        assert evaluator.get_git_commit_hash() is None
    inner.close()
    outer.close()
    assert (evaluator.get_git_commit_hash, evaluator.add_env_info, vars(tqdm)["__init__"]) == before
    assert not tqdm(total=1, file=io.StringIO()).disable


def test_git_hash_outside_a_checkout_is_quiet(tmp_path, monkeypatch, capfd) -> None:
    from lm_eval_faults.harness.lm_eval_silencing import quiet_git_commit_hash

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert quiet_git_commit_hash() is None
    assert "fatal" not in capfd.readouterr().err


@pytest.mark.parametrize("command", ["targets", "analyze", "sweep", "report", "bisect", "drift", "tasks-path"])
def test_help_lists_every_subcommand(command: str) -> None:
    from lm_eval_faults.cli import __doc__ as doc
    from lm_eval_faults.cli import build_parser

    assert command in build_parser().format_help()
    assert command in doc.splitlines()[0]


@pytest.mark.parametrize(
    "argv", [["analyze", "--p", "1e-5"], ["sweep", "--fault_arg", "seed=1", "--tasks", "faults_demo", "--run_dir", "runs/x", "--p", "1e-3"]]
)
def test_options_are_never_abbreviated(argv: list[str], capsys) -> None:
    """`analyze --p 1e-5` once meant --protections 1e-5: a prefix is an error, not a guess."""
    from lm_eval_faults.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and f"unrecognized arguments: {argv[1]}" in capsys.readouterr().err


def test_sweep_default_batch_size_is_32() -> None:
    from lm_eval_faults.study.grid import SweepConfig

    assert SweepConfig(model_args="", tasks="faults_demo", p="1e-3").batch_size == "32"


@pytest.mark.parametrize(("faults", "first", "more"), [(1, 5, 3), (2, 5, 3), (51, 15, 13), (1000, 23, 21)])
def test_bisect_trial_estimate(faults: int, first: int, more: int) -> None:
    from lm_eval_faults.study.bisect import expected_evaluations

    assert expected_evaluations(faults) == (first, more)


def test_shared_directory_from_the_environment(tmp_path, monkeypatch) -> None:
    import conftest

    monkeypatch.setenv("LM_EVAL_FAULTS_SHARED", str(tmp_path))
    try:
        assert tmp_path / "models" / "smollm2-135m-instruct" == importlib.reload(conftest).SMOLLM_DIR
    finally:
        monkeypatch.delenv("LM_EVAL_FAULTS_SHARED")
        importlib.reload(conftest)


README_FACTS = [
    ("study/metrics.py", True),
    ("lm_eval_faults/metrics.py", False),
    ("`faults_facts`", True),
    ("lm-eval ls tasks", True),
    ("--tasks list", False),
    ("LM_EVAL_FAULTS_SHARED", True),
    ("about a minute", False),
]


@pytest.mark.parametrize(("text", "present"), README_FACTS)
def test_readme_small_truths(text: str, present: bool) -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert (text in readme) == present
