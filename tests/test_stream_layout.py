"""The core's imports, one model loader, exception-safe injection, the
stream table's uniqueness, stacked injections, and a golden fault map."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval_faults import FaultSpec, inject
from lm_eval_faults.core.random.streams import StreamKind, site_key, spec_key
from lm_eval_faults.core.storage.words import WordAccess

from golden import first_moved
from tiny import save_tiny_model, tiny_model


def test_core_imports_neither_lm_eval_nor_matplotlib_nor_the_cli():
    code = (
        "import sys, lm_eval_faults.core;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lm_eval', 'matplotlib') or m.startswith(('lm_eval_faults.cli', "
        "'lm_eval_faults.study', 'lm_eval_faults.harness.model'))];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_targets_analyze_and_faulty_hf_load_the_same_dtype(tmp_path):
    from lm_eval_faults.harness.loading import load_model
    from lm_eval_faults.harness.model import FaultyHFLM

    directory = save_tiny_model(tmp_path / "fp16", dtype=torch.float16)
    loaded = load_model({"pretrained": str(directory)})
    lm = FaultyHFLM(pretrained=str(directory), device="cpu")
    assert loaded.dtype == lm.model.dtype == torch.float16
    assert (
        load_model({"pretrained": str(directory), "dtype": "float32"}).dtype
        == FaultyHFLM(pretrained=str(directory), device="cpu", dtype="float32").model.dtype
    )


def _state(model: torch.nn.Module) -> dict[str, bytes]:
    return {name: tensor.detach().clone().view(-1).view(torch.uint8).numpy().tobytes() for name, tensor in model.state_dict().items()}


def test_a_failed_write_restores_every_word_and_removes_every_hook(monkeypatch):
    model = tiny_model()
    clean = _state(model)
    writes = {"n": 0}
    original = WordAccess.write

    def failing_write(self, positions, values):
        writes["n"] += 1
        if writes["n"] == 3:
            raise RuntimeError("tensor cannot be written")
        original(self, positions, values)

    monkeypatch.setattr(WordAccess, "write", failing_write)
    with pytest.raises(RuntimeError, match="cannot be written"):
        inject(model, FaultSpec(p=1e-2, site="weights+activations"))
    assert writes["n"] > 3, "the failure happened partway, and the restore wrote the first two tensors back"
    assert _state(model) == clean
    assert not any(module._forward_hooks for module in model.modules())


def test_a_hook_that_cannot_be_registered_leaves_the_model_clean(monkeypatch):
    model = tiny_model()
    clean = _state(model)
    calls = {"n": 0}
    original = torch.nn.Module.register_forward_hook

    def failing_register(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("hook refused")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", failing_register)
    with pytest.raises(RuntimeError, match="hook refused"):
        inject(model, FaultSpec(p=1e-2, site="weights+activations"))
    assert _state(model) == clean
    assert not any(module._forward_hooks for module in model.modules())


def test_streams_of_many_tensors_and_calls_never_collide():
    """A module output with 300 tensors (more than the old 256 streams per call) keeps every key distinct."""
    key = spec_key(0, {"p": 1e-3})
    keys = {site_key(key, "m", StreamKind.CALL, call, tensor) for call in range(3) for tensor in range(300)}
    assert len(keys) == 3 * 300
    weights = site_key(key, "m")
    assert weights not in keys
    with pytest.raises(ValueError, match="takes 2 indices"):
        site_key(key, "m", StreamKind.CALL, 1)


def test_a_module_returning_300_tensors_draws_each_from_its_own_stream():
    class ManyOutputs(torch.nn.Module):
        def forward(self, x):
            return tuple(x + i for i in range(300))

    model = torch.nn.Sequential(ManyOutputs())
    with inject(model, "p=0.05,site=activations,target=all,act_scope=all,fault=zero") as faults:
        first = model(torch.ones(4096))
        second = model(torch.ones(4096))
    patterns = [tuple((t == 0).tolist()) for t in (*first, *second)]
    assert len(set(patterns)) == len(patterns), "two tensors drew the same zero pattern: a shared stream"
    assert faults.report.activations["0"].calls == 2


def test_restoring_stacked_injections_out_of_order_is_refused():
    model = tiny_model()
    clean = _state(model)
    first = inject(model, "p=1e-2,seed=1")
    second = inject(model, "p=1e-2,seed=2")
    with pytest.raises(RuntimeError, match="restore the later injection first"):
        first.restore()
    second.restore()
    first.restore()
    assert _state(model) == clean


def test_golden_fault_map():
    """A fixed spec on a fixed tiny model gives a fixed map: the sampler is this package's own,
    not numpy's (whose binomial algorithm may change). A change here changes every map: bump
    the package version and say so. A moved map names the first parameter whose faults moved."""
    model = tiny_model("llama", seed=0)
    before = _state(model)
    with inject(model, "p=1e-3,seed=7"):  # the embedding expects 129 hit elements: the large-count path
        after = _state(model)
    digest = hashlib.sha256()
    per_param = {}
    for name in sorted(before):
        old = np.frombuffer(before[name], dtype=np.uint32)
        new = np.frombuffer(after[name], dtype=np.uint32)
        where = np.flatnonzero(old != new)
        digest.update(name.encode() + where.tobytes() + new[where].tobytes())
        per_param[name] = hashlib.sha256(where.tobytes() + new[where].tobytes()).hexdigest()[:12]
    expected_large = 128 * 32 * (1 - (1 - 1e-3) ** 32)  # embed_tokens: 4096 elements at q = 3.1%
    assert expected_large > 100
    golden_sites = json.loads((Path(__file__).parent / "golden" / "weight_map_sites.json").read_text())
    moved = first_moved(per_param, golden_sites)
    assert moved is None, f"the faults of {moved} moved"
    assert digest.hexdigest()[:16] == GOLDEN_MAP


GOLDEN_MAP = "500cbbffbac817bc"


def test_float64_is_refused_never_skipped(tiny_llama_dir):
    """The RRAM study shipped a silent no-op: selected tensors that can't be faulted are errors."""
    model = tiny_model().to(torch.float64)
    with pytest.raises(TypeError, match=r"dtypes torch\.float64, which cannot be faulted"):
        inject(model, "p=1e-3")
    with inject(model, "p=1e-2,site=activations,target=mlp"), pytest.raises(TypeError, match=r"outputs torch\.float64 activations"):
        model(torch.tensor([[1, 2, 3]]))
    from lm_eval_faults.core.spec import FaultSpecError
    from lm_eval_faults.harness.model import FaultyHFLM

    with pytest.raises(FaultSpecError, match=r"runs in torch\.float64, which cannot be faulted"):
        FaultyHFLM(pretrained=str(tiny_llama_dir), dtype="float64", p=1e-2, site="activations")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:torch.quantize_per_tensor:UserWarning")
def test_packed_quantized_weights_are_refused_by_name():
    quantization = pytest.importorskip("torch.ao.quantization", reason="this torch has no eager dynamic quantization to build the model")
    quantize_dynamic = quantization.quantize_dynamic
    model = quantize_dynamic(tiny_model(), {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(TypeError, match=r"hold packed quantized weights.*model\.layers\.0\."):
        inject(model, "p=1e-3,target=all")
    with inject(model, "p=1e-3,target=embedding") as faults:  # what can be faulted still can
        assert faults.report.totals()["hit_elements"] > 0
