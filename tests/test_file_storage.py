"""`storage=file`: SmolLM2's GGUF file faulted in its own blocks (Q4_1, Q8_0, F32), with no
re-quantization, and exported as a GGUF file that differs from the source only where faults hit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from lm_eval_faults import attach_gguf_storage, inject
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError
from lm_eval_faults.core.storage.codecs import StorageError, encoding_of
from lm_eval_faults.core.storage.gguf_file import write_gguf

from conftest import SMOLLM_GGUF


def _load(folder, path=SMOLLM_GGUF):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm_file(smollm_dir):
    model = _load(smollm_dir)
    attach_gguf_storage(model, smollm_dir / SMOLLM_GGUF)
    return model


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def test_at_p0_every_weight_decodes_from_the_files_blocks_to_transformers_own_loading_bit_for_bit(smollm_file):
    types, permuted = set(), 0
    for name, weight in smollm_file.named_parameters():
        encoding = encoding_of(weight, "file", 128, name)
        loaded = weight.detach().clone()
        encoding.install()
        try:
            assert torch.equal(weight, loaded), name
        finally:
            encoding.uninstall()
        types.add(encoding.source.qtype.name)
        permuted += encoding.element_positions is not None
    assert types == {"Q4_1", "Q8_0", "F32"}
    assert permuted == 2 * smollm_file.config.num_hidden_layers  # Q and K of every layer, as transformers un-permutes them


def test_file_faults_hit_each_tensors_own_fields_at_p_per_stored_bit(smollm_file):
    clean = {name: p.detach().clone() for name, p in smollm_file.named_parameters()}
    p = 1e-5
    with inject(smollm_file, p=p, storage="file", seed=3) as faults:
        sites = faults.report.weights
        fields = {site.name.rpartition(".")[2] for site in sites}
        assert fields == {"scales", "mins", "codes", "values"}
        bits = sum(site.eligible_bits for site in sites)
        hit = sum(site.fault_bits for site in sites)
        assert abs(hit - p * bits) < 5 * math.sqrt(p * bits)
        stored = sum(row["stored_bits"] for row in faults.report.to_dict()["weights"]["storage"].values())
        assert bits == stored  # every stored bit of the file's tensors is eligible
        tied = [site for site in sites if site.shared_with]
        assert [site.shared_with for site in tied] == [
            ["lm_head.weight.scales"],
            ["lm_head.weight.codes"],
        ]  # the embedding and lm_head: one tensor, faulted once
    assert all(torch.equal(p_, clean[name]) for name, p_ in smollm_file.named_parameters())


def test_an_export_is_the_source_except_the_faulted_words_and_decodes_to_what_the_model_computed_with(smollm_file, smollm_dir, tmp_path):
    source = smollm_dir / SMOLLM_GGUF
    out = tmp_path / "faulted.gguf"
    with inject(smollm_file, p=3e-6, storage="file", seed=9, target="attention+mlp", layers="0-3") as faults:
        computed = {name: p.detach().clone() for name, p in smollm_file.named_parameters()}
        encodings = {id(site.encoding): site.encoding for site in faults.injectors["weights"].sites}.values()
        changed = write_gguf(source, encodings, out)
        words = sum(site.changed_elements for site in faults.report.weights)
    assert 0 < sum(changed.values()) <= 2 * words  # a changed word is at most 2 bytes here
    old, new = np.fromfile(source, np.uint8), np.fromfile(out, np.uint8)
    assert len(old) == len(new)
    differ = np.flatnonzero(old != new)
    spans = [(int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in GGUFReader(source).tensors]
    inside = {name for start, end, name in spans if ((differ >= start) & (differ < end)).any()}
    assert inside == set(changed) and all(name.startswith(("blk.0.", "blk.1.", "blk.2.", "blk.3.")) for name in inside)
    assert sum(((differ >= start) & (differ < end)).sum() for start, end, _ in spans) == len(differ)  # metadata untouched
    reread = _load(out.parent, out.name)  # another reader of the exported file: transformers' own GGUF loading
    assert all(_same(p_, computed[name]) for name, p_ in reread.named_parameters())
    assert any(not _same(p_, smollm_file.get_parameter(name)) for name, p_ in reread.named_parameters())


def test_storage_file_is_refused_without_a_gguf_file_before_loading():
    from lm_eval_faults.harness.model import FaultyHFLM

    with pytest.raises(FaultSpecError, match="storage=file needs gguf_file="):
        FaultyHFLM(storage="file", p=1e-5, device="cpu")


def test_a_weight_without_a_stored_form_from_a_file_is_refused_by_name():
    from tiny import tiny_model

    with pytest.raises(StorageError, match="has no stored form from a file"):
        inject(tiny_model(), p=1e-3, storage="file", target="mlp")


def test_a_safetensors_export_reloads_to_the_faulted_weights(tmp_path):
    from lm_eval_faults.cli import main
    from lm_eval_faults.harness.loading import load_model
    from transformers import AutoModelForCausalLM

    out = tmp_path / "faulted"
    assert main(["export", "--model_args", "p=1e-3,target=mlp,seed=4", "--out", str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    model = load_model({})
    with inject(model, p=1e-3, target="mlp", seed=4):
        expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    changed = [name for name, p in model.named_parameters() if not _same(p, expected[name])]
    assert changed and all(".mlp." in name for name in changed)
    assert all(_same(p, expected[name]) for name, p in reloaded.named_parameters())
    assert (out / "tokenizer_config.json").is_file()
    assert main(["export", "--model_args", "p=1e-3", "--out", str(out)]) == 2  # not an empty folder: refused, nothing written


def test_a_sweeps_storage_file_points_are_checked_against_the_files_blocks(smollm_dir):
    """A sweep loads the model once, clean and in float, then checks what each point selects: a
    storage=file point selects the file's blocks (Q4_1 codes, scales, mins), so they are attached
    for the check rather than the float weights being refused as having no stored form."""
    from lm_eval_faults.harness.model import FaultyHFLM
    from lm_eval_faults.study.grid import SweepConfigError, SweepPoint, check_selections

    lm = FaultyHFLM(pretrained=str(smollm_dir), gguf_file=SMOLLM_GGUF, dtype="float32", device="cpu")
    file_points = [SweepPoint("p0", FaultSpec(storage="file", p=1e-6, target=("attention",)))]
    check_selections(file_points, lm)
    assert encoding_of(lm.model.model.layers[0].self_attn.q_proj.weight, "file", 128, "q_proj").fields
    with pytest.raises(SweepConfigError, match="20"):  # Q4_1's scales and mins are float16: bits 0-15
        check_selections([SweepPoint("p1", FaultSpec(storage="file", p=1e-6, bits="20", fields=("scales",)))], lm)
