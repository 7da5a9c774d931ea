"""Load a causal LM from `model_args` strings with `faulty_hf`'s rules, for the commands that need a
model but no lm-eval run (`lm-eval-faults targets`, `lm-eval-faults analyze`).

The same rules as lm-eval's `hf` (which `faulty_hf` is): `dtype` defaults to "auto" (the
checkpoint's own dtype, float32 for GGUF), so `analyze` describes the bits `faulty_hf` will run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.harness.package_data import demo_model_dir
from lm_eval_faults.harness.preflight import (
    check_against_config,
    check_keys,
    read_config,
)

LOAD_ARGUMENTS = ("revision", "subfolder", "gguf_file", "trust_remote_code", "dtype", "torch_dtype", "device_map", "attn_implementation")
LOAD_KEYS = ("pretrained", "peft", *LOAD_ARGUMENTS)
"""Every `model_args` key `load_model` understands: the non-fault keys these commands accept."""

DEFAULT_DTYPE = "auto"
"""lm-eval's `hf` default, so a model loads here in the dtype `faulty_hf` runs it in."""


def load_model(model_args: dict[str, Any], spec: FaultSpec | None = None) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` (plus a PEFT adapter) from string-valued model_args.

    `pretrained` defaults to the embedded demo model; `dtype=float16` becomes `torch.float16`.
    With `spec`, what the config can tell (layers, bit positions) is checked before loading.
    """
    from transformers import AutoModelForCausalLM

    args = dict(model_args)
    pretrained = args.pop("pretrained", None) or str(demo_model_dir())
    peft = args.pop("peft", None)
    kwargs = {key: args.pop(key) for key in LOAD_ARGUMENTS if key in args}
    if args:
        check_keys(args, LOAD_KEYS, None)  # a fault-key look-alike (`P`, `prob`) gets its suggestion
        raise ValueError(f"model_args {', '.join(map(repr, args))} not supported here; supported: {', '.join(LOAD_KEYS)}")
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = DEFAULT_DTYPE
    config = read_config({**kwargs, "pretrained": pretrained})
    if spec is not None:
        check_against_config(spec, kwargs, config)
    for key in ("dtype", "torch_dtype"):
        if isinstance(kwargs.get(key), str) and kwargs[key] != "auto":
            kwargs[key] = getattr(torch, kwargs[key])
    if isinstance(kwargs.get("trust_remote_code"), str):
        kwargs["trust_remote_code"] = kwargs["trust_remote_code"].lower() == "true"
    model: nn.Module = AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)
    if peft:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft)
    return model.eval()
