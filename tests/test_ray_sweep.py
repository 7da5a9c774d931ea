"""Sweeps on Ray actors: the same records as one process, no point lost or repeated when an actor
dies, and run directories that resume across the two.

One local Ray instance (2 CPUs) serves the module, and every Ray sweep runs 2 actors of 1 CPU
and 1 torch thread each, like the single-process sweep they are compared with. The model is the
embedded demo model on 8 `faults_demo` questions: what is tested is scheduling and bookkeeping,
so each point takes a fraction of a second and the time goes to starting Ray and its actors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from lm_eval_faults.cli.sweep import add_arguments, main, ray_options_from_args
from lm_eval_faults.harness.package_data import demo_model_dir
from lm_eval_faults.study import evaluation
from lm_eval_faults.study.grid import SweepConfig, SweepConfigError, plan_points
from lm_eval_faults.study.ray_pool import LOCAL, RayOptions, RayPool
from lm_eval_faults.study.records import load_records
from lm_eval_faults.study.runner import run_sweep

CONFIG = SweepConfig(
    model_args=f"pretrained={demo_model_dir()}", tasks="faults_demo", p="1e-3,1e-2", targets="attention,mlp", device="cpu", limit=8
)
EXPECTED = [point.point_id for point in plan_points(CONFIG, None)]
EXPECTED_STORAGE_POINT = "bitflip|weights|all|all|p=0.003|seed=0"
RUN_ONLY = ("elapsed_s", "retries")
"""Record fields that describe the run rather than the result."""


class Killed(Exception):
    """Stands in for SIGKILL of the driver: the sweep stops between two points."""


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="Ray sweeps need the optional extra: pip install 'lm-eval-faults[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process() -> dict[str, Any]:
    """The clean demo model and a TaskManager for the single-process sweeps of this module."""
    lm = evaluation.load_clean_model(CONFIG)
    return {"lm": lm, "task_manager": evaluation._task_manager(CONFIG)}


@pytest.fixture(scope="module")
def reference(in_process, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The single-process sweep's records, by point id."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_sweep(run_dir, CONFIG, **in_process, report=False, progress=False)
    return _by_id(run_dir)


def _ids(run_dir: Path) -> list[str]:
    return [json.loads(line)["point_id"] for line in (run_dir / "results.jsonl").read_text().splitlines()]


def _by_id(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {record["point_id"]: record for record in load_records(run_dir / "results.jsonl")}


def _assert_same_results(run_dir: Path, reference: dict[str, dict[str, Any]]) -> None:
    """Every point exactly once, each record equal to the single-process one but for timing and retries."""
    assert sorted(_ids(run_dir)) == sorted(EXPECTED)
    records = _by_id(run_dir)
    for point_id, expected in reference.items():
        got = {key: value for key, value in records[point_id].items() if key not in RUN_ONLY}
        assert got == {key: value for key, value in expected.items() if key not in RUN_ONLY}, point_id


def _ray(**kwargs: Any) -> RayOptions:
    return RayOptions(actors=2, **kwargs)


@pytest.mark.slow
def test_a_ray_sweep_writes_the_single_process_records_point_for_point(ray_instance, reference, in_process, tmp_path):
    run = run_sweep(tmp_path, CONFIG, ray=_ray(), progress=False)
    assert sorted(run.ran) == sorted(EXPECTED) and run.retries == 0
    _assert_same_results(tmp_path, reference)
    assert _ids(tmp_path)[0] == "baseline"  # it runs first: every other point's drift is measured against it
    assert all("drift" in record for record in load_records(tmp_path / "results.jsonl")[1:])
    assert run.report is not None and "retried" not in run.report.read_text()
    assert ray_instance.is_initialized()  # a Ray instance the caller started is the caller's to stop

    # Killing the driver after its third record leaves the first three lines (it is the only
    # writer, and each record is fsynced whole); one process resumes from there.
    results = tmp_path / "results.jsonl"
    results.write_text("".join(results.read_text().splitlines(keepends=True)[:3]))
    kept = _ids(tmp_path)
    resumed = run_sweep(tmp_path, CONFIG, **in_process, report=False, progress=False)
    assert resumed.skipped == [point_id for point_id in EXPECTED if point_id in kept] and len(resumed.ran) == 2
    _assert_same_results(tmp_path, reference)


@pytest.mark.slow
def test_a_storage_sweep_on_ray_writes_the_single_process_records(ray_instance, in_process, tmp_path):
    """Each actor encodes its own model into the storage; the faults and scores are the same as in one process."""
    config = replace(CONFIG, targets="all", p="3e-3", fault_args="storage=q4_1")
    run_sweep(tmp_path / "local", config, **in_process, report=False, progress=False)
    run_sweep(tmp_path / "ray", config, ray=_ray(), report=False, progress=False)
    local, on_ray = _by_id(tmp_path / "local"), _by_id(tmp_path / "ray")
    assert sorted(on_ray) == sorted(local) == ["baseline", EXPECTED_STORAGE_POINT]
    for point_id, expected in local.items():
        assert {k: v for k, v in on_ray[point_id].items() if k not in RUN_ONLY} == {k: v for k, v in expected.items() if k not in RUN_ONLY}
    assert sum(row["weights_affected"] for row in on_ray[EXPECTED_STORAGE_POINT]["storage"].values()) > 0


@pytest.mark.slow
def test_a_killed_actor_loses_no_point_and_repeats_none(ray_instance, reference, in_process, tmp_path):
    # A single-process sweep killed after the baseline and one point, resumed on Ray ...
    def kill_driver(record: dict[str, Any]) -> None:
        if len(_ids(tmp_path)) == 2:
            raise Killed

    with pytest.raises(Killed):
        run_sweep(tmp_path, CONFIG, **in_process, on_point=kill_driver, report=False, progress=False)

    # ... where an actor is killed in the middle of a point as the first point comes back: the actor
    # that freed up got its next point before the driver wrote the record, so that point has just
    # started (the newest in flight) and is lost with the actor.
    pools: list[RayPool] = []
    killed: list[str] = []

    def kill_actor(record: dict[str, Any]) -> None:
        running = pools[0].in_flight  # a point that already finished would survive its actor
        if not killed and running:
            point_id, actor = list(running.items())[-1]
            killed.append(point_id)
            ray_instance.kill(actor, no_restart=True)

    resumed = run_sweep(tmp_path, CONFIG, ray=_ray(on_start=pools.append), on_point=kill_actor, progress=False)
    assert resumed.skipped == EXPECTED[:2] and sorted(resumed.ran) == sorted(EXPECTED[2:])
    _assert_same_results(tmp_path, reference)
    retried = [record for record in load_records(tmp_path / "results.jsonl") if record.get("retries")]
    assert [(record["point_id"], record["retries"]) for record in retried] == [(killed[0], 1)] and resumed.retries == 1
    assert resumed.report is not None
    assert f"{len(retried)} point(s) evaluated again after a Ray actor died ({resumed.retries} retries)" in resumed.report.read_text()


# --------------------------------------------------------------------------- options, without Ray


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--tasks", "faults_demo", "--p", "1e-3", "--run_dir", "unused", *argv])


def test_ray_options_on_the_command_line():
    assert ray_options_from_args(_parse()) is None
    assert ray_options_from_args(_parse("--ray")) == RayOptions(address=LOCAL)
    assert ray_options_from_args(_parse("--ray", "auto", "--ray_actors", "4")) == RayOptions(address="auto", actors=4)
    with pytest.raises(SweepConfigError, match="add --ray"):
        ray_options_from_args(_parse("--ray_actors", "2"))
    with pytest.raises(SweepConfigError, match="at least 1 CPU"):
        ray_options_from_args(_parse("--ray", "--ray_actor_cpus", "0"))


def test_without_ray_installed_the_error_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    args = _parse("--ray", "--model_args", f"pretrained={demo_model_dir()}")
    args.run_dir = str(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lm-eval-faults sweep: --ray needs Ray, which is not installed: pip install 'lm-eval-faults[ray]'"
    assert not (tmp_path / "sweep.json").exists()
