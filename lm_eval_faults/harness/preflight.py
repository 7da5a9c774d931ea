"""Checks that need only a model's config, run before its weights load.

Loading a 7B checkpoint takes minutes; reading its `config.json` takes milliseconds. Whatever can
be known from the config is checked first, so bad input fails in one line before the load:

- `layers=` beyond the decoder's layer count (`num_hidden_layers`, `n_layer`, ...);
- `bits=` and `protect_bits=` positions beyond the width of the dtype the model will run in
  (`dtype=`, else the checkpoint's own, as lm-eval's `hf` resolves `dtype="auto"`), and a
  `dtype=` that is no torch dtype at all (`float13`);
- task names lm-eval does not know (`check_tasks`), and every point of a sweep's grid
  (`study.grid.preflight_sweep`), so a sweep fails before its model loads and its run directory is pinned;
- `model_args` keys that are neither fault keys nor arguments `HFLM`, `from_pretrained` or the
  model's config accept (`P`, `prob`, `rate`...), with the fault keys and a suggestion.

The loaded-model checks (target selection, dtype support) stay as the fallback for what a config
can't tell (a config that can't be read skips the config checks, never the later ones).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from lm_eval_faults.core.faults.device import device_path_mode
from lm_eval_faults.core.spec import FAULT_KEYS, FaultSpec, FaultSpecError
from lm_eval_faults.core.storage.codecs import FILE, codec, codec_names
from lm_eval_faults.core.storage.layouts import LAYOUTS, BitLayout, resolve_bits

logger = logging.getLogger(__name__)

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""Where configs of the supported families keep their decoder depth."""

FROM_PRETRAINED_KWARGS = frozenset(
    [
        "adapter_kwargs",
        "adapter_name",
        "attn_implementation",
        "device_map",
        "device_mesh",
        "distributed_config",
        "dtype",
        "experts_implementation",
        "generation_config",
        "gguf_file",
        "kernel_config",
        "key_mapping",
        "max_memory",
        "offload_buffers",
        "offload_folder",
        "output_loading_info",
        "proxies",
        "quantization_config",
        "state_dict",
        "subfolder",
        "torch_dtype",
        "tp_plan",
        "tp_size",
        "trust_remote_code",
        "use_kernels",
        "variant",
        "low_cpu_mem_usage",
        "load_in_8bit",
        "load_in_4bit",
    ]
)
"""Keyword arguments `from_pretrained` takes through `**kwargs` (transformers 4.45 to 5.x)."""


def read_config(model_args: Mapping[str, Any]) -> Any | None:
    """The model's config, read without loading weights; None when it can't be read here."""
    from transformers import AutoConfig

    pretrained = model_args.get("pretrained")
    if not isinstance(pretrained, str):
        return getattr(pretrained, "config", None)
    kwargs = {key: model_args[key] for key in ("revision", "subfolder", "gguf_file") if model_args.get(key)}
    if str(model_args.get("trust_remote_code", "")).lower() == "true":
        kwargs["trust_remote_code"] = True
    try:
        return AutoConfig.from_pretrained(pretrained, **kwargs)
    except Exception as error:  # a hub id offline, a custom class: the loaded-model checks still run
        logger.info("lm_eval_faults: config of %r not read before loading (%s); checks wait for the model", pretrained, error)
        return None


def layer_count(config: Any) -> int | None:
    for source in (config, getattr(config, "text_config", None)):
        for key in LAYER_COUNT_KEYS:
            value = getattr(source, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def run_dtype(config: Any, model_args: Mapping[str, Any]) -> Any:
    """The torch dtype the weights will have: `dtype=` if given, else the checkpoint's (GGUF: float32)."""
    import torch

    requested = model_args.get("dtype", model_args.get("torch_dtype", "auto"))
    if isinstance(requested, torch.dtype):
        return requested
    if requested not in (None, "auto"):
        return getattr(torch, str(requested), None)
    if model_args.get("gguf_file"):
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def check_keys(keys: Iterable[str], accepted: Iterable[str], config: Any | None) -> None:
    """Refuse a key nobody downstream accepts: it would fail only after loading, as a TypeError."""
    known = set(accepted) | FROM_PRETRAINED_KWARGS | _from_pretrained_parameters()
    if config is not None:
        known |= set(config.to_dict())
    lowered = {k.lower(): k for k in FAULT_KEYS}
    for key in keys:
        if key in known:
            continue
        close = lowered.get(key.lower()) or next(iter(difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)), None)
        hint = f"did you mean {lowered.get(close, close)!r}? " if close else ""
        raise FaultSpecError(
            f"model_args key {key!r} is neither a fault key nor an argument of the model or lm-eval's hf; "
            f"{hint}Fault keys: {', '.join(FAULT_KEYS)}"
        )


def check_as_written(pairs: Iterable[tuple[str, Any]]) -> None:
    """`--model_args` as typed on lm-eval's command line: a key given twice is an error, and fault
    values are validated as written (lm-eval's parser keeps the last duplicate silently and turns
    `p=1e-400` into 0)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise FaultSpecError(f"model_args key {key!r} is given twice ({seen[key]!r} and {value!r}); give it once")
        seen[key] = value
    FaultSpec(**{key: value for key, value in seen.items() if key in FAULT_KEYS})


def check_dtype(model_args: Mapping[str, Any]) -> None:
    """`dtype=` (or `torch_dtype=`) must name a torch dtype: `float13` would end in an
    AttributeError inside `from_pretrained`, after the config and tokenizer have loaded."""
    import torch

    for key in ("dtype", "torch_dtype"):
        value = model_args.get(key)
        if value is None or isinstance(value, torch.dtype) or str(value) == "auto":
            continue
        if not isinstance(getattr(torch, str(value), None), torch.dtype):
            choices = ", ".join(["auto", *(lay.name for lay in LAYOUTS.values() if lay.is_float)])
            raise FaultSpecError(f"model_args {key}={value!r} is invalid: not a torch dtype; choose one of {choices}")


def check_against_config(spec: FaultSpec, model_args: Mapping[str, Any], config: Any | None) -> None:
    """`layers=` and `kv_layers=` against the layer count and `bits=`/`protect_bits=` against the run dtype's width;
    and the environment's `LM_EVAL_FAULTS_DEVICE_PATH`, which is otherwise read only once faults
    are drawn, after the model (and a sweep's baseline) has cost its time."""
    try:
        device_path_mode()
    except ValueError as error:
        raise FaultSpecError(str(error)) from None
    check_dtype(model_args)
    if spec.storage == FILE and not model_args.get("gguf_file"):
        raise FaultSpecError(
            "model_args storage=file needs gguf_file=: it faults the blocks of the GGUF file the model is loaded from "
            "(for a model stored otherwise, choose a simulated storage: " + ", ".join(codec_names()) + ")"
        )
    if config is None:
        return
    count = layer_count(config)
    if count is not None and spec.layers is not None and max(spec.layers) >= count:
        raise FaultSpecError(
            f"model_args layers={spec.to_dict()['layers']!r} is invalid: this model has {count} decoder layers (0-{count - 1})"
        )
    if count is not None and spec.kv_layers is not None and max(spec.kv_layers) >= count:
        raise FaultSpecError(
            f"model_args kv_layers={spec.to_dict()['kv_layers']!r} is invalid: this model has {count} decoder layers (0-{count - 1})"
        )
    if spec.storage == FILE:
        return  # each file tensor has its own type: its fields' bits are checked as it is faulted
    if spec.storage != "none":
        check_storage(spec, config)
        return
    dtype = run_dtype(config, model_args)
    layout = LAYOUTS.get(dtype)
    if layout is None and spec.active:
        supported = ", ".join(lay.name for lay in LAYOUTS.values() if lay.is_float)
        raise FaultSpecError(f"the model runs in {dtype}, which cannot be faulted: choose dtype= one of {supported}")
    if layout is not None:
        check_bits(spec, layout, f"the model runs in {layout.name}")


def check_bits(spec: FaultSpec, layout: BitLayout, where: str) -> None:
    """`bits=` (bit faults) and `protect_bits=` against the positions `layout` has; `where` says
    whose layout it is (the run dtype, or a stored field)."""
    if spec.per_bit:
        try:
            resolve_bits(layout, spec.bits)
        except ValueError as error:
            raise FaultSpecError(f"model_args {error} ({where})") from None
    if spec.protect_bits != "none":
        try:
            resolve_bits(layout, spec.protect_bits)
        except ValueError as error:  # resolve_bits names `bits=`; the user wrote protect_bits=
            message = str(error).replace(f"bits={spec.protect_bits!r}", f"protect_bits={spec.protect_bits!r}", 1)
            raise FaultSpecError(f"model_args {message} ({where})") from None
    if spec.pattern_shape is not None and spec.per_bit:
        try:  # a row must hold whole words of this width
            spec.pattern_shape.slots(np.zeros(1, dtype=np.int64), layout.width, resolve_bits(layout, spec.bits))
        except ValueError as error:
            raise FaultSpecError(f"model_args pattern={spec.pattern!r} is invalid: {error} ({where})") from None


def check_storage(spec: FaultSpec, config: Any) -> None:
    """`storage=`: the block size against the widths the config gives (hidden and intermediate
    sizes), before loading."""
    chosen = codec(spec.storage)  # bits= against its fields' layouts: FaultSpec checks them
    widths = {name: getattr(config, name, None) for name in ("hidden_size", "intermediate_size")}
    for name, width in widths.items():
        if not isinstance(width, int):
            continue
        block = chosen.block_size(torch.empty(0, width, device="meta"), spec.group_size)  # a row that wide
        if width % block:
            raise FaultSpecError(
                f"model_args storage={spec.storage} is invalid for this model: its blocks of {block} weights do not divide "
                f"{name}={width}" + (" (choose a group_size that divides it)" if spec.storage == "int4" else "")
            )


def check_tasks(option: str, tasks: Iterable[str], include_path: Iterable[str] = ()) -> None:
    """Refuse a task name lm-eval does not know (nor a task file or directory), before any model
    loads: lm-eval would raise a KeyError traceback only after the load. Indexing takes seconds,
    loading a 7B model minutes."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=list(include_path) or None)
    unknown = [task for task in tasks if not manager.match_tasks([task]) and not os.path.exists(task)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FaultSpecError(
            f"{option} {', '.join(map(repr, unknown))}: not an lm-eval task{hint} (`lm_eval ls tasks` lists them; --include_path adds a directory)"
        )


def _from_pretrained_parameters() -> set[str]:
    from transformers import PreTrainedModel

    return set(inspect.signature(PreTrainedModel.from_pretrained).parameters) - {"kwargs", "model_args"}


def check_fault_files(spec: FaultSpec, model_args: Mapping[str, Any], config: Any | None) -> None:
    """What `replay=` and `save_map=` files alone tell, before the weights load: the map exists,
    parses and is consistent, and was made in the dtype the model will run in; the output path
    can be written (a failed save would otherwise lose the whole run)."""
    from lm_eval_faults.core.fault_map import FaultMap, check_writable

    if spec.save_map is not None:
        check_writable(spec.save_map)
    if spec.replay is None:
        return
    fault_map = FaultMap.load(spec.replay)
    stored_as = fault_map.spec.get("storage", "none")
    if stored_as == FILE and not model_args.get("gguf_file"):
        raise FaultSpecError(
            f"model_args replay={spec.replay} is a map of faults in a GGUF file's own blocks (storage=file): give the gguf_file= it was made on"
        )
    if stored_as != "none":
        return  # the map's fields have their own layouts, checked word by word as it replays
    layout = LAYOUTS.get(run_dtype(config, model_args)) if config is not None else None
    dtypes = {info.dtype for info in fault_map.params}
    if layout is not None and layout.name not in dtypes:  # some modules may stay float32: one match suffices
        raise FaultSpecError(
            f"model_args replay={spec.replay} holds {', '.join(sorted(dtypes))} faults; the model runs in {layout.name}: "
            f"give dtype={sorted(dtypes)[0]} or replay a map made in {layout.name}"
        )
