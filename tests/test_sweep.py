"""The sweep engine: grid syntax, resumable run directories, and restore-equals-reload.

The model tests share one tiny llama, one loaded `FaultyHFLM` and one `TaskManager` (building
a TaskManager indexes all of lm-eval's tasks, which alone takes seconds). The task is a
rolling log-likelihood over four short documents: its perplexity moves with any weight change,
so "same metrics" is a real comparison, unlike accuracy on four questions.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval_faults.cli.sweep import add_arguments, main
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.harness.model import FaultyHFLM
from lm_eval_faults.study import evaluation
from lm_eval_faults.study.baseline import DRIFT_FIELDS
from lm_eval_faults.study.grid import (
    MAX_POINTS,
    MAX_RATES,
    MAX_SEEDS,
    SweepConfig,
    SweepConfigError,
    parse_layer_groups,
    parse_p_grid,
    parse_seeds,
    parse_target_series,
    plan_points,
    resolve_layer_groups,
)
from lm_eval_faults.study.records import load_records
from lm_eval_faults.study.run_dir import BASELINE_SAMPLES_FILE, RunDir, append_line
from lm_eval_faults.study.runner import run_sweep

TASK = "tiny_colors_ppl"
MC_TASK = "tiny_colors_choice"
GEN_TASK = "tiny_colors_words"


# --------------------------------------------------------------------------- grid syntax


def test_p_decades_one_point_per_decade():
    assert parse_p_grid("1e-9:1e-1") == (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def test_p_range_with_count_is_log_spaced_and_keeps_both_ends():
    grid = parse_p_grid("1e-9:1e-1:17")
    assert len(grid) == 17
    assert grid[0] == 1e-9 and grid[8] == 1e-5 and grid[-1] == 1e-1
    assert grid[1] == pytest.approx(10**-8.5, rel=1e-5)


def test_p_lists_merge_sort_and_deduplicate():
    assert parse_p_grid("1e-4,1e-5+1e-4") == (1e-5, 1e-4)
    assert parse_p_grid("1e-3:1e-1,5e-2") == (1e-3, 1e-2, 5e-2, 1e-1)
    assert parse_p_grid("1e+0") == (1.0,)
    assert parse_p_grid([1e-5, 1e-4]) == (1e-5, 1e-4)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0", "baseline"),
        ("2", r"\(0, 1\]"),
        ("1e-1:1e-3", "backwards"),
        ("1e-5:3e-5", "whole number of decades"),
        ("1e-5:1e-4:1", "at least 2"),
        ("abc", "not a number"),
        ("", "no fault rate"),
    ],
)
def test_p_errors_say_what_to_write(text, message):
    with pytest.raises(SweepConfigError, match=message):
        parse_p_grid(text)


def test_seeds_count_or_list():
    assert parse_seeds(3) == (0, 1, 2)
    assert parse_seeds("3") == (0, 1, 2)
    assert parse_seeds("0,1,2") == (0, 1, 2)
    assert parse_seeds("5-7+2") == (2, 5, 6, 7)
    assert parse_seeds("7-7") == (7,)
    for bad in ("0", "3-1", "x"):
        with pytest.raises(SweepConfigError):
            parse_seeds(bad)


def test_layer_groups_resolve_against_the_model_depth():
    assert resolve_layer_groups(parse_layer_groups("groups:4"), 8) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert resolve_layer_groups(parse_layer_groups("groups:4"), 10)[-1] == (8, 9)
    assert resolve_layer_groups(parse_layer_groups("0-3,4-7+0"), 8) == ((0, 1, 2, 3), (0, 4, 5, 6, 7))
    assert resolve_layer_groups(parse_layer_groups("all,groups:2"), 4) == (None, (0, 1), (2, 3))
    assert parse_layer_groups("") == ("all",)
    with pytest.raises(SweepConfigError, match="groups:N"):
        parse_layer_groups("groups:0")
    with pytest.raises(SweepConfigError, match="backwards"):
        parse_layer_groups("3-1")
    with pytest.raises(SweepConfigError, match="no stack"):
        resolve_layer_groups(("groups:4",), None)


def test_targets_are_one_series_per_comma_item():
    assert parse_target_series("embedding,attention+ffn,lm_head") == ("embedding", "attention+mlp", "lm_head")
    with pytest.raises(SweepConfigError, match="components are"):
        parse_target_series("attn")


def test_plan_has_one_baseline_then_every_combination_with_distinct_ids():
    config = SweepConfig(model_args="pretrained=x", tasks="t", p="1e-3:1e-2", targets="attention,mlp", layers="groups:2", seeds=2)
    points = plan_points(config, n_layers=4)
    assert points[0].baseline and sum(point.baseline for point in points) == 1
    assert len(points) == 1 + 2 * 2 * 2 * 2
    assert len({point.point_id for point in points}) == len(points)
    assert points[1].point_id == "bitflip|weights|attention|0-1|p=0.001|seed=0"
    assert points[1].spec == FaultSpec(p=1e-3, target="attention", layers="0-1", seed=0)


def test_config_rejects_fault_keys_in_model_args_and_grid_keys_in_fault_args():
    with pytest.raises(SweepConfigError, match="--fault_args"):
        SweepConfig(model_args="pretrained=x,p=1e-5", tasks="t", p="1e-5")
    with pytest.raises(SweepConfigError, match="may not set target"):
        SweepConfig(model_args="pretrained=x", tasks="t", p="1e-5", fault_args="target=mlp")
    with pytest.raises(SweepConfigError, match="grid point fault=value"):
        plan_points(SweepConfig(model_args="pretrained=x", tasks="t", p="1e-5", faults="value", fault_args="bits=exponent"), 4)


def test_config_round_trips_through_json():
    config = SweepConfig(model_args="pretrained=x", tasks="a,b", p="1e-9:1e-1:17", seeds=3, limit=4)
    assert SweepConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --------------------------------------------------------------------------- results file


def test_append_starts_a_fresh_line_after_a_torn_one(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"point_id": "a"}\n{"point_id": "b", "metr')
    append_line(path, b'{"point_id": "c"}')
    assert path.read_bytes().splitlines()[-1] == b'{"point_id": "c"}'


def test_finished_cuts_an_incomplete_last_record_and_keeps_a_complete_one(tmp_path):
    run = RunDir(tmp_path)
    run.results.write_bytes(b'{"point_id": "a"}\n{"point_id": "b"}')
    assert run.finished() == {"a", "b"}
    assert run.results.read_bytes() == b'{"point_id": "a"}\n{"point_id": "b"}\n'
    run.results.write_bytes(b'{"point_id": "a"}\n{"point_id": "b", "met')
    with pytest.warns(UserWarning, match="incomplete last record"):
        assert run.finished() == {"a"}
    assert run.results.read_bytes() == b'{"point_id": "a"}\n'


def test_finished_cuts_an_incomplete_last_record_even_when_a_newline_follows(tmp_path):
    run = RunDir(tmp_path)
    run.results.write_bytes(b'{"point_id": "a"}\n{"point_id": "b", "met\n')
    with pytest.warns(UserWarning, match="incomplete last record"):
        assert run.finished() == {"a"}
    assert run.results.read_bytes() == b'{"point_id": "a"}\n'
    run.append({"point_id": "b"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run.finished() == {"a", "b"}
        assert [r["point_id"] for r in load_records(run.results)] == ["a", "b"]


def test_grid_dimensions_are_capped_before_they_are_built():
    with pytest.raises(SweepConfigError, match=rf"--seeds '0-100000000' gives 100000001 seeds; at most {MAX_SEEDS}"):
        parse_seeds("0-100000000")
    with pytest.raises(SweepConfigError, match=rf"--seeds .* at most {MAX_SEEDS}"):
        parse_seeds("5000")
    with pytest.raises(SweepConfigError, match=rf"--p range '1e-9:1e-1:10000000' asks for 10000000 rates; at most {MAX_RATES}"):
        parse_p_grid("1e-9:1e-1:10000000")
    with pytest.raises(SweepConfigError, match=rf"= 20000 points; at most {MAX_POINTS}"):
        SweepConfig(model_args="pretrained=x", tasks="t", p="1e-9:1e-1:1000", seeds=20)
    config = SweepConfig(model_args="pretrained=x", tasks="t", p="1e-9:1e-1:1000", seeds=5, layers="groups:1")
    with pytest.raises(SweepConfigError, match="--layers"):
        plan_points(config, n_layers=4)  # 1000 rates x 5 seeds x 4 groups


def test_a_planted_lock_symlink_is_refused_and_its_target_left_alone(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".sweep.lock").symlink_to(precious)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--tasks", "faults_demo", "--p", "1e-3", "--no_progress", "--run_dir", str(run_dir)])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "symbolic link" in err and len(err.splitlines()) == 1
    assert precious.read_text() == "keep me\n"
    assert not (run_dir / "sweep.json").exists()


def test_report_without_results_ends_with_one_line(tmp_path, capsys):
    from lm_eval_faults.cli import main as cli_main

    assert cli_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lm-eval-faults report:") and "results.jsonl" in err and len(err.splitlines()) == 1
    (tmp_path / "results.jsonl").write_text("")
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "no baseline record" in capsys.readouterr().err


def test_an_interrupted_command_ends_with_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C ends a sweep with a line saying the same command resumes it, not a traceback."""
    from lm_eval_faults.cli import main as cli_main
    from lm_eval_faults.cli import sweep as sweep_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_cli, "main", interrupted)
    assert cli_main(["sweep", "--model_args", "pretrained=x", "--tasks", "t", "--p", "1e-5", "--run_dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "lm-eval-faults sweep: interrupted; the same command resumes it"


def test_a_run_dir_with_a_different_config_is_refused_and_left_untouched(tmp_path):
    original = SweepConfig(model_args="pretrained=x", tasks="t", p="1e-5,1e-4", limit=4)
    RunDir(tmp_path).save_config(original, [point.point_id for point in plan_points(original, None)])
    (tmp_path / "results.jsonl").write_text('{"point_id": "baseline"}\n')
    changed = SweepConfig(model_args="pretrained=x", tasks="t", p="1e-5,1e-4", limit=8)
    with pytest.raises(SweepConfigError, match=r"different configuration(.|\n)*limit: run directory has 4.0, this command has 8.0"):
        run_sweep(tmp_path, changed, report=False, progress=False)
    assert json.loads((tmp_path / "sweep.json").read_text()) == original.to_dict()
    assert (tmp_path / "results.jsonl").read_text() == '{"point_id": "baseline"}\n'


def test_results_without_a_sweep_config_are_not_resumed(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"point_id": "baseline"}\n')
    with pytest.raises(SweepConfigError, match="not a sweep run directory"):
        run_sweep(tmp_path, SweepConfig(model_args="pretrained=x", tasks="t", p="1e-5"), report=False)


# --------------------------------------------------------------------------- with a model


@pytest.fixture(scope="module", autouse=True)
def fast_evaluation():
    """Two cheap changes that leave results alone: lm-eval's environment survey (`pip list` and
    `git` after every evaluation, ~1 s) is skipped, and torch runs one thread, because on a
    busy 2-core machine its spinning threads make the tiny model's matmuls ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir, tiny_task_dir):
    """The tiny llama, its loaded clean `FaultyHFLM`, and a TaskManager that sees a perplexity task."""
    model_dir = tiny_llama_dir
    tasks_dir = tmp_path_factory.mktemp("sweep_tasks")
    (tasks_dir / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tiny_task_dir / 'tiny_colors.jsonl'}\n"
        'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{question}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    (tasks_dir / f"{MC_TASK}.yaml").write_text(
        f"task: {MC_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tiny_task_dir / 'tiny_colors.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "question : {{question}} answer :"\n'
        "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    (tasks_dir / f"{GEN_TASK}.yaml").write_text(
        f"task: {GEN_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tiny_task_dir / 'tiny_colors.jsonl'}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "question : {{question}} answer :"\n'
        'doc_to_target: "{{choices[answer]}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    from lm_eval.tasks import TaskManager

    base = {"model_args": f"pretrained={model_dir}", "tasks": TASK, "device": "cpu", "include_path": str(tasks_dir), "limit": 4}
    lm = FaultyHFLM(pretrained=str(model_dir), device="cpu")
    return {"model_dir": model_dir, "base": base, "lm": lm, "task_manager": TaskManager(include_path=[str(tasks_dir)])}


def _sweep(setup, run_dir, config, **kwargs):
    return run_sweep(run_dir, config, lm=setup["lm"], task_manager=setup["task_manager"], progress=False, **kwargs)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["point_id"] for line in path.read_text().splitlines()]


class Killed(Exception):
    """Stands in for SIGKILL: the sweep stops between two points."""


def test_an_interrupted_sweep_resumes_with_every_point_exactly_once(setup, tmp_path):
    config = SweepConfig(**setup["base"], p="1e-4:1e-3", targets="attention,mlp")
    expected = [point.point_id for point in plan_points(config, 4)]

    def kill_after_three(record):
        if len(_ids(tmp_path / "results.jsonl")) == 3:
            raise Killed

    with pytest.raises(Killed):
        _sweep(setup, tmp_path, config, on_point=kill_after_three, report=False)
    assert _ids(tmp_path / "results.jsonl") == expected[:3]
    # Then a kill in the middle of writing the fourth record.
    with open(tmp_path / "results.jsonl", "a") as handle:
        handle.write('{"point_id": "' + expected[3] + '", "baseline": fal')

    with pytest.warns(UserWarning, match="incomplete last record"):
        resumed = _sweep(setup, tmp_path, config, report=False)
    assert resumed.skipped == expected[:3] and resumed.ran == expected[3:]
    assert sorted(_ids(tmp_path / "results.jsonl")) == sorted(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [record["point_id"] for record in load_records(tmp_path / "results.jsonl")] == expected

    again = _sweep(setup, tmp_path, config)
    assert again.ran == [] and again.skipped == expected
    assert again.report is not None and again.report.exists()


def test_records_follow_the_metrics_schema(setup, tmp_path):
    config = SweepConfig(**setup["base"], p="1e-2", targets="mlp", sites="weights+activations")
    _sweep(setup, tmp_path, config, report=False)
    baseline, point = load_records(tmp_path / "results.jsonl")
    assert set(point) == {
        "point_id",
        "baseline",
        "fault",
        "site",
        "target",
        "layers",
        "p",
        "seed",
        "injected",
        "expected",
        "nonfinite",
        "degenerate",
        "requests",
        "metrics",
        "samples",
        "drift",
        "elapsed_s",
    }
    assert "drift" not in baseline and set(point["drift"]) == {TASK}
    assert set(point["drift"][TASK]) == {*DRIFT_FIELDS, "metric_deltas"} and point["drift"][TASK]["matched"] == 4
    assert point["samples"] == {TASK: 4} and set(point["degenerate"]["requests"]) <= {TASK}
    assert baseline["baseline"] and baseline["p"] == 0 and baseline["injected"] == {"elements": 0, "bits": 0}
    assert (point["site"], point["target"], point["layers"], point["p"]) == ("weights+activations", "mlp", "all", 0.01)
    assert set(point["metrics"][TASK]) == {"word_perplexity", "word_perplexity_stderr", "bits_per_byte", "bits_per_byte_stderr"}
    assert point["injected"]["elements"] > 0 and point["expected"]["elements"] > point["injected"]["elements"] / 2
    assert set(point["nonfinite"]["requests"]) == {TASK}


def test_restoring_between_points_matches_a_fresh_load(setup, tmp_path):
    config = SweepConfig(**setup["base"], p="3e-3", faults="bitflip,value", targets="attention,mlp")
    _sweep(setup, tmp_path, config, report=False)
    records = {record["point_id"]: record for record in load_records(tmp_path / "results.jsonl")}
    # The model is clean again afterwards, bit for bit.
    fresh_clean = FaultyHFLM(pretrained=str(setup["model_dir"]), device="cpu").model.state_dict()
    for name, tensor in setup["lm"].model.state_dict().items():
        assert torch.equal(tensor, fresh_clean[name]), name

    points = plan_points(config, 4)
    for point in (points[2], points[-1]):  # one from the middle of the walk, and the last
        spec = point.spec
        fresh = FaultyHFLM(
            pretrained=str(setup["model_dir"]), device="cpu", p=spec.p, fault=spec.fault, target="+".join(spec.target), seed=spec.seed
        )
        assert fresh.spec == spec
        results = lm_eval.simple_evaluate(model=fresh, tasks=[TASK], limit=4, task_manager=setup["task_manager"], log_samples=False)
        record = records[point.point_id]
        metrics = {key.removesuffix(",none"): value for key, value in results["results"][TASK].items() if "," in key}
        assert json.dumps(record["metrics"][TASK], sort_keys=True) == json.dumps(metrics, sort_keys=True)
        totals = fresh.report.totals("weights")
        assert record["injected"] == {"elements": totals["hit_elements"], "bits": totals["fault_bits"]}
        assert record["expected"]["elements"] == totals["expected_elements"]
        assert record["metrics"] != records["baseline"]["metrics"]  # the faults did change the result


def test_a_series_that_selects_nothing_fails_before_any_evaluation(setup, tmp_path):
    config = SweepConfig(**setup["base"], p="1e-3", targets="embedding,mlp", layers="0-1")
    with pytest.raises(SweepConfigError, match="target=embedding, layers=0-1"):
        _sweep(setup, tmp_path, config, report=False)
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "sweep.json").exists()


def test_bits_the_model_lacks_fail_before_anything_is_written(setup, tmp_path):
    # bits=20 is a valid position for float32 but not for this float16 model.
    base = {**setup["base"], "model_args": f"pretrained={setup['model_dir']},dtype=float16"}
    config = SweepConfig(**base, p="1e-3", fault_args="bits=20")
    lm = FaultyHFLM(pretrained=str(setup["model_dir"]), device="cpu", dtype="float16")
    with pytest.raises(SweepConfigError, match=r"bits='20'.*outside 0-15 for float16"):
        run_sweep(tmp_path, config, lm=lm, task_manager=setup["task_manager"], progress=False, report=False)
    assert not (tmp_path / "results.jsonl").exists() and not (tmp_path / "sweep.json").exists()


def test_device_defaults_to_what_this_machine_has(setup):
    config = SweepConfig(model_args=f"pretrained={setup['model_dir']}", tasks=TASK, p="1e-3")
    assert config.device is None
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert evaluation.sweep_device(config) == expected
    lm = evaluation.load_clean_model(config)
    assert torch.device(lm.device).type == expected


def test_sweep_output_holds_no_lm_eval_noise(setup, tmp_path, monkeypatch, capfd, caplog):
    """faults_demo builds its dataset with a function, which makes lm-eval warn on every point;
    outside a git repository lm-eval's `git describe` prints "fatal: ..." on every point."""
    monkeypatch.undo()  # the module fixture skips lm-eval's environment survey; the sweep must do it alone
    monkeypatch.chdir(tmp_path)
    config = SweepConfig(model_args=f"pretrained={setup['model_dir']}", tasks="faults_demo", device="cpu", limit=2, p="1e-3")
    _sweep(setup, tmp_path / "run", config, report=False)
    err = capfd.readouterr().err
    assert "Custom kwargs" not in err + caplog.text and "fatal:" not in err + caplog.text
    _, point = load_records(tmp_path / "run" / "results.jsonl")
    assert point["samples"] == {"faults_demo": 2}
    assert point["requests"] == {"faults_demo": 8} and set(point["degenerate"]["requests"]) == {"faults_demo"}


def test_command_line_runs_resumes_and_reports(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "_task_manager", lambda config: setup["task_manager"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def argv(p):
        return [
            "--model_args",
            f"pretrained={setup['model_dir']}",
            "--tasks",
            TASK,
            "--device",
            "cpu",
            "--limit",
            "2",
            "--include_path",
            setup["base"]["include_path"],
            "--p",
            p,
            "--layers",
            "groups:2",
            "--run_dir",
            str(tmp_path),
            "--no_progress",
        ]

    assert main(parser.parse_args(argv("1e-3"))) == 0
    assert len(_ids(tmp_path / "results.jsonl")) == 3
    assert (tmp_path / "report.md").exists()
    assert main(parser.parse_args(argv("1e-3"))) == 0
    assert "0 points run, 3 already done" in capsys.readouterr().err
    assert main(parser.parse_args(argv("1e-3:5e-3"))) == 2
    assert "whole number of decades" in capsys.readouterr().err


# --------------------------------------------------------------------------- drift against the baseline

NO_FAULT_P, HEAVY_P = 1e-12, 1e-3
"""A rate at which no fault lands in the tiny model (~10^6 bits), and one that moves every answer (~800 faults in mlp)."""


def _drift_config(setup, **kwargs):
    return SweepConfig(**{**setup["base"], "tasks": f"{MC_TASK},{TASK}"}, p=f"{NO_FAULT_P},{HEAVY_P}", targets="mlp", **kwargs)


def _assert_no_drift(record):
    """A point where no fault landed must give exactly zero drift on every task."""
    assert record["injected"] == {"elements": 0, "bits": 0}
    choice, rolling = record["drift"][MC_TASK], record["drift"][TASK]
    assert (choice["matched"], choice["flips"], choice["ties"], choice["nonfinite"]) == (4, 0, 0, 0)
    assert choice["mean_kl"] == 0.0 and choice["mean_abs_delta_ll"] == 0.0 and choice["agreement"] == 1.0
    assert choice["metric_deltas"] == {"acc": 0.0}
    assert rolling["perplexity_ratio"] == 1.0 and rolling["flips"] is None and rolling["mean_kl"] is None


def _assert_damaged(record):
    choice = record["drift"][MC_TASK]
    assert record["injected"]["elements"] > 0 and choice["matched"] == 4
    assert choice["flips"] > 0 or (choice["mean_kl"] or 0) > 0


def test_every_faulty_record_carries_its_drift_and_the_report_plots_it(setup, tmp_path):
    config = _drift_config(setup)
    with pytest.warns(UserWarning, match="NO FAULTS"):
        run = _sweep(setup, tmp_path, config)
    baseline, quiet, heavy = load_records(tmp_path / "results.jsonl")
    assert baseline["baseline"] and "drift" not in baseline
    assert (quiet["p"], heavy["p"]) == (NO_FAULT_P, HEAVY_P)
    _assert_no_drift(quiet)
    _assert_damaged(heavy)
    assert "samples" not in json.dumps(heavy["drift"])  # aggregates only: no per-sample lists
    text = (tmp_path / "results.jsonl").read_text()
    assert "NaN" not in text.split('"drift"')[-1] and "Infinity" not in text.split('"drift"')[-1]
    saved = json.loads((tmp_path / BASELINE_SAMPLES_FILE).read_text())
    assert saved["output_types"][MC_TASK] == "multiple_choice" and len(saved["samples"][MC_TASK]) == 4
    assert "doc" not in saved["samples"][MC_TASK][0]  # stripped to what drift reads

    assert run.report is not None
    report = run.report.read_text()
    figure = tmp_path / "figures" / "drift_vs_p__bitflip_weights_components.png"
    assert figure.is_file() and "](figures/drift_vs_p__bitflip_weights_components.png)" in report
    assert "| flip rate vs clean | KL vs clean |" in report
    quiet_id = quiet["point_id"].replace("|", "\\|")
    quiet_row = next(line for line in report.splitlines() if line.startswith(f"| {quiet_id} |"))
    assert "| 0/4 (0) | 0 |" in quiet_row


def test_a_resumed_sweep_compares_with_the_saved_baseline_samples(setup, tmp_path, capsys):
    config = _drift_config(setup)

    def kill_after(count):
        def hook(record):
            if len(_ids(tmp_path / "results.jsonl")) == count:
                raise Killed

        return hook

    with pytest.raises(Killed):
        _sweep(setup, tmp_path, config, on_point=kill_after(1), report=False)
    assert (tmp_path / BASELINE_SAMPLES_FILE).is_file()
    capsys.readouterr()
    with pytest.raises(Killed), pytest.warns(UserWarning, match="NO FAULTS"):
        _sweep(setup, tmp_path, config, on_point=kill_after(2), report=False)
    assert "evaluating the clean model again" not in capsys.readouterr().err
    _assert_no_drift(load_records(tmp_path / "results.jsonl")[1])  # exactly zero against the samples read back from disk

    # A run directory from before drift was recorded has no samples file: the baseline is evaluated again, once.
    (tmp_path / BASELINE_SAMPLES_FILE).unlink()
    resumed = _sweep(setup, tmp_path, config, report=False)
    assert "baseline_samples.json is missing" in capsys.readouterr().err
    assert len(resumed.ran) == 1 and (tmp_path / BASELINE_SAMPLES_FILE).is_file()
    records = load_records(tmp_path / "results.jsonl")
    assert _ids(tmp_path / "results.jsonl").count("baseline") == 1 and len(records) == 3
    _assert_damaged(records[2])


def test_protection_is_an_axis_with_its_overhead_recorded_and_a_pareto_chart(setup, tmp_path):
    config = SweepConfig(**{**setup["base"], "tasks": MC_TASK}, p="1e-3,1e-2", protections="none;ecc=parity;protect_bits=sign+exponent")
    run = _sweep(setup, tmp_path, config)
    records = load_records(tmp_path / "results.jsonl")
    by_protection = {r.get("protection", "none"): r for r in records if not r["baseline"] and r["p"] == 1e-3}
    assert set(by_protection) == {"none", "ecc=parity", "protect_bits=sign+exponent"}
    assert "protection_counts" not in by_protection["none"]
    assert by_protection["ecc=parity"]["protection_counts"]["overhead"] == pytest.approx(1 / 32)
    assert by_protection["protect_bits=sign+exponent"]["protection_counts"]["overhead"] == pytest.approx(9 / 32)
    assert len({r["injected"]["elements"] for r in by_protection.values()}) == 1  # the same faults drawn under every scheme
    report = run.report.read_text()
    assert "## Protection: tolerated fault rate vs storage overhead" in report and "| ecc=parity | 3.12% |" in report
    assert list((tmp_path / "figures").glob("pareto__*.png"))
    with pytest.raises(SweepConfigError, match="not protection keys"):
        SweepConfig(**setup["base"], p="1e-3", protections="none;p=1e-3")


def test_save_map_in_a_sweep_writes_one_map_per_point(setup, tmp_path):
    """`--fault_args save_map=m.npz` over two rates once kept only the last point's map."""
    from lm_eval_faults.core.fault_map import FaultMap

    config = SweepConfig(**setup["base"], p="1e-3,1e-2", fault_args=f"save_map={tmp_path / 'maps' / 'm.npz'}")
    (tmp_path / "maps").mkdir()
    _sweep(setup, tmp_path / "run", config, report=False)
    points = [point for point in plan_points(config, 4) if not point.baseline]
    assert len({point.spec.save_map for point in points}) == 2
    maps = {point.point_id: FaultMap.load(point.spec.save_map) for point in points}
    assert sorted(path.name for path in (tmp_path / "maps").iterdir()) == sorted(Path(p.spec.save_map).name for p in points)
    small, large = (len(maps[point.point_id]) for point in points)
    assert 0 < small < large  # each file holds its own point's faults


def test_generative_points_keep_their_texts_and_the_report_shows_them_side_by_side(setup, tmp_path):
    config = SweepConfig(**{**setup["base"], "tasks": GEN_TASK}, p=f"{HEAVY_P},1e-2", targets="all", sites="activations")
    run = _sweep(setup, tmp_path, config)
    _, *points = load_records(tmp_path / "results.jsonl")
    texts = [point["drift"][GEN_TASK]["texts"] for point in points]
    assert [len(kept) for kept in texts] == [4, 4] and texts[0][0]["prompt"] == "question : what color is the sky ? answer :"
    assert texts[0][0]["clean"] == texts[1][0]["clean"]
    assert any(item["faulted"] != item["clean"] for kept in texts for item in kept)
    page = (tmp_path / "generations.html").read_text()
    assert page.count('class="text clean"') == 4 * 2, "a row per point for each of the 4 documents"
    assert all(point["point_id"] in page for point in points)
    assert "[generations.html](generations.html)" in run.report.read_text()
