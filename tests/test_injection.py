"""inject(model, spec): isolation, exact restore, families, dtypes, tied weights, activations."""

import gc
import math
import subprocess
import sys

import pytest
import torch
from lm_eval_faults import FaultSpec, inject
from lm_eval_faults.core.report import FaultReport
from lm_eval_faults.core.sites.targets import select_params
from torch import nn

from tiny import FAMILIES, tiny_model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed_tensors(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = model.state_dict()
    return {
        name
        for name in before
        if not torch.equal(before[name].view(torch.uint8) if before[name].dtype == torch.bool else before[name], after[name])
    }


def bits_equal(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    after = model.state_dict()
    return all(
        torch.equal(before[n].flatten().view(torch.uint8), after[n].flatten().view(torch.uint8))
        for n in before
        if before[n].is_floating_point()
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_the_target_changes_in_every_family(family):
    model = tiny_model(family)
    before = snapshot(model)
    expected = {name for site in select_params(model, FaultSpec(target="attention", layers="1-2")) for name in site.names}
    assert expected and all(".1." in name or ".2." in name for name in expected)
    with inject(model, p=0.02, target="attention", layers="1-2") as faults:
        assert changed_tensors(before, model) == expected
        assert faults.report.totals()["changed_elements"] > 0
    assert bits_equal(before, model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_component_resolves_in_every_family(family):
    model = tiny_model(family)
    for component in ("embedding", "attention", "mlp", "norm", "lm_head"):
        sites = select_params(model, FaultSpec(target=component))
        assert sites, f"{family}: no {component}"
        assert all(component in site.component.split("+") for site in sites)


def test_restore_is_bit_exact_after_many_cycles():
    model = tiny_model("llama", torch.bfloat16)
    before = snapshot(model)
    specs = [
        FaultSpec(p=0.05, seed=s, fault=f, site="weights", target=t)
        for s, (f, t) in enumerate(
            [("bitflip", "all"), ("stuck1", "mlp"), ("value", "attention"), ("zero", "norm"), ("stuck0", "embedding")] * 10
        )
    ]
    for spec in specs:
        faults = inject(model, spec)
        assert faults.report.totals()["hit_elements"] > 0
        faults.restore()
    assert bits_equal(before, model)


def test_narrowing_the_target_does_not_change_the_faults_on_what_remains():
    wide, narrow = tiny_model("llama"), tiny_model("llama")
    inject(wide, p=0.01, seed=7)
    inject(narrow, p=0.01, seed=7, target="mlp", layers="2")
    name = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(wide.state_dict()[name].view(torch.int32), narrow.state_dict()[name].view(torch.int32))


def test_counts_match_p_times_bits():
    model = tiny_model("llama", hidden_size=128, intermediate_size=512)
    totals = inject(model, p=1e-3).report.totals()
    n_bits, p = totals["eligible_bits"], 1e-3
    assert abs(totals["flipped_bits"] - n_bits * p) <= 5 * math.sqrt(n_bits * p)
    assert abs(totals["expected_bits"] - n_bits * p) < 1e-6 * n_bits


@pytest.mark.parametrize("dtype, width", [(torch.float32, 32), (torch.float16, 16), (torch.bfloat16, 16)])
def test_dtypes_and_bit_histogram(dtype, width):
    model = tiny_model("llama", dtype)
    report = inject(model, p=0.02, bits="exponent").report
    histogram = report.bit_histogram()[str(dtype).removeprefix("torch.")]
    exponent = {torch.float32: range(23, 31), torch.float16: range(10, 15), torch.bfloat16: range(7, 15)}[dtype]
    assert len(histogram) == width
    assert all((count > 0) == (bit in exponent) for bit, count in enumerate(histogram))


def test_int8_weights_can_be_faulted_and_unsupported_dtypes_are_named():
    layer = nn.Linear(64, 64)
    layer.weight = nn.Parameter(torch.randint(-128, 127, (64, 64), dtype=torch.int8), requires_grad=False)
    layer.bias = None
    before = layer.weight.clone()
    with inject(layer, p=0.01, target="other") as faults:
        assert faults.report.totals()["flipped_bits"] > 0 and not torch.equal(before, layer.weight)
    assert torch.equal(before, layer.weight)
    with pytest.raises(TypeError, match="float32, float16, bfloat16, int8"):
        inject(nn.Linear(4, 4).double(), p=0.1, target="other")


def test_tied_weights_are_faulted_once_and_reported_shared():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    report = inject(model, p=1e-2, target="lm_head").report
    (site,) = report.weights
    assert site.component == "embedding+lm_head" and site.shared_with == ["lm_head.weight"]
    assert report.to_dict()["weights"]["shared_tensors"] == {"transformer.wte.weight": ["lm_head.weight"]}


def test_a_selector_that_matches_nothing_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="layers 0-3"):
        inject(model, p=1e-3, layers=40)
    with pytest.raises(ValueError, match="select no parameters"):
        inject(model, p=0.0, modules="no_such_module")


def test_unknown_architectures_fall_back_with_a_warning(caplog):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.ffn = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.blocks = nn.ModuleList(Block() for _ in range(3))

    with caplog.at_level("WARNING"):
        sites = select_params(Custom(), FaultSpec(target="attention", layers="1"))
    assert [s.name for s in sites] == ["blocks.1.attn.weight", "blocks.1.attn.bias"]
    assert "not in the tested list" in caplog.text


def test_silent_no_op_is_loud():
    with pytest.warns(UserWarning, match="NO FAULTS"):
        inject(tiny_model("llama"), p=1e-12)
    report = FaultReport(spec={})
    from lm_eval_faults.core.report import SiteStats

    report.weights = [SiteStats("w", "mlp", 0, "float32", 10**6, 32 * 10**6, expected_elements=50.0, expected_bits=50.0)]
    with pytest.raises(RuntimeError, match="this is a bug"):
        report.check_not_silent("weights")


def test_activation_faults_are_fresh_per_call_and_reproducible():
    model = tiny_model("llama")
    tokens = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        clean = model(tokens).logits
        with inject(model, p=1e-3, site="activations", seed=1) as faults:
            first, second = model(tokens).logits, model(tokens).logits
            assert faults.report.totals("activations")["hit_elements"] > 0
        with inject(model, p=1e-3, site="activations", seed=1):
            again = model(tokens).logits
        same_bits = lambda a, b: torch.equal(a.view(torch.int32), b.view(torch.int32))  # noqa: E731 (NaN != NaN)
        assert not same_bits(first, second) and same_bits(first, again)
        assert torch.equal(model(tokens).logits, clean)  # hooks gone


def test_activation_faults_in_generation_with_kv_cache_and_tuple_outputs():
    model = tiny_model("gpt2")
    tokens = torch.randint(0, 100, (1, 5))
    with inject(model, p=1e-4, site="activations", act_scope="all") as faults:
        out = model.generate(tokens, max_new_tokens=6, do_sample=False, pad_token_id=0)
        calls = faults.report.to_dict()["activations"]["totals"]["calls"]
    assert out.shape == (1, 11) and calls > 6 * 4


def test_activation_hooks_never_corrupt_their_inputs():
    identity = nn.Sequential(nn.Identity())
    x = torch.ones(1000)
    with inject(identity, p=0.1, site="activations", target="other"):
        y = identity(x)
    assert torch.equal(x, torch.ones(1000)) and not torch.equal(y, x)


def test_activation_memory_stays_flat_over_many_calls():
    """The hooks keep counters only: no tensor or Python object survives a forward call."""
    model = tiny_model("llama")
    tokens = torch.randint(0, 100, (1, 8))

    def live_objects() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        return len(objects), sum(1 for o in objects if type(o) in (torch.Tensor, torch.nn.Parameter))

    with torch.no_grad(), inject(model, p=1e-3, site="activations") as faults:
        for _ in range(20):
            model(tokens)
        objects_before, tensors_before = live_objects()
        for _ in range(300):
            model(tokens)
        objects_after, tensors_after = live_objects()
        assert faults.report.totals("activations")["hit_elements"] > 300
    assert tensors_after == tensors_before
    assert objects_after - objects_before < 50, f"{objects_after - objects_before} objects leaked over 300 calls"


def test_nan_and_inf_from_faults_do_not_crash_a_forward():
    model = tiny_model("llama", torch.float16)
    report = inject(model, p=0.05, bits="exponent", site="weights+activations").report
    with torch.no_grad():
        logits = model(torch.randint(0, 100, (1, 6))).logits
    assert report.totals()["nonfinite_created"] > 0 and not torch.isfinite(logits).all()


@pytest.mark.slow
def test_fault_maps_are_identical_in_two_processes():
    code = (
        "import sys; sys.path.insert(0, 'tests'); from tiny import tiny_model; from lm_eval_faults import inject;"
        "m = tiny_model('llama'); inject(m, p=3e-3, seed=11);"
        "import hashlib; print(hashlib.sha256(b''.join(t.numpy().tobytes() for t in m.state_dict().values())).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    model = tiny_model("llama")
    inject(model, p=3e-3, seed=11)
    import hashlib

    here = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    assert other == here


@pytest.mark.parametrize("fields", [{}, {"site": "activations"}, {"storage": "q4_1"}], ids=["weights", "activations", "storage"])
def test_an_injected_model_is_freed_once_its_user_lets_go(fields):
    """No cache of this package keeps a model alive (the module classification's weak-keyed cache
    once held its own keys through its values, so no injected model was ever freed)."""
    import gc
    import weakref

    model = tiny_model()
    with inject(model, p=1e-3, target="mlp", **fields):
        model(torch.zeros(1, 4, dtype=torch.long))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
