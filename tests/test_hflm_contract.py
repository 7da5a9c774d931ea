"""The part of lm-eval's `HFLM` that `FaultyHFLM` relies on, pinned as data.

`FaultyHFLM` overrides private `HFLM` methods (`_model_call`, `_loglikelihood_tokens`,
`_model_generate`, `_detect_batch_size`) and calls them through `super()`. lm-eval may change
private methods in any release; a changed parameter would then be dropped, or passed to the wrong
place, with no error until a faulted run quietly counts or keys the wrong thing. These tests name
the method that changed, so an lm-eval upgrade (pyproject pins `lm-eval<0.5`) fails here first.

The shapes were read with `inspect.signature` on lm-eval 0.4.13: parameter names and kinds only
(`/`, `*`, `*args`, `**kwargs` as Python writes them), not annotations or defaults.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval_faults.harness.model import FaultyHFLM

OVERRIDDEN = {
    "__init__": (
        "(self, pretrained, backend, revision, subfolder, tokenizer, truncation, logits_cache, max_length, device, dtype, softmax_dtype, "
        "mixed_precision_dtype, batch_size, max_batch_size, trust_remote_code, use_fast_tokenizer, add_bos_token, prefix_token_id, "
        "parallelize, max_memory_per_gpu, max_cpu_memory, offload_folder, tp_plan, peft, delta, autogptq, gptqmodel, gguf_file, "
        "think_end_token, enable_thinking, chat_template_args, **kwargs)"
    ),
    "create_from_arg_string": "(arg_string, additional_config)",
    "_detect_batch_size": "(self, requests, pos)",
    "_loglikelihood_tokens": "(self, requests, disable_tqdm, override_bs)",
    "_model_call": "(self, inps, attn_mask, labels)",
    "_model_generate": "(self, context, max_length, stop, **generation_kwargs)",
    "loglikelihood": "(self, requests, disable_tqdm)",
    "loglikelihood_rolling": "(self, requests, disable_tqdm)",
    "generate_until": "(self, requests, disable_tqdm)",
    "set_cache_hook": "(self, cache_hook)",
    "get_model_info": "(self)",
}
"""`HFLM` methods `FaultyHFLM` overrides (and reaches through `super()`), with their shapes."""

CALLED = {
    "tok_batch_encode": "(self, strings, padding_side, left_truncate_len, truncation)",
}
"""`HFLM` methods `FaultyHFLM` calls without overriding them."""

PROPERTIES = ("model", "rank", "world_size", "max_length")
"""`HFLM` properties `FaultyHFLM` reads."""

INSTANCE_ATTRIBUTES = ("pretrained", "revision", "peft", "cache_hook")
"""Attributes `HFLM.__init__` sets that `FaultyHFLM` reads (`model_identity`, calibration)."""


def _shape(function: Callable[..., Any]) -> str:
    """A signature's parameter names and kinds, as Python writes them, without annotations or defaults."""
    signature = inspect.signature(function)
    bare = [
        parameter.replace(annotation=inspect.Parameter.empty, default=inspect.Parameter.empty)
        for parameter in signature.parameters.values()
    ]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_every_overridden_method_still_exists_on_hflm(name):
    assert name in vars(FaultyHFLM), f"the contract lists FaultyHFLM.{name} as an override, but FaultyHFLM no longer defines it"
    assert hasattr(HFLM, name), f"HFLM.{name} is gone: FaultyHFLM.{name} overrides nothing, and lm-eval never calls it"


@pytest.mark.parametrize("name", sorted({**OVERRIDDEN, **CALLED}))
def test_hflm_signatures_are_the_recorded_ones(name):
    expected = {**OVERRIDDEN, **CALLED}[name]
    assert hasattr(HFLM, name), f"HFLM.{name} is gone (FaultyHFLM relies on it)"
    actual = _shape(getattr(HFLM, name))
    assert actual == expected, (
        f"HFLM.{name} changed signature: expected {expected}, lm-eval now has {actual}; "
        f"review FaultyHFLM.{name} (and its super() call) against lm-eval's new code, then update this record"
    )


def test_every_hflm_method_faulty_hf_overrides_is_recorded():
    """A new override is a new dependency on lm-eval's internals: it goes into the contract."""
    methods = {
        name for name, value in vars(FaultyHFLM).items() if isinstance(value, (types.FunctionType, property, classmethod, staticmethod))
    }
    overrides = {name for name in methods if hasattr(HFLM, name)}
    assert overrides <= set(OVERRIDDEN), f"FaultyHFLM overrides HFLM methods not in this contract: {sorted(overrides - set(OVERRIDDEN))}"


@pytest.mark.parametrize("name", PROPERTIES)
def test_hflm_properties_read_by_faulty_hf_exist(name):
    assert isinstance(inspect.getattr_static(HFLM, name, None), property), f"HFLM.{name} is no longer a property (FaultyHFLM reads it)"


def test_hflm_instance_attributes_read_by_faulty_hf_exist(tiny_llama_dir):
    lm = FaultyHFLM(pretrained=str(tiny_llama_dir), device="cpu")
    missing = [name for name in INSTANCE_ATTRIBUTES if not hasattr(lm, name)]
    assert not missing, f"HFLM no longer sets {missing} (FaultyHFLM reads them)"
