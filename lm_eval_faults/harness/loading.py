"""Load a causal LM from `model_args` strings, as `faulty_hf` would, for the commands that need
a model but no lm-eval run (`lm-eval-faults targets`, `lm-eval-faults analyze`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lm_eval_faults.harness.package_data import demo_model_dir

LOAD_ARGUMENTS = ("revision", "subfolder", "gguf_file", "trust_remote_code", "dtype", "torch_dtype", "device_map", "attn_implementation")
LOAD_KEYS = ("pretrained", "peft", *LOAD_ARGUMENTS)
"""Every `model_args` key `load_model` understands: the non-fault keys these commands accept."""


def load_model(model_args: dict[str, Any]) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` (plus a PEFT adapter) from string-valued model_args.

    `pretrained` defaults to the embedded demo model; `dtype=float16` becomes `torch.float16`.
    """
    from transformers import AutoModelForCausalLM

    args = dict(model_args)
    pretrained = args.pop("pretrained", None) or str(demo_model_dir())
    peft = args.pop("peft", None)
    kwargs = {key: args.pop(key) for key in LOAD_ARGUMENTS if key in args}
    if args:
        raise ValueError(f"unsupported model_args for loading here: {', '.join(args)}; supported: {', '.join(LOAD_KEYS)}")
    for key in ("dtype", "torch_dtype"):
        if isinstance(kwargs.get(key), str) and kwargs[key] != "auto":
            kwargs[key] = getattr(torch, kwargs[key])
    if isinstance(kwargs.get("trust_remote_code"), str):
        kwargs["trust_remote_code"] = kwargs["trust_remote_code"].lower() == "true"
    model = AutoModelForCausalLM.from_pretrained(pretrained, **kwargs)
    if peft:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft)
    return model.eval()
