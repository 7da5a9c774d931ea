"""The `kv_cache` site: faults on the entries a model writes to its KV cache, keyed per request."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from lm_eval_faults import inject
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError
from lm_eval_faults.harness.row_keying import generation_rows, prompt_tokens, scoring_rows
from transformers import DynamicCache

from tiny import tiny_model

PROMPT_A = [5, 6, 7, 8, 9, 10]
PROMPT_B = [11, 12, 13]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


def left_padded(prompts: list[list[int]], pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def generate_logged(model, spec: str, prompts: list[list[int]], new_tokens: int = 6, **kwargs) -> tuple[torch.Tensor, list, dict]:
    """Greedy generation under `spec`, rows keyed as faulty_hf keys them; the faults written and the report."""
    ids, mask = left_padded(prompts)
    with inject(model, spec) as faults:
        injector = faults.injectors["kv_cache"]
        injector.log = []
        with generation_rows(model, prompt_tokens(ids, mask), faults.next_forward):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=3, **kwargs)
        return out, injector.log, faults.report.to_dict()


def of_request(log: list, prompt: list[int]) -> list:
    from lm_eval_faults.core.random.streams import request_key

    key = request_key(prompt)
    return sorted(entry for entry in log if entry[0] == key)


def test_p0_is_clean_generation(model) -> None:
    ids = torch.tensor([PROMPT_A])
    clean = model.generate(ids, max_new_tokens=6, do_sample=False)
    with inject(model, "p=0,site=kv_cache"):
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), clean)


def test_a_requests_faults_do_not_depend_on_its_batch_padding_or_cache_class(model) -> None:
    spec = "p=2e-3,site=kv_cache,seed=3"
    alone, log_alone, _ = generate_logged(model, spec, [PROMPT_A])
    batched, log_batched, _ = generate_logged(model, spec, [PROMPT_B, PROMPT_A])
    static, log_static, _ = generate_logged(model, spec, [PROMPT_A], cache_implementation="static")
    assert of_request(log_alone, PROMPT_A), "the test needs faults"
    assert torch.equal(batched[1, -alone.shape[1] :], alone[0])
    assert of_request(log_batched, PROMPT_A) == of_request(log_alone, PROMPT_A)
    assert torch.equal(static, alone)
    assert of_request(log_static, PROMPT_A) == of_request(log_alone, PROMPT_A)
    # the padded row's neighbour has faults of its own, at its own positions only
    positions_b = {entry[3] for entry in of_request(log_batched, PROMPT_B)}
    assert positions_b and max(positions_b) < len(PROMPT_B) + 6


def test_retention_strikes_old_entries_more_often(model) -> None:
    _, log, report = generate_logged(model, "p=2e-4,site=kv_cache,kv_fault=retention,seed=1", [PROMPT_A], new_tokens=40)
    _, written, _ = generate_logged(model, "p=2e-4,site=kv_cache,seed=1", [PROMPT_A], new_tokens=40)
    assert set(written) <= set(log), "retention adds faults to the write faults of the same seed"
    retained = [entry[3] for entry in set(log) - set(written)]
    early = sum(1 for position in retained if position < 20)
    late = sum(1 for position in retained if position >= 26)
    assert early > 2 * late > 0
    totals = report["kv_cache"]["totals"]
    assert totals["hit_elements"] == len(log)


def test_faults_match_their_expectation(model) -> None:
    _, log, report = generate_logged(model, "p=1e-3,site=kv_cache,seed=5", [PROMPT_A, PROMPT_B], new_tokens=30)
    totals = report["kv_cache"]["totals"]
    # every entry of 4 layers x 2 heads x 8 dims, written once: 36 + 33 positions, 2 parts
    entries = 4 * 2 * (len(PROMPT_A) + 29 + len(PROMPT_B) + 29)
    assert totals["elements"] == entries * 2 * 8
    expected = totals["elements"] * (1 - (1 - 1e-3) ** 32)
    assert totals["expected_elements"] == pytest.approx(expected, abs=1e-3)  # totals keep 3 decimals
    assert abs(totals["hit_elements"] - expected) < 5 * math.sqrt(expected)
    assert totals["flipped_bits"] == sum(bin(mask).count("1") for *_, mask in log)
    rows = report["kv_cache"]["entries"]
    assert sum(row["written"] for row in rows.values()) == entries
    assert all(row["reads_corrupted"] >= row["corrupted"] for row in rows.values())


def test_layers_and_parts_select_what_is_faulted(model) -> None:
    _, log, report = generate_logged(model, "p=5e-3,site=kv_cache,kv_layers=1+3,kv_part=values,seed=2", [PROMPT_A])
    assert log and {entry[1] for entry in log} <= {1, 3} and {entry[2] for entry in log} == {"values"}
    assert set(report["kv_cache"]["by_component"]) == {"kv_values"}
    assert {name.split(".")[2] for name in report["kv_cache"]["entries"]} == {"1", "3"}


def test_under_scoring_the_site_faults_what_attention_consumes(model) -> None:
    """One forward with a cache, without one, and generation's first step see the same faults."""
    ids = torch.tensor([PROMPT_A])
    rows = scoring_rows([PROMPT_A], [len(PROMPT_A)], len(PROMPT_A))
    spec = "p=3e-3,site=kv_cache,seed=4"
    logits = {}
    for use_cache in (True, False):
        with inject(model, spec) as faults:
            faults.next_forward(rows)
            logits[use_cache] = model(ids, use_cache=use_cache).logits
            assert faults.report.totals("kv_cache")["hit_elements"] > 0
    assert torch.equal(logits[True], logits[False])
    with torch.no_grad():
        clean = model(ids).logits
    assert not torch.equal(clean, logits[True])
    with inject(model, spec) as faults, generation_rows(model, [tuple(PROMPT_A)], faults.next_forward):
        scores = model.generate(ids, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True).logits[0]
    # generate computes the last position's logits alone: the same up to rounding, far from clean
    torch.testing.assert_close(scores[0], logits[True][0, -1], rtol=0, atol=1e-6)
    assert (clean[0, -1] - logits[True][0, -1]).abs().max() > 1e-3


def test_restore_unwraps_caches_that_outlive_the_injection(model) -> None:
    cache = DynamicCache()
    ids = torch.tensor([PROMPT_A])
    with inject(model, "p=0.05,site=kv_cache") as faults:
        model(ids, cache=cache, use_cache=True)
        hits = faults.report.totals("kv_cache")["hit_elements"]
    assert hits > 0 and "update" not in vars(cache)
    keys = cache.layers[0].keys.clone()
    model(torch.tensor([[4]]), cache=cache, use_cache=True)
    assert torch.equal(cache.layers[0].keys[:, :, : keys.shape[2]], keys)


def test_bfloat16_entries_are_faulted_in_their_own_bits() -> None:
    model = tiny_model("llama", dtype=torch.bfloat16)
    _, log, report = generate_logged(model, "p=2e-3,site=kv_cache,bits=15,seed=1", [PROMPT_A])
    assert log and {mask for *_, mask in log} == {1 << 15}
    assert set(report["kv_cache"]["bit_histogram"]) == {"bfloat16"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("site=kv_cache,kv_fault=sometimes", "kv_fault='sometimes' is invalid: choose write"),
        ("site=kv_cache,kv_part=queries", "kv_part='queries' is invalid: choose keys, values or both"),
        ("site=kv_cache,kv_layers=3-1", "kv_layers='3-1' is invalid"),
        ("kv_fault=retention", "kv_fault='retention' is invalid: applies to the KV cache; add site=kv_cache"),
        (
            "site=kv_cache,layers=0",
            "layers='0' is invalid: selects weights and module outputs, not the KV cache; choose its layers with kv_layers=",
        ),
        ("site=kv_cache,target=mlp", "target='mlp' is invalid: selects weights and module outputs, not the KV cache"),
    ],
)
def test_bad_kv_keys_fail_with_one_line(args: str, message: str) -> None:
    from lm_eval_faults.core.spec import to_spec

    with pytest.raises(FaultSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        to_spec(args)


def test_layers_the_model_lacks_are_refused(model) -> None:
    with pytest.raises(FaultSpecError, match=r"kv_layers='7' is invalid: layers 7 are not in this model; its cache layers are 0-3"):
        inject(model, FaultSpec(p=1e-3, site="kv_cache", kv_layers=(7,)))


def test_kv_keys_leave_other_specs_unchanged() -> None:
    assert "kv_fault" not in FaultSpec(p=1e-3).to_dict()
    assert FaultSpec(p=1e-3, site="kv_cache").to_dict()["kv_fault"] == "write"


def test_entries_outside_lm_eval_are_keyed_by_batch_row(model) -> None:
    ids = torch.tensor([PROMPT_A, PROMPT_A])
    with inject(model, "p=3e-3,site=kv_cache,seed=9") as faults:
        faults.injectors["kv_cache"].log = log = []
        model(ids)
    rows = {entry[0] for entry in log}
    assert rows == {0, 1}, "two rows of one batch draw their own faults"
    by_row = [sorted(entry[1:] for entry in log if entry[0] == row) for row in (0, 1)]
    assert by_row[0] != by_row[1]


def test_nan_from_a_cache_fault_does_not_crash_generation(model) -> None:
    spec = "p=0.2,site=kv_cache,bits=exponent,seed=1"
    with contextlib.ExitStack() as stack:
        faults = stack.enter_context(inject(model, spec))
        out = model.generate(torch.tensor([PROMPT_A]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(PROMPT_A) + 3
    assert faults.report.totals("kv_cache")["nonfinite_created"] > 0
    assert np.isfinite(faults.report.totals("kv_cache")["expected_elements"])


def fp8_generate(model, spec: str | None, prompts: list[list[int]], new_tokens: int = 6) -> tuple[torch.Tensor, list, dict]:
    from transformers import QuantizedCache

    ids, mask = left_padded(prompts)
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=3)
    if spec is None:
        return model.generate(ids, past_key_values=QuantizedCache(backend="fp8", config=model.config), **kwargs), [], {}
    with inject(model, spec) as faults, generation_rows(model, prompt_tokens(ids, mask), faults.next_forward):
        faults.injectors["kv_cache"].log = log = []
        out = model.generate(ids, past_key_values=QuantizedCache(backend="fp8", config=model.config), **kwargs)
    return out, log, faults.report.to_dict()


def test_an_fp8_quantized_cache_is_faulted_in_its_stored_codes(model) -> None:
    """transformers' FP8 QuantizedCache (CPU, no extra package): faults hit the 8-bit E4M3 codes it
    stores, keyed as in any cache, and later steps read the corrupted codes."""
    clean, _, _ = fp8_generate(model, None, [PROMPT_A], new_tokens=12)
    zero, _, _ = fp8_generate(model, "p=0,site=kv_cache", [PROMPT_A], new_tokens=12)
    assert torch.equal(clean, zero)
    faulted, log, report = fp8_generate(model, "p=2e-2,site=kv_cache,bits=6,seed=2", [PROMPT_A], new_tokens=12)
    assert log and {mask for *_, mask in log} == {1 << 6}, "the top exponent bit of an E4M3 code"
    assert set(report["kv_cache"]["bit_histogram"]) == {"float8_e4m3fn"}
    assert report["kv_cache"]["totals"]["eligible_bits"] == report["kv_cache"]["totals"]["elements"], "bits=6: one bit per code"
    assert not torch.equal(clean, faulted)
    _, log_batched, _ = fp8_generate(model, "p=2e-2,site=kv_cache,bits=6,seed=2", [PROMPT_B, PROMPT_A], new_tokens=12)
    assert of_request(log_batched, PROMPT_A) == of_request(log, PROMPT_A)
    _, retained, _ = fp8_generate(model, "p=2e-2,site=kv_cache,bits=6,seed=2,kv_fault=retention", [PROMPT_B, PROMPT_A], new_tokens=12)
    assert set(of_request(log_batched, PROMPT_A)) < set(of_request(retained, PROMPT_A)), "retention strikes the stored codes too"


def test_bits_an_fp8_cache_lacks_fail_in_one_line(model) -> None:
    with pytest.raises(FaultSpecError, match=r"model_args bits='10' is invalid: .*\(the KV cache stores float8_e4m3fn\)"):
        fp8_generate(model, "p=1e-2,site=kv_cache,bits=10", [PROMPT_A])


def test_caches_that_requantize_their_history_are_refused(model) -> None:
    from transformers.cache_utils import DynamicLayer

    class QuantoLikeLayer(DynamicLayer):  # quanto's and HQQ's layers: quantized states, no per-entry codes (they need their packages)
        _quantized_keys = None

    cache = DynamicCache()
    cache.layers = [QuantoLikeLayer() for _ in range(4)]
    with inject(model, "p=1e-3,site=kv_cache"), pytest.raises(NotImplementedError, match="re-quantizes its whole history"):
        model(torch.tensor([PROMPT_A]), cache=cache, use_cache=True)


def test_the_key_table_is_entry_keys_row_by_row() -> None:
    from lm_eval_faults.core.random.streams import entry_key_table, entry_keys

    streams = np.array([3, 2**63 + 5, 77], dtype=np.uint64)
    requests, positions = np.array([9, 9, 11], dtype=np.uint64), np.array([0, 1, 0])
    table = entry_key_table(streams, requests, positions)
    assert all(np.array_equal(table[i], entry_keys(int(key), requests, positions)) for i, key in enumerate(streams))
    assert len(set(table.ravel().tolist())) == table.size


def test_paused_writes_are_clean_and_uncounted(model) -> None:
    with inject(model, "p=0.05,site=kv_cache") as faults:
        with faults.paused(), torch.no_grad():
            paused = model(torch.tensor([PROMPT_A])).logits
        assert faults.report.totals("kv_cache")["elements"] == 0
    with torch.no_grad():
        assert torch.equal(paused, model(torch.tensor([PROMPT_A])).logits)
