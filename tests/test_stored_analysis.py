"""`analyze` under `storage=`: the expected damage per stored field, checked against every single
fault decoded one at a time, and against injection itself."""

from __future__ import annotations

import math

import pytest
import torch
from lm_eval_faults import inject
from lm_eval_faults.core.analysis.exact import analyze
from lm_eval_faults.core.analysis.stored import StoredAnalysis
from lm_eval_faults.core.protection.schemes import protected_positions
from lm_eval_faults.core.sites.targets import select_params
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError
from lm_eval_faults.core.storage.codecs import Encoding, codec_names
from lm_eval_faults.core.storage.layouts import BitLayout, resolve_bits
from torch import nn


def _one_linear(rows: int, columns: int, std: float = 0.02) -> nn.Module:
    """One weight, rows of 256 so that every codec's blocks (Q4_K's 256 included) divide it, with
    a few large weights placed so that some block's float16 scale (q4_1, int8) or shared exponent
    (mxfp4) is one flip away from Inf or NaN."""
    torch.manual_seed(0)
    model = nn.Module()
    model.proj = nn.Linear(columns, rows, bias=False)
    with torch.no_grad():
        weight = model.proj.weight
        weight.normal_(0, std)
        weight[0, :4] = torch.tensor([3.0, -2.5, 60.0, 1e-5])
        weight[0, 40] = 5.0  # an mxfp4 block whose E8M0 exponent is 127: one flip from 255 (NaN)
        weight[0, 100] = 20.0  # a q4_1 block whose float16 scale is in [1, 2): one exponent flip from Inf
        weight[1, 7] = 200.0  # an int8 row whose float16 scale is in [1, 2)
    return model


def _groups(storage: str) -> dict[str, int]:
    return {"group_size": 64} if storage == "int4" else {}


def _int(value: int, layout: BitLayout) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64).to(layout.int_view)


def _one_at_a_time(encoding: Encoding, name: str, layout: BitLayout, spec: FaultSpec, limit: float) -> dict[str, float]:
    """Every single fault of field `name`, applied alone to one word and decoded: the expected
    weights changed, NaN, Inf and huge, and log P(no fault making a weight non-finite / bad)."""
    flip0, flip1 = spec.bit_rates() if spec.kind.per_bit else (0.0, 0.0)
    fields = {f: words.view(encoding.blocks, -1) for f, words in encoding.fields.items()}
    clean = encoding.codec.decode(fields).double()
    words = fields[name].view(layout.int_view)
    eligible = [b for b in resolve_bits(layout, spec.bits) if b not in protected_positions(spec, layout)]
    totals = dict.fromkeys(("changed", "nan", "inf", "huge", "log_nonfinite", "log_bad"), 0.0)
    for block in range(words.shape[0]):
        for column in range(words.shape[1]):
            if spec.kind.per_bit:
                held = int(words[block, column]) & 0xFFFFFFFF
                options = [(int(words[block, column]) ^ (1 << bit), flip1 if held >> bit & 1 else flip0) for bit in eligible]
            else:
                options = [(0, spec.p)]
            for value, rate in options:
                changed = words.clone()
                changed[block, column] = _int(value, layout)
                new = encoding.codec.decode({**fields, name: changed.view(fields[name].dtype)}).double()[block]
                old = clean[block]
                nan, inf = new.isnan() & old.isfinite(), new.isinf() & old.isfinite()
                huge = new.isfinite() & ((new - old).abs() > limit)
                totals["changed"] += rate * float(((new != old) & ~(new.isnan() & old.isnan())).sum())
                totals["nan"] += rate * float(nan.sum())
                totals["inf"] += rate * float(inf.sum())
                totals["huge"] += rate * float(huge.sum())
                if bool((nan | inf).any()):
                    totals["log_nonfinite"] += math.log1p(-rate)
                if bool((nan | inf | huge).any()):
                    totals["log_bad"] += math.log1p(-rate)
    return totals


SPECS = {
    "bitflip": dict(p=1e-4),
    "stuck1": dict(p=1e-4, fault="stuck1"),
    "zero": dict(p=1e-4, fault="zero"),
}


@pytest.mark.parametrize("storage", codec_names())
@pytest.mark.parametrize("kind", SPECS)
def test_the_expectation_per_field_is_the_sum_of_every_single_fault_decoded_alone(storage, kind):
    """The analysis flips a bit in all of a field's words at once (per word position of the block
    for a coupled field, Q4_K's packed sub-scales); decoding each single fault on its own must give
    the same expected counts, and the same events for "at least one"."""
    model = _one_linear(2, 256)
    spec = FaultSpec(storage=storage, **SPECS[kind], **_groups(storage))
    analysis = analyze(model, spec)
    assert isinstance(analysis, StoredAnalysis)
    sites = {site.field_name: site for site in select_params(model, spec)}
    assert {s.field for s in analysis.sites} == set(sites)
    for row in analysis.sites:
        site = sites[row.field]
        assert site.encoding is not None
        rms = float(site.encoding.original.double().pow(2).mean().sqrt())
        expected = _one_at_a_time(site.encoding, row.field, site.layout, spec, analysis.change_threshold * rms)
        e = row.expectation
        got = dict(changed=e.weights_changed, nan=e.nan, inf=e.inf, huge=e.huge, log_nonfinite=e.log_no_nonfinite, log_bad=e.log_no_bad)
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-15), (storage, row.field)
    assert analysis.total().weights_changed > 0


def test_scale_and_exponent_flips_are_where_non_finite_weights_come_from():
    """fp16 scales and the E8M0 shared exponent can make a whole block Inf or NaN; the codes of
    int4 cannot (a code is bounded by its block's range)."""
    model = _one_linear(2, 256)
    for storage, field in (("q4_1", "scales"), ("mxfp4", "exponents"), ("int8", "scales")):
        by_field = analyze(model, FaultSpec(storage=storage, p=1e-4)).grouped("field")
        assert by_field[field].nan + by_field[field].inf > 0, storage
        assert by_field["codes"].nan + by_field["codes"].inf == 0, storage


@pytest.mark.parametrize("storage", ["q4_1", "int4", "fp8_e5m2"])
def test_monte_carlo_injections_agree_with_the_analysis(storage):
    """Injection's own report (weights moved, weights made non-finite), averaged over seeds, lies
    within 5 standard errors of the analysis, plus its stated second-order bound."""
    model = _one_linear(64, 2048, std=0.05)
    spec = FaultSpec(storage=storage, p=2e-4, **_groups(storage))
    analysis = analyze(model, spec)
    moved, nonfinite = [], []
    for seed in range(24):
        faults = inject(model, storage=storage, p=2e-4, seed=seed, **_groups(storage))
        (row,) = faults.report.to_dict()["weights"]["storage"].values()
        moved.append(row["weights_affected"])
        nonfinite.append(row["nonfinite_created"])
        faults.restore()
    total = analysis.total()
    for samples, expected in ((moved, total.weights_changed), (nonfinite, total.nan + total.inf)):
        mean = sum(samples) / len(samples)
        spread = math.sqrt(sum((x - mean) ** 2 for x in samples) / (len(samples) - 1) / len(samples))
        assert abs(mean - expected) <= 5 * max(spread, 1.0 / len(samples)) + analysis.second_order_bound * expected, (
            storage,
            mean,
            expected,
        )
    assert total.weights_changed > 10


def test_protection_of_fields_and_bits_is_counted():
    model = _one_linear(2, 256)
    plain = analyze(model, FaultSpec(storage="q4_1", p=1e-4)).grouped("field")
    backed = analyze(model, FaultSpec(storage="q4_1", p=1e-4, protect_fields=("scales", "mins"))).grouped("field")
    assert backed["scales"].weights_changed == backed["mins"].weights_changed == backed["scales"].eligible_bits == 0
    assert backed["codes"] == plain["codes"]
    # protect_bits= names bits every selected field has: here the float16 scales' and mins' exponents
    top = analyze(model, FaultSpec(storage="q4_1", p=1e-4, fields=("scales", "mins"), protect_bits="exponent")).grouped("field")
    assert set(top) == {"scales", "mins"}
    assert top["scales"].nan + top["scales"].inf == 0 < plain["scales"].nan + plain["scales"].inf
    assert top["scales"].eligible_bits == plain["scales"].eligible_bits * 11 // 16  # sign and mantissa are left


@pytest.mark.parametrize("model_args", ["fault=value", "ecc=secded", "clamp=weights"])
def test_what_is_not_a_sum_of_single_stored_faults_is_refused_by_name(model_args):
    key = model_args.partition("=")[0]
    with pytest.raises(FaultSpecError, match=key):
        analyze(_one_linear(2, 256), f"storage=int8,p=1e-4,{model_args}")


def test_cli_analyze_prints_the_per_field_table_of_the_demo_model(capsys, tmp_path):
    from lm_eval_faults.cli import main

    out = tmp_path / "analysis.json"
    assert main(["analyze", "--model_args", "storage=int4,group_size=32,p=1e-6,target=mlp", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stored as int4" in printed and "scales" in printed and "zeros" in printed and "codes" in printed
    import json

    data = json.loads(out.read_text())
    assert set(data["by_field"]) == {"codes", "scales", "zeros"} and {s["component"] for s in data["sites"]} == {"mlp"}
    assert main(["analyze", "--model_args", "storage=int4,p=1e-6", "--protections", "ecc=secded"]) == 2
    assert "--protections" in capsys.readouterr().err


def test_at_a_rate_where_first_order_fails_the_analysis_says_so_and_stays_finite():
    """At p=1 every bit flips: the first-order counts exceed the weights, so a note says they are
    not expectations, and the probabilities are 1, not NaN (0 events x log(0) counts as none)."""
    analysis = analyze(_one_linear(2, 256), "storage=q4_1,p=1")
    assert isinstance(analysis, StoredAnalysis)
    assert any("too high" in note for note in analysis.notes())
    total = analysis.total()
    assert total.p_any_bad == 1.0 and not math.isnan(total.p_any_nonfinite)
    assert not any("too high" in note for note in analyze(_one_linear(2, 256), "storage=q4_1,p=1e-4").notes())
