"""A new storage format is one class and one `register_format` call: a toy format, weights
stored as their raw bytes, defined here and faulted end to end; and a tensor no format
recognises (a subclass, as torchao's quantized tensors are) is refused by name, untouched."""

from __future__ import annotations

import pytest
import torch
from lm_eval_faults import inject
from lm_eval_faults.core import Injection
from lm_eval_faults.core.storage.formats import StoredField, UnsupportedStorageError, format_names, register_format, unregister_format
from lm_eval_faults.core.storage.layouts import LAYOUTS

from tiny import tiny_model

MARKED = "model.layers.1.mlp.down_proj.weight"


class ByteFormat:
    """Tensors marked `stored_as_bytes`: stored as their bytes, one 8-bit word each."""

    name = "bytes"

    def recognises(self, tensor: torch.Tensor) -> bool:
        return getattr(tensor, "stored_as_bytes", False)

    def fields(self, tensor: torch.Tensor) -> tuple[StoredField, ...]:
        return (StoredField("bytes", tensor.data.view(torch.uint8), LAYOUTS[torch.uint8]),)


@pytest.fixture
def byte_format():
    register_format(ByteFormat())
    yield
    unregister_format("bytes")


def _bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().view(torch.uint8) for name, p in model.named_parameters()}


def test_a_toy_format_is_faulted_in_its_own_words_and_restored(byte_format):
    model = tiny_model()
    model.get_parameter(MARKED).stored_as_bytes = True
    assert format_names()[0] == "bytes"  # the newest format is asked first
    clean = _bits(model)
    faults = inject(model, p=0.01, target="mlp", layers="1", seed=5)
    (site,) = [site for site in faults.report.weights if site.name.startswith(MARKED)]
    assert site.name == f"{MARKED}.bytes" and site.dtype == "uint8"
    assert site.elements == 4 * model.get_parameter(MARKED).numel() and len(site.bit_histogram) == 8
    changed = int((_bits(model)[MARKED] != clean[MARKED]).sum())
    assert site.changed_elements == changed > 0  # counted in bytes, the format's words
    fault_map = faults.fault_map()
    faults.restore()
    assert all(torch.equal(bits, clean[name]) for name, bits in _bits(model).items())
    replayed = Injection.replay(model, fault_map)  # the map names the field, and replays on it
    assert int((_bits(model)[MARKED] != clean[MARKED]).sum()) == changed
    replayed.restore()
    assert all(torch.equal(bits, clean[name]) for name, bits in _bits(model).items())


class QuantizedLike(torch.Tensor):
    """Stands in for a tensor subclass (torchao's Int8Tensor): its elements are not its storage."""


@pytest.mark.parametrize("p", [0.0, 1e-3])
def test_a_tensor_subclass_is_refused_by_name_before_anything_is_written(p):
    model = tiny_model()
    module = model.get_submodule(MARKED.rpartition(".")[0])
    module.weight = torch.nn.Parameter(module.weight.detach().as_subclass(QuantizedLike))
    clean = _bits(model)
    with pytest.raises(
        UnsupportedStorageError, match=rf"QuantizedLike, a tensor subclass no storage format recognises \(e\.g\. {MARKED}\)"
    ):
        inject(model, p=p, target="mlp")
    assert all(torch.equal(bits, clean[name]) for name, bits in _bits(model).items())
    with inject(model, p=1e-3, target="attention"):  # what no format needs to know about still works
        pass
