"""Storage as a sweep axis (`sweep --storages`): one standard sweep per storage, each measured
against its own storage at p=0, and one table and figure comparing them beside the float model."""

from __future__ import annotations

import json

import pytest
from lm_eval_faults.study.grid import SweepConfig, SweepConfigError
from lm_eval_faults.study.records import load_records
from lm_eval_faults.study.storage_sweeps import parse_storages, run_storage_sweeps, storage_configs
from lm_eval_faults.study.storage_table import StorageCurve, StoragePoint, load_curves, table_lines

CONFIG = SweepConfig(model_args="", tasks="faults_demo", p="1e-3,3e-2", limit=8, device="cpu")


def test_items_name_a_storage_and_int4_its_group_and_the_float_model_comes_first():
    items = parse_storages("int8; int4,group_size=32 ;storage=q4_1")
    assert [item.slug for item in items] == ["none", "int8", "int4_g32", "q4_1"]
    assert [item.fault_args for item in items] == ["", "storage=int8", "storage=int4,group_size=32", "storage=q4_1"]
    assert parse_storages("q8_0;none")[1].label == "float (the model's own)"  # listed: kept where it was given


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("int9", r"--storages item 'int9': .*storage='int9' is invalid: .*int8"),
        ("int8,bits=exponent", r"'int8,bits=exponent': .* bits given \(keys shared by every storage go in --fault_args\)"),
        ("int8;int8", "--storages lists int8 twice"),
        ("q4_1,group_size=32", "group_size=32 is invalid: sets the groups of storage=int4 only"),
        (" ; ", "--storages is empty"),
    ],
)
def test_a_bad_item_is_refused_in_one_line_naming_it(value, message):
    with pytest.raises(SweepConfigError, match=message):
        parse_storages(value)


def test_each_storage_sweep_adds_its_keys_to_the_shared_fault_args():
    config = SweepConfig(model_args="", tasks="faults_demo", p="1e-3", fault_args="bits=exponent")
    sweeps = storage_configs(config, parse_storages("float16"))
    assert [sub.fault_args for _, sub in sweeps] == ["bits=exponent", "bits=exponent,storage=float16"]
    with pytest.raises(SweepConfigError, match="--fault_args sets storage while --storages varies it"):
        storage_configs(SweepConfig(model_args="", tasks="faults_demo", p="1e-3", fault_args="storage=int8"), parse_storages("q4_1"))
    with pytest.raises(SweepConfigError, match="--targets would mix several curves"):
        storage_configs(SweepConfig(model_args="", tasks="faults_demo", p="1e-3", targets="attention,mlp"), parse_storages("q4_1"))


def test_a_storage_the_model_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(SweepConfigError, match=r"--storages item file: .*gguf_file"):
        run_storage_sweeps(run_dir, CONFIG, "int8;file", progress=False)
    assert not run_dir.exists()  # the int8 sweep that could run did not start either


def test_the_table_sets_each_storage_against_its_own_clean_score_and_the_float_models():
    float_model = StorageCurve("float", 32.0, 1.0, (StoragePoint(1e-9, 1.0, 2, 0), StoragePoint(1e-8, 0.25, 2, 2)))
    int8 = StorageCurve("int8", 8.0, 0.8, (StoragePoint(1e-9, 0.8, 2, 0), StoragePoint(1e-8, 0.78, 2, 0), StoragePoint(1e-7, 0.5, 2, 1)))
    lines = table_lines([float_model, int8])
    assert lines[2] == "| float | 1.000 | 1.000 | 32.00 | 1e-09 | 3.2e-08 | 1e-08 |"
    assert lines[3] == "| int8 | 0.800 | 0.800 | 8.00 | 1e-08 | 8e-08 | — |"  # one seed of two collapsed: not "collapsed"


@pytest.mark.slow
def test_storages_run_as_sweeps_of_their_own_and_are_compared(tmp_path):
    curves = run_storage_sweeps(tmp_path, CONFIG, "q4_1", report=False, progress=False)
    assert [curve.label for curve in curves] == ["float (the model's own)", "q4_1"]
    float_records = load_records(tmp_path / "none" / "results.jsonl")
    q4_records = load_records(tmp_path / "q4_1" / "results.jsonl")
    assert "storage" not in float_records[1]
    assert q4_records[0]["baseline"] and {row["storage"] for row in q4_records[0]["storage"].values()} == {"q4_1"}
    assert json.loads((tmp_path / "q4_1" / "sweep.json").read_text())["fault_args"] == "storage=q4_1"
    assert curves[0].bits_per_weight == 32.0 and curves[1].bits_per_weight == pytest.approx(5.0)
    assert [point.p for point in curves[1].points] == [1e-3, 3e-2]
    assert load_curves(tmp_path / "storages.json") == curves
    table = (tmp_path / "storages.md").read_text()
    assert "| q4_1 |" in table and (tmp_path / "storages.png").stat().st_size > 0
    again = run_storage_sweeps(tmp_path, CONFIG, "q4_1", report=False, progress=False)  # resumes: nothing runs again
    assert again == curves and load_records(tmp_path / "q4_1" / "results.jsonl") == q4_records
    with pytest.raises(SweepConfigError, match="is a single sweep's run directory"):
        run_storage_sweeps(tmp_path / "q4_1", CONFIG, "int8", progress=False)
