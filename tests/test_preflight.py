"""Bad input to our commands fails in one line, before any model loads and before any file is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lm_eval_faults.cli import main
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError

SWEEP = ["sweep", "--tasks", "faults_demo", "--p", "1e-3", "--no_progress"]

CLI_CASES = {
    "sweep-unknown-task": (["sweep", "--tasks", "nosuchtask", "--p", "1e-3"], "nosuchtask"),
    "sweep-negative-limit": ([*SWEEP, "--limit", "-1"], "--limit"),
    "sweep-layers-beyond-model": ([*SWEEP, "--layers", "0-99"], "layers='0-99'"),
    "sweep-protect-bits-fp16": ([*SWEEP, "--model_args", "dtype=float16", "--protections", "protect_bits=20"], "protect_bits='20'"),
    "sweep-protect-bits-31-fp16": ([*SWEEP, "--model_args", "dtype=float16", "--protections", "protect_bits=31"], "protect_bits='31'"),
    "sweep-ecc-policy-alone": ([*SWEEP, "--protections", "ecc_policy=keep"], "ecc_policy"),
    "sweep-clamp-act-scope-all": ([*SWEEP, "--sites", "activations", "--fault_args", "act_scope=all,clamp=activations"], "act_scope"),
    "bisect-unknown-task": (["bisect", "--tasks", "nosuchtask", "--fault_args", "p=1e-3"], "nosuchtask"),
    "bisect-fault-key-in-model-args": (
        ["bisect", "--tasks", "faults_demo", "--fault_args", "p=1e-3", "--model_args", "p=1e-3"],
        "--fault_args",
    ),
    "bisect-fraction": (["bisect", "--tasks", "faults_demo", "--fault_args", "p=1e-3", "--fraction", "5"], "--fraction"),
    "bisect-json-unwritable": (["bisect", "--tasks", "faults_demo", "--fault_args", "p=1e-3", "--json", "/proc/nope/out.json"], "--json"),
    "bisect-save-map-dir": (["bisect", "--tasks", "faults_demo", "--fault_args", "p=1e-3", "--save_map", "{tmp}"], "--save_map"),
    "bisect-missing-map": (["bisect", "--tasks", "faults_demo", "--map", "{tmp}/none.npz"], "--map"),
    "targets-bad-dtype": (["targets", "--model_args", "dtype=float13"], "dtype='float13'"),
    "analyze-json-unwritable": (["analyze", "--model_args", "p=1e-3", "--json", "/proc/nope/a.json"], "--json"),
    "bisect-tolerance": (["bisect", "--tasks", "faults_demo", "--fault_args", "p=1e-3", "--tolerance", "2"], "--tolerance"),
    "analyze-site-activations": (["analyze", "--model_args", "p=1e-5,site=activations"], "site='activations'"),
    "analyze-replay": (["analyze", "--model_args", "replay={tmp}/m.npz"], "replay="),
    "analyze-bad-scheme": (["analyze", "--model_args", "p=1e-3,dtype=float16", "--protections", "protect_bits=20"], "protect_bits"),
    "report-fraction": (["report", "{tmp}", "--fraction", "5"], "--fraction"),
    "sweep-save-map-unwritable": ([*SWEEP, "--fault_args", "save_map=/proc/nope/m.npz"], "save_map=/proc/nope/m.npz"),
    "sweep-replay": ([*SWEEP, "--fault_args", "replay={tmp}/m.npz"], "replay"),
    "drift-json-dir": (["drift", "{tmp}", "{tmp}", "--json", "{tmp}"], "--json"),
}


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: the error must come first."""
    import transformers
    from lm_eval.models.huggingface import HFLM

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(HFLM, "__init__", refuse)


@pytest.mark.slow
@pytest.mark.parametrize("argv, expected", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_refuses_before_loading(argv, expected, tmp_path, capsys, no_model_load, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LM_EVAL_FAULTS_TRACEBACK", raising=False)
    run_dir = tmp_path / "run"
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    if argv[0] == "sweep":
        argv += ["--run_dir", str(run_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and expected in err[-1], err
    assert not run_dir.exists(), "a refused sweep left its run directory behind"


SPEC_CASES = {
    "ecc-policy-without-secded": ({"ecc_policy": "keep"}, "ecc_policy"),
    "ecc-policy-with-parity": ({"ecc": "parity", "ecc_policy": "keep"}, "ecc_policy"),
    "clamp-activations-act-scope-all": ({"clamp": "activations", "act_scope": "all"}, "act_scope=leaf"),
}


@pytest.mark.parametrize("fields, expected", SPEC_CASES.values(), ids=SPEC_CASES.keys())
def test_spec_refuses(fields, expected):
    with pytest.raises(FaultSpecError, match=expected):
        FaultSpec(**fields)


def test_output_path_probe_leaves_nothing(tmp_path: Path) -> None:
    from lm_eval_faults.cli.paths import check_output_path

    check_output_path("--json", str(tmp_path / "new" / "out.json"))
    assert os.listdir(tmp_path) == []


LM_EVAL_CASES = {
    "unknown-fault-kind": ("p=1e-5,fault=flip", "lm_eval: FaultSpecError: model_args fault='flip' is invalid"),
    "ecc-policy-alone": ("p=1e-5,ecc_policy=keep", "lm_eval: FaultSpecError: model_args ecc_policy='keep' is invalid"),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_args, expected", LM_EVAL_CASES.values(), ids=LM_EVAL_CASES.keys())
def test_lm_eval_cli_user_error_is_one_line(model_args, expected):
    """Under lm-eval's own command line our user errors end in one line (no traceback), exit 2."""
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("LM_EVAL_FAULTS_TRACEBACK", None)
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "faulty_hf",
        "--model_args",
        model_args,
        "--tasks",
        "faults_demo",
        "--limit",
        "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(expected)


@pytest.mark.parametrize("save_map", ["/proc/nope/m.npz", "/proc/m.npz", "{tmp}"])
def test_faulty_hf_refuses_an_unwritable_save_map_before_loading(save_map, tmp_path, no_model_load):
    """Under lm_eval, `save_map=/proc/nope/m.npz` once failed with a traceback after the model loaded."""
    from lm_eval_faults.core.fault_map import FaultMapError
    from lm_eval_faults.harness.model import FaultyHFLM

    with pytest.raises(FaultMapError, match=r"save_map=.* can't be written"):
        FaultyHFLM(p=1e-5, save_map=save_map.replace("{tmp}", str(tmp_path)), device="cpu")
