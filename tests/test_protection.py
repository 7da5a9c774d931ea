"""Protection schemes: SECDED on crafted words, protected fields, clamping, overheads, composition, p=0."""

from __future__ import annotations

import math
import warnings
from itertools import combinations

import lm_eval
import numpy as np
import pytest
import torch
from lm_eval_faults import inject
from lm_eval_faults.core.analysis.protected import expected_nonfinite
from lm_eval_faults.core.faults.host import FaultBatch
from lm_eval_faults.core.protection import ecc
from lm_eval_faults.core.protection.clamping import MissingBoundsError, record_bounds
from lm_eval_faults.core.protection.schemes import WeightProtection
from lm_eval_faults.core.random.streams import spec_key
from lm_eval_faults.core.sampling.host import Hits
from lm_eval_faults.core.sites.targets import ParamSite
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError, to_spec
from lm_eval_faults.core.storage.layouts import layout_of, resolve_bits
from lm_eval_faults.core.storage.words import WordAccess

from tiny import tiny_model

# -- SECDED(72,64) on crafted error patterns ------------------------------------------------------


def _patterns(weight: int) -> tuple[np.ndarray, np.ndarray]:
    """Every error pattern of `weight` bits over the 72-bit codeword, as (data, check) errors."""
    data, check = [], []
    for bits in combinations(range(72), weight):
        data.append(sum(1 << b for b in bits if b < 64))
        check.append(sum(1 << (b - 64) for b in bits if b >= 64))
    return np.array(data, dtype=np.uint64).astype(np.int64), np.array(check, dtype=np.int64)


def test_secded_corrects_one_error_detects_two_and_never_misses_up_to_three():
    residual, detected = ecc.decode(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
    assert residual[0] == 0 and not detected[0]  # no error
    residual, detected = ecc.decode(*_patterns(1))
    assert not detected.any() and (residual == 0).all()  # every single error, data or check bit, corrected
    residual, detected = ecc.decode(*_patterns(2))
    assert detected.all()  # every double error detected
    data, check = _patterns(3)
    residual, detected = ecc.decode(data, check)
    syndrome = ecc.data_syndrome(data) ^ check
    assert (syndrome != 0).all()  # distance 4: no pattern of 1-3 errors is invisible
    # Triple errors: odd syndromes, so each is either detected or miscorrected, exactly as the
    # syndrome says, and a miscorrection leaves a wrong data word (never a silent success).
    in_columns = np.isin(syndrome, np.concatenate([ecc.DATA_COLUMNS, ecc.CHECK_COLUMNS]))
    assert (detected == ~in_columns).all()
    fixed_data = np.isin(syndrome, ecc.DATA_COLUMNS)
    assert (residual[~detected] != 0).all()
    assert np.all(np.bitwise_count(residual[fixed_data].astype(np.uint64)) == np.bitwise_count(data[fixed_data].astype(np.uint64)) + 1)
    assert 0 < (~detected).sum() < len(data)


def test_hsiao_columns_are_distinct_and_odd():
    columns = np.concatenate([ecc.DATA_COLUMNS, ecc.CHECK_COLUMNS])
    assert len(set(columns.tolist())) == 72
    assert all(bin(int(c)).count("1") % 2 == 1 for c in columns)


def _one_param_site(values: torch.Tensor) -> ParamSite:
    return ParamSite(("w",), torch.nn.Parameter(values.clone(), requires_grad=False), "mlp", 0)


def _protect(spec: FaultSpec, site: ParamSite, positions: list[int], masks: list[int]):
    """Apply `spec`'s protection to hand-made flips (the check bits are faulted at p=0 here)."""
    layout = layout_of(site.param.dtype)
    access = WordAccess(site.param, layout)
    pos = np.array(positions, dtype=np.int64)
    old = access.read(pos)
    mask = np.array(masks, dtype=np.int64)
    batch = FaultBatch(Hits(np.zeros(len(pos), dtype=np.int64), pos, np.arange(len(pos))), mask, old, old ^ mask)
    protected = WeightProtection(spec, spec_key(0, spec.sampling_key())).apply(batch, [site], layout, lambda _: access)
    return protected, access


@pytest.mark.parametrize("policy", ["zero", "keep"])
def test_secded_on_crafted_float32_words(policy):
    site = _one_param_site(torch.arange(1.0, 9.0))  # 8 float32 values: 4 SECDED words of 2 elements
    spec = FaultSpec(fault="stuck0", ecc="secded", ecc_policy=policy)  # p=0: no check-bit faults
    # word 0: one flip (corrected); word 1: two flips in two elements (detected);
    # word 2: three flips in one element (miscorrected or detected, as the syndrome says); word 3: clean.
    protected, access = _protect(spec, site, [0, 2, 3, 4], [1 << 30, 1 << 5, 1 << 7, 0b111 << 10])
    counts = {name: int(column[0]) for name, column in protected.counts.items()}
    triple = np.array([0b111 << 10], dtype=np.int64)
    _, triple_detected = ecc.decode(triple, np.zeros(1, dtype=np.int64))
    assert counts["corrected"] == 1 and counts["detected"] == 1 + int(triple_detected[0])
    assert counts["miscorrected"] == 1 - int(triple_detected[0])
    changed = dict(zip(protected.batch.hits.position.tolist(), protected.batch.new.tolist(), strict=True))
    assert 0 not in changed and 1 not in changed  # the single error was corrected
    if policy == "zero":
        assert changed[2] == 0 and changed[3] == 0  # the detected word reads as zeros
    else:
        assert changed[2] == access.read(np.array([2]))[0] ^ (1 << 5)
    assert not set(changed) & {6, 7}  # the clean word is untouched


def test_parity_detects_odd_and_misses_even_errors():
    site = _one_param_site(torch.ones(4))
    protected, _ = _protect(FaultSpec(fault="stuck0", ecc="parity"), site, [0, 1], [1 << 3, 0b11 << 3])
    assert int(protected.counts["detected"][0]) == 1 and int(protected.counts["undetected"][0]) == 1
    changed = dict(zip(protected.batch.hits.position.tolist(), protected.batch.new.tolist(), strict=True))
    assert changed[0] == 0  # detected: zeroed
    assert changed[1] == (torch.ones(1).view(torch.int32).item() ^ (0b11 << 3))


# -- schemes on whole models -----------------------------------------------------------------------


def _words(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().view(-1).view(torch.int32).clone() for name, p in model.named_parameters()}


def test_protected_fields_never_change_and_the_drawn_faults_are_the_same():
    model = tiny_model()
    clean = _words(model)
    exponent = sum(1 << b for b in resolve_bits(layout_of(torch.float32), "sign+exponent"))
    with inject(model, "p=1e-2,seed=3") as bare:
        unprotected = {name: words ^ clean[name] for name, words in _words(model).items()}
    with inject(model, "p=1e-2,seed=3,protect_bits=sign+exponent") as guarded:
        protected = {name: words ^ clean[name] for name, words in _words(model).items()}
    assert guarded.report.totals()["hit_elements"] == bare.report.totals()["hit_elements"] > 1000
    for name in clean:
        assert not (protected[name] & exponent).any()
        assert torch.equal(protected[name], unprotected[name] & ~exponent)  # the same faults, minus the protected bits
    assert guarded.report.totals()["masked_bits"] == sum(
        int(np.bitwise_count((d.long() & exponent).numpy()).sum()) for d in unprotected.values()
    )


def test_backed_up_components_stay_clean_and_cost_their_bits():
    model = tiny_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with inject(model, "p=1e-2,protect=norm+lm_head") as faults:
        for name, param in model.named_parameters():
            if "norm" in name or "lm_head" in name:
                assert torch.equal(param, before[name]), name
        by_component = faults.report.to_dict()["protection"]["by_component"]
        assert by_component["norm"]["overhead"] == 1.0 and by_component["attention"]["overhead"] == 0.0
        assert faults.report.by_component()["attention"]["changed_elements"] > 0


@pytest.mark.parametrize(
    ("args", "dtype", "overhead"),
    [
        ("ecc=secded", torch.float32, 8 / 64),
        ("ecc=secded", torch.bfloat16, 8 / 64),
        ("ecc=parity", torch.float32, 1 / 32),
        ("ecc=parity", torch.bfloat16, 1 / 16),
        ("protect_bits=exponent_msb", torch.float32, 1 / 32),
        ("protect_bits=exponent", torch.float16, 5 / 16),
        ("protect_bits=sign+exponent", torch.bfloat16, 9 / 16),
    ],
)
def test_overhead_figures(args, dtype, overhead):
    model = tiny_model(dtype=dtype, hidden_size=64)  # every tensor a whole number of 64-bit words
    with inject(model, f"p=1e-6,{args}") as faults:
        assert faults.report.protection_summary()["overhead"] == pytest.approx(overhead)


def test_range_restriction_keeps_every_weight_in_its_clean_range():
    model = tiny_model()
    bounds = {name: (p.min().item(), p.max().item()) for name, p in model.named_parameters()}
    with inject(model, "p=3e-2,clamp=weights") as faults:
        for name, param in model.named_parameters():
            assert torch.isfinite(param).all() and bounds[name][0] <= param.min().item() <= param.max().item() <= bounds[name][1]
        assert faults.report.totals()["clamped"] > 0 and faults.report.totals()["nonfinite_created"] == 0


def test_activation_clamp_needs_bounds_and_keeps_outputs_inside_them():
    model = tiny_model()
    inputs = torch.randint(0, 100, (2, 12))
    with pytest.raises(MissingBoundsError):
        inject(model, "p=1e-2,site=activations,clamp=activations")
    with record_bounds(model) as bounds:
        model(inputs)
    outputs: dict[str, torch.Tensor] = {}
    with inject(model, "p=1e-2,site=activations,clamp=activations", activation_bounds=bounds) as faults:
        handles = [
            module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
            for name, module in model.named_modules()
            if name in bounds.bounds
        ]
        model(inputs)
        for handle in handles:
            handle.remove()
        assert sum(faults.report.activation_clamps.values()) > 0
    for name, output in outputs.items():
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            low, high = bounds.bounds[name]
            assert torch.isfinite(output).all() and output.min() >= low and output.max() <= high, name


def test_composition_with_target_layers_and_bits():
    model = tiny_model()
    clean = _words(model)
    exponent = sum(1 << b for b in resolve_bits(layout_of(torch.float32), "exponent"))
    with inject(model, "p=1e-2,target=attention,layers=1,protect_bits=exponent,ecc=parity") as faults:
        for name, words in _words(model).items():
            diff = words ^ clean[name]
            if "layers.1.self_attn" not in name:
                assert not diff.any(), name
            # a detected element reads as 0.0, which is the only way its exponent may change
            assert not (diff[words != 0] & exponent).any(), name
        assert faults.report.totals()["detected"] > 0
    with pytest.warns(UserWarning, match="protects nothing"):
        inject(model, "p=1e-3,target=attention,protect=norm").restore()
    with pytest.warns(UserWarning, match="protects nothing"):
        inject(model, "p=1e-3,bits=mantissa,protect_bits=exponent").restore()
    assert all(torch.equal(w, clean[n]) for n, w in _words(model).items())


def test_protection_keys_are_checked_before_anything_loads():
    for args, key in [("ecc=hamming", "ecc"), ("protect=bogus", "protect"), ("protect_bits=exp", "protect_bits"), ("clamp=all", "clamp")]:
        with pytest.raises(FaultSpecError, match=f"{key}="):
            to_spec(args)
    with pytest.raises(FaultSpecError, match="replay"):
        to_spec("replay=map.npz,ecc=secded")
    assert "protect" not in to_spec("p=1e-3").to_dict()  # unprotected specs keep their old fingerprints


def test_p0_with_every_scheme_is_bit_identical_to_hf(tiny_llama_dir, task_manager):
    def responses(model: str, args: str) -> list:
        results = lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=["tiny_colors"], device="cpu", task_manager=task_manager, log_samples=True
        )
        return [sample["resps"] for sample in results["samples"]["tiny_colors"]]

    base = f"pretrained={tiny_llama_dir},dtype=float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schemes = "protect=norm,protect_bits=exponent,ecc=secded,clamp=weights+activations"
        assert responses("faulty_hf", f"{base},p=0,{schemes}") == responses("hf", base)


def test_faulty_hf_calibrates_activation_bounds_once_and_caches_them(tiny_llama_dir, task_manager, tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_FAULTS_CACHE", str(tmp_path))
    args = f"pretrained={tiny_llama_dir},dtype=float32,p=1e-2,site=activations,clamp=activations"

    def run() -> dict:
        results = lm_eval.simple_evaluate(
            model="faulty_hf", model_args=args, tasks=["tiny_colors"], device="cpu", task_manager=task_manager
        )
        return results["config"]["fault_injection"]

    first = run()
    cached = list((tmp_path / "activation_bounds").glob("*.json"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second = run()
    assert cached[0].stat().st_mtime_ns == stamp  # read, not recalibrated
    assert first["protection"]["activations_clamped"] == second["protection"]["activations_clamped"] > 0
    assert first["activations"]["totals"]["hit_elements"] == second["activations"]["totals"]["hit_elements"] > 0


# -- the analytic companion ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheme", ["", ",bits=exponent", ",protect_bits=exponent_msb", ",ecc=parity", ",ecc=secded", ",ecc=secded,ecc_policy=keep"]
)
def test_expected_nonfinite_under_each_scheme_matches_injected_counts(scheme):
    """Weights near float32's top (exponents with one or two zero bits) make NaN/Inf common enough
    to count; the mean over 40 seeds must sit within 4 standard errors of the exact expectation."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    values = torch.tensor([1.5e38, 3e38, -2e38, 1e38, 4e37, -1.2e38, 0.02])
    for name, param in model.named_parameters():
        if "mlp" in name:
            param.data = values[torch.randint(0, len(values), param.shape, generator=generator)]
    spec = f"p=2e-3,target=mlp{scheme}"
    expected = expected_nonfinite(model, spec)
    counts = []
    for seed in range(40):
        with inject(model, f"{spec},seed={seed}") as faults:
            counts.append(faults.report.totals()["nonfinite_created"])
    standard_error = max(np.std(counts), math.sqrt(max(expected.total, 0.25))) / math.sqrt(len(counts))
    assert abs(np.mean(counts) - expected.total) <= 4 * standard_error + expected.remainder, (np.mean(counts), expected.total)


def test_expected_nonfinite_is_zero_where_nothing_can_get_through():
    model = tiny_model()
    assert expected_nonfinite(model, "p=1e-2,clamp=weights").total == 0
    assert expected_nonfinite(model, "p=1e-2,protect=all").total == 0
    assert expected_nonfinite(model, "p=1e-2,protect_bits=exponent").total == 0
    with pytest.raises(ValueError, match="symmetric bit flips"):
        expected_nonfinite(model, "p=1e-2,fault=stuck1")


def test_a_tied_tensor_is_backed_up_when_either_of_its_components_is():
    model = tiny_model(tie_word_embeddings=True)
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    for component in ("embedding", "lm_head"):
        with inject(model, f"p=1e-2,protect={component}") as faults:
            assert torch.equal(embedding, before)
            assert faults.report.to_dict()["protection"]["by_component"]["embedding+lm_head"]["overhead"] == 1.0


def test_weight_schemes_on_activation_faults_are_called_out():
    model = tiny_model()
    for site in ("activations", "weights+activations"):
        with pytest.warns(UserWarning, match="protect stored weights"):
            inject(model, f"p=1e-4,site={site},protect_bits=exponent_msb").restore()


def test_analyze_compares_schemes_and_its_unprotected_row_is_todays_analysis():
    from lm_eval_faults.cli.analyze import protection_table
    from lm_eval_faults.core.analysis.exact import analyze

    model = tiny_model()
    table = protection_table(model, {"p": "1e-3"}, ["none", "ecc=secded", "clamp=weights"])
    rows = {line.split()[0]: float(line.split()[1]) for line in table.splitlines()[2:]}
    total = analyze(model, "p=1e-3").total().to_dict()
    assert rows["none"] == pytest.approx(total["nan"] + total["inf"], rel=1e-3)  # the table prints 4 digits
    assert rows["clamp=weights"] == 0 and 0 < rows["ecc=secded"] < rows["none"]
