"""faulty_hf inside lm-eval: registration, identity at p=0, results JSON, CLI, YAML, cache, PEFT, GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval_faults.core.spec import FaultSpecError
from lm_eval_faults.harness.model import FaultyHFLM

from tiny import tiny_model, tiny_tokenizer

TASKS = ["tiny_colors", "tiny_colors_gen"]


def evaluate(model: str, model_args: str, task_manager, **kwargs) -> dict:
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, device="cpu", task_manager=task_manager, log_samples=True, **kwargs
    )


def responses(results: dict) -> str:
    """Every raw response (log-likelihoods, generations) per task, in document order, as JSON
    (so that NaN compares equal to NaN and floats compare bit for bit through repr)."""
    return json.dumps({task: [sample["resps"] for sample in samples] for task, samples in results["samples"].items()})


def test_registration_costs_unrelated_processes_nothing():
    code = "import sys; print(sorted(m for m in ('torch', 'transformers', 'lm_eval') if m in sys.modules), 'lm_eval_faults.harness.autoload' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert output == "[] True"


@pytest.mark.slow
def test_faulty_hf_is_found_by_an_unmodified_lm_eval():
    code = "from lm_eval.api.registry import get_model; print(get_model('faulty_hf').__name__, get_model('hf').__name__)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert output == "FaultyHFLM HFLM"


@pytest.mark.parametrize("batch_size", [1, 3])
def test_p0_is_bit_identical_to_hf(tiny_llama_dir, task_manager, batch_size):
    args = f"pretrained={tiny_llama_dir},dtype=float32"
    clean = evaluate("hf", args, task_manager, batch_size=batch_size)
    faulty = evaluate("faulty_hf", args + ",p=0,target=attention", task_manager, batch_size=batch_size)
    assert responses(faulty) == responses(clean)
    assert faulty["config"]["fault_injection"]["weights"]["totals"]["hit_elements"] == 0


def test_report_lands_in_results_json_and_nan_never_crashes(tiny_llama_dir, task_manager, capsys):
    results = evaluate("faulty_hf", f"pretrained={tiny_llama_dir},p=5e-2,site=weights+activations,seed=1", task_manager)
    report = results["config"]["fault_injection"]
    assert report["weights"]["totals"]["hit_elements"] > 1000 and report["activations"]["totals"]["calls"] > 0
    assert report["spec"]["p"] == 0.05 and report["spec"]["site"] == "weights+activations"
    assert report["requests"] == {"tiny_colors": 16, "tiny_colors_gen": 4}
    assert report["nonfinite_requests"]["tiny_colors"] > 0, "at p=0.05 per bit log-likelihoods go non-finite"
    assert "Fault injection: bitflip p=0.05" in capsys.readouterr().err
    assert set(results["results"]) == set(TASKS)


def test_bad_model_args_fail_before_the_model_loads(task_manager):
    with pytest.raises(FaultSpecError, match="did you mean 'target'"):
        evaluate("faulty_hf", "pretrained=/nonexistent/model,traget=attention", task_manager)
    with pytest.raises(FaultSpecError, match="fault='flip' is invalid: choose one of bitflip"):
        evaluate("faulty_hf", "pretrained=/nonexistent/model,fault=flip", task_manager)


def test_fault_keys_without_a_rate_warn_that_nothing_is_injected(tiny_llama_dir):
    """`fault=stuck1,bits=exponent` with no p is the clean model: said loudly, not read as harmless."""
    with pytest.warns(UserWarning, match="fault, bits, site but no rate .* NO FAULTS are injected"):
        lm = FaultyHFLM(pretrained=str(tiny_llama_dir), fault="stuck1", bits="exponent", site="activations", device="cpu")
    assert not lm.injection.spec.active
    FaultyHFLM(pretrained=str(tiny_llama_dir), p=0, site="activations", device="cpu")  # p=0 written out: no warning


def test_selector_matching_nothing_is_an_error(tiny_llama_dir, task_manager):
    with pytest.raises(ValueError, match="select no parameters"):
        evaluate("faulty_hf", f"pretrained={tiny_llama_dir},p=1e-3,target=embedding,layers=0", task_manager)


def test_layers_beyond_the_config_fail_before_the_weights_load(tiny_llama_dir, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the check")

    monkeypatch.setattr(HFLM, "__init__", no_loading)
    with pytest.raises(FaultSpecError, match="this model has 4 decoder layers"):
        FaultyHFLM(pretrained=str(tiny_llama_dir), p=1e-3, layers="40")
    with pytest.raises(FaultSpecError, match="outside 0-15 for float16"):
        FaultyHFLM(pretrained=str(tiny_llama_dir), p=1e-3, bits="20", dtype="float16")
    with pytest.raises(FaultSpecError, match="did you mean 'p'"):
        FaultyHFLM(pretrained=str(tiny_llama_dir), P=1e-3)
    for bad in ("prob", "rate", "fault_type"):
        with pytest.raises(FaultSpecError, match="neither a fault key"):
            FaultyHFLM(pretrained=str(tiny_llama_dir), **{bad: 1e-3})
    with pytest.raises(FaultSpecError, match="given twice"):
        FaultyHFLM.create_from_arg_string(f"pretrained={tiny_llama_dir},p=1e-3,p=1e-4")
    with pytest.raises(FaultSpecError, match="underflows"):
        FaultyHFLM.create_from_arg_string(f"pretrained={tiny_llama_dir},p=1e-400")
    monkeypatch.setenv("LM_EVAL_FAULTS_DEVICE_PATH", "bogus")
    with pytest.raises(FaultSpecError, match="LM_EVAL_FAULTS_DEVICE_PATH='bogus': expected one of auto, always, never"):
        FaultyHFLM(pretrained=str(tiny_llama_dir), p=1e-3, site="activations")


def test_request_cache_never_serves_another_spec(tiny_llama_dir, task_manager, tmp_path):
    args = f"pretrained={tiny_llama_dir}"
    cache = str(tmp_path / "cache")
    evaluate("faulty_hf", args + ",p=0", task_manager, use_cache=cache)
    cached_faulty = evaluate("faulty_hf", args + ",p=2e-2,seed=4", task_manager, use_cache=cache)
    fresh_faulty = evaluate("faulty_hf", args + ",p=2e-2,seed=4", task_manager)
    clean = evaluate("hf", args, task_manager)
    assert responses(cached_faulty) == responses(fresh_faulty) != responses(clean)


def test_an_already_loaded_model_and_exact_restore():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = FaultyHFLM(pretrained=model, tokenizer=tiny_tokenizer(), p=1e-2, target="mlp", device="cpu")
    assert lm.report.totals()["changed_elements"] > 0
    assert {site.component for site in lm.report.weights} == {"mlp"}
    lm.set_faults(lm.spec.__class__(p=0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_peft_adapter_and_target_lora(tiny_llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    adapter = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    lm = FaultyHFLM(pretrained=str(tiny_llama_dir), peft=str(tmp_path / "adapter"), p=5e-2, target="lora", device="cpu")
    names = [site.name for site in lm.report.weights]
    assert names and all("lora_" in name for name in names)
    assert lm.report.totals()["changed_elements"] > 0
    with pytest.raises(ValueError, match="select no parameters"):
        FaultyHFLM(pretrained=str(tiny_llama_dir), p=5e-2, target="lora", device="cpu")


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def faulty_hf_argv(model_dir: Path, fault_args: str, task_dir: Path, tmp_path: Path) -> list[str]:
    """lm-eval's options for one `faulty_hf` run of the tiny task, results under tmp_path/out."""
    return [
        "--model", "faulty_hf", "--model_args", f"pretrained={model_dir},{fault_args}", "--tasks", "tiny_colors",
        "--include_path", str(task_dir), "--device", "cpu", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip


def results_json(output_dir: Path) -> dict:
    (path,) = output_dir.rglob("results_*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("entry", [["lm_eval"], ["lm-eval", "run"]])
def test_cli_end_to_end(tiny_llama_dir, tiny_task_dir, tmp_path, entry):
    done = run_cli(
        [
            *entry,
            *faulty_hf_argv(tiny_llama_dir, "p=1e-2,target=attention,layers=0-1", tiny_task_dir, tmp_path),
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = results_json(tmp_path / "out")["config"]["fault_injection"]
    assert set(report["weights"]["by_component"]) == {"attention"}
    assert set(report["weights"]["by_layer"]) == {"000", "001"}
    assert report["weights"]["totals"]["hit_elements"] > 0
    assert "Fault injection: bitflip p=0.01" in done.stderr


@pytest.mark.slow
def test_cli_yaml_config(tiny_llama_dir, tiny_task_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: faulty_hf\nmodel_args:\n  pretrained: {tiny_llama_dir}\n  p: 1e-2\n  fault: stuck1\n  target: mlp\n"
        f"tasks: [tiny_colors]\ninclude_path: {tiny_task_dir}\ndevice: cpu\noutput_path: {tmp_path / 'out'}\n"
    )
    done = run_cli(["lm-eval", "run", "--config", str(config)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = results_json(tmp_path / "out")["config"]["fault_injection"]
    assert report["spec"]["fault"] == "stuck1" and set(report["weights"]["by_component"]) == {"mlp"}


@pytest.mark.slow
def test_real_gguf_model_passes_through_and_checkpoint_is_untouched(smollm_dir):
    gguf = smollm_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    stat_before = gguf.stat()
    lm = FaultyHFLM(
        pretrained=str(smollm_dir), gguf_file=gguf.name, dtype="float32", p=1e-7, target="attention", layers="0-3", device="cpu"
    )
    totals = lm.report.totals()
    assert lm.model.num_parameters() == 134_515_008
    assert totals["elements"] == 3_538_944 and totals["hit_elements"] > 0
    tokens = lm.tok_encode("The capital of France is")
    with torch.no_grad():
        assert torch.isfinite(lm.model(torch.tensor([tokens])).logits).all()
    assert gguf.stat().st_mtime == stat_before.st_mtime and gguf.stat().st_size == stat_before.st_size


@pytest.mark.slow
def test_data_parallel_accelerate_launch(tiny_llama_dir, tiny_task_dir, tmp_path):
    """Two CPU ranks: the run completes and request counts are summed over ranks."""
    done = run_cli(
        [
            "accelerate",
            "launch",
            "--num_processes",
            "2",
            "--cpu",
            "-m",
            "lm_eval",
            *faulty_hf_argv(tiny_llama_dir, "p=1e-2,site=weights+activations", tiny_task_dir, tmp_path),
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = results_json(tmp_path / "out")["config"]["fault_injection"]
    assert report["requests"] == {"tiny_colors": 16}
    assert report["weights"]["totals"]["hit_elements"] > 0 and report["activations"]["totals"]["calls"] > 0


def test_targets_command_prints_the_taxonomy(tiny_llama_dir, capsys):
    from lm_eval_faults.cli import main

    assert main(["targets", str(tiny_llama_dir), "--model_args", "target=attention,layers=0-1"]) == 0
    out = capsys.readouterr().out
    assert "4 decoder layers at 'model.layers'" in out
    assert "attention           0-3" in out and "attention           0-1" in out
    assert "norm" in out and "lm_head" in out
