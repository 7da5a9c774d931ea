"""A run directory holds one sweep, whatever happens to it: lock, symlinks, garbage, foreign records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from lm_eval_faults.study.grid import SweepConfig, SweepConfigError, plan_points
from lm_eval_faults.study.run_dir import RunDir, append_line
from lm_eval_faults.study.sweep_report import grid_records

CONFIG = SweepConfig(model_args="pretrained=x", tasks="t", p="1e-5,1e-4")
IDS = [point.point_id for point in plan_points(CONFIG, None)]


def _record(point_id: str) -> str:
    return json.dumps({"point_id": point_id, "baseline": point_id == "baseline"})


def test_deleting_the_lock_file_does_not_let_a_second_sweep_in(tmp_path):
    with RunDir(tmp_path).claim(CONFIG):
        (tmp_path / ".sweep.lock").unlink()
        with pytest.raises(SweepConfigError, match="in use by another running sweep"), RunDir(tmp_path).claim(CONFIG):
            pass
    with RunDir(tmp_path).claim(CONFIG):  # released once the first sweep ends
        pass


@pytest.mark.parametrize("step", ["claim", "append"])
def test_a_symlinked_results_file_is_refused_and_its_target_untouched(tmp_path, step):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "results.jsonl")
    with pytest.raises(SweepConfigError, match="symbolic link"):
        if step == "claim":
            with RunDir(run).claim(CONFIG):
                pass
        else:
            append_line(run / "results.jsonl", _record("baseline").encode())
    assert outside.read_text() == ""


GARBAGE = [
    pytest.param("not json at all", id="text"),
    pytest.param("[1, 2, 3]", id="a-list"),
    pytest.param('{"no_point_id": 1}', id="no-point-id"),
    pytest.param("\x00\x01\x02", id="binary"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_a_garbage_middle_line_is_set_aside_and_the_sweep_carries_on(tmp_path, garbage):
    directory = RunDir(tmp_path)
    directory.save_config(CONFIG, IDS)
    directory.results.write_text("\n".join([_record(IDS[0]), garbage, _record(IDS[1])]) + "\n")
    with directory.claim(CONFIG), pytest.warns(UserWarning, match="set aside 1 malformed line"):
        done = directory.finished()
    assert done == {IDS[0], IDS[1]}
    assert (tmp_path / "results.jsonl.rejected").read_text() == garbage + "\n"
    assert directory.results.read_text() == _record(IDS[0]) + "\n" + _record(IDS[1]) + "\n"


def test_the_report_reads_past_garbage_and_leaves_out_points_not_in_the_grid(tmp_path):
    directory = RunDir(tmp_path)
    directory.save_config(CONFIG, IDS)
    directory.results.write_text("\n".join([_record(IDS[0]), "garbage", _record("bitflip|weights|all|all|p=0.5|seed=9"), _record(IDS[1])]))
    with pytest.warns(UserWarning) as caught:
        records = grid_records(Path(tmp_path))
    assert [record["point_id"] for record in records] == IDS[:2]
    messages = " ".join(str(warning.message) for warning in caught)
    assert "skipping malformed line" in messages and "not in this sweep's grid" in messages
