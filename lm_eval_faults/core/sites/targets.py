"""Which parameters and modules a spec selects: a component taxonomy that works across architectures.

Components follow the UCLA study: embedding, attention, mlp (feed-forward), norm, lm_head; plus
`lora` (PEFT adapter weights) and `other` (whatever fits none of them). A module's decoder-layer
index comes from the model's list of decoder blocks, found structurally (the longest ModuleList of
identical blocks), so no per-architecture table is needed; names and types decide the component.
Tied tensors (embedding = LM head) are one site with several names: faulted once, reported shared.
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch
from torch import nn

from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.codecs import Encoding, encoding_of
from lm_eval_faults.core.storage.formats import UnsupportedStorageError, format_names, storage_format, storage_problem
from lm_eval_faults.core.storage.layouts import LAYOUTS, BitLayout

logger = logging.getLogger(__name__)

KNOWN_MODEL_TYPES = frozenset(
    [
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "gpt_neox",
        "opt",
        "phi",
        "phi3",
        "smollm3",
        "olmo",
        "olmo2",
        "granite",
    ]
)
_warned_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_ATTENTION = re.compile(r"attn|attention")
_MLP = re.compile(r"mlp|ffn|feed_forward|^fc\d$|dense_h_to_4h|dense_4h_to_h|experts|^c_fc$")


@dataclass(frozen=True)
class ModuleSite:
    """One module, its component and decoder-layer index (None outside the decoder stack)."""

    name: str
    module: nn.Module
    component: str
    layer: int | None


@dataclass(frozen=True)
class ParamSite:
    """One stored field of a weight: its words (`param`, sharing memory with the weight) and
    their layout, from the weight's storage format (`storage.formats`). A plain tensor is one
    field, named as the parameter; `names` has several entries when weights are tied.
    `stored_layout` is None, and `problem` says why, for a weight no storage format recognises."""

    names: tuple[str, ...]
    param: torch.Tensor
    component: str
    layer: int | None
    stored_layout: BitLayout | None = None
    problem: str | None = None
    encoding: Encoding | None = dataclass_field(default=None, compare=False)
    """For a field of simulated storage (`storage=`): the weight's encoding, which decodes the
    words a fault changed into the weights the model computes with."""
    field_name: str = ""

    @property
    def layout(self) -> BitLayout:
        """The layout of the stored words; a site no format recognises can't be faulted."""
        if self.stored_layout is None:
            raise UnsupportedStorageError(f"{self.name} is stored as {self.problem}; it can't be faulted")
        return self.stored_layout

    @property
    def name(self) -> str:
        """The canonical name: the one the fault map is keyed by."""
        return self.names[0]

    @property
    def shared(self) -> bool:
        return len(self.names) > 1


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of decoder blocks: the longest ModuleList whose children share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and len({type(child) for child in module}) == 1
            and (best is None or len(module) > len(best[1]))
        ):
            best = (name, module)
    return best


_CLASSIFIED = "_lm_eval_faults_classified"
"""Where a model keeps its classified modules: on the model itself. (A weak-keyed cache does not
work: its values hold the model's modules, so no model was ever freed.)"""


def classify_modules(model: nn.Module) -> dict[str, ModuleSite]:
    """Every named module of `model` with its component and layer.

    Cached per model (a sweep injects hundreds of times into one model); the cache is
    invalidated when the number of modules changes, e.g. when an adapter is added.
    """
    n_modules = sum(1 for _ in model.modules())
    cached = model.__dict__.get(_CLASSIFIED)
    if cached is not None and cached[0] == n_modules:
        return cached[1]
    sites = _classify(model)
    model.__dict__[_CLASSIFIED] = (n_modules, sites)
    return sites


def _classify(model: nn.Module) -> dict[str, ModuleSite]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in KNOWN_MODEL_TYPES and model not in _warned_models:
        _warned_models.add(model)
        logger.warning(
            "lm_eval_faults: architecture %r is not in the tested list; components are inferred from "
            "module types and names. Check them with `lm-eval-faults targets`.",
            model_type,
        )
    stack = decoder_layers(model)
    head = _output_embeddings(model)
    sites: dict[str, ModuleSite] = {}
    for name, module in model.named_modules():
        layer, inner = _layer_of(name, stack)
        parent = sites.get(name.rpartition(".")[0]) if name else None
        component = _component(module, inner, head, parent)
        sites[name] = ModuleSite(name, module, component, layer)
    return sites


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        return None


def _layer_of(name: str, stack: tuple[str, nn.ModuleList] | None) -> tuple[int | None, str]:
    """(layer index, the module's path inside its block) or (None, full name)."""
    if stack is not None:
        prefix = f"{stack[0]}." if stack[0] else ""
        if name.startswith(prefix):
            index, _, inner = name[len(prefix) :].partition(".")
            if index.isdigit():
                return int(index), inner
    return None, name


def _component(module: nn.Module, inner_path: str, head: nn.Module | None, parent: ModuleSite | None) -> str:
    segments = inner_path.lower().split(".") if inner_path else []
    if head is not None and module is head:
        return "lm_head"
    if any(segment.startswith("lora_") for segment in segments):
        return "lora"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower():
        return "norm"
    if any(_ATTENTION.search(segment) for segment in segments):
        return "attention"
    if any(_MLP.search(segment) for segment in segments):
        return "mlp"
    if parent is not None and parent.component not in ("other",) and parent.layer is not None:
        return parent.component
    return "other"


def _selected(spec: FaultSpec, component: str, layer: int | None, names: tuple[str, ...]) -> bool:
    if "all" not in spec.target and not set(component.split("+")) & set(spec.target):
        return False
    if spec.layers is not None and layer not in spec.layers:
        return False
    return spec.modules is None or any(re.search(spec.modules, name) for name in names)


def all_param_sites(model: nn.Module, modules: dict[str, ModuleSite] | None = None) -> list[ParamSite]:
    """Every stored tensor once, with all its names (tied weights share one site)."""
    modules = modules if modules is not None else classify_modules(model)
    by_tensor: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append((name, param))
    sites = []
    for entries in by_tensor.values():
        names = tuple(name for name, _ in entries)
        owners = [modules[name.rpartition(".")[0]] for name in names]
        components = sorted({owner.component for owner in owners})
        layer = next((owner.layer for owner in owners if owner.layer is not None), None)
        sites.extend(_field_sites(names, entries[0][1], "+".join(components), layer))
    return sites


def _field_sites(names: tuple[str, ...], param: torch.Tensor, component: str, layer: int | None) -> list[ParamSite]:
    """One site per stored field of `param` (see `ParamSite`)."""
    storage = storage_format(param)
    if storage is None:
        return [ParamSite(names, param, component, layer, problem=storage_problem(param))]
    return [
        ParamSite(tuple(f"{name}.{field.name}" if field.name else name for name in names), field.words, component, layer, field.layout)
        for field in storage.fields(param)
    ]


def select_params(model: nn.Module, spec: FaultSpec) -> list[ParamSite]:
    """The parameters `spec` targets; an empty selection is an error, never a silent no-op.

    Selected weights that can't be faulted in place are an error too, never skipped in silence:
    packed quantized weights (dynamic int8 Linear keeps them outside `parameters()`) and tensors
    of dtypes without a bit layout.
    """
    packed = [
        site.name
        for site in classify_modules(model).values()
        if hasattr(site.module, "_packed_params") and _selected(spec, site.component, site.layer, (site.name,))
    ]
    if packed:
        raise TypeError(
            f"{len(packed)} selected modules hold packed quantized weights, which cannot be faulted in place "
            f"(e.g. {', '.join(packed[:3])}); fault the float model, or narrow target/modules to exclude them"
        )
    sites = [site for site in all_param_sites(model) if _selected(spec, site.component, site.layer, site.names)]
    if not sites:
        raise ValueError(_nothing_matched(model, spec, "parameters"))
    refused = [site for site in sites if site.stored_layout is None]
    subclassed = [site for site in refused if type(site.param.data) is not torch.Tensor]
    if subclassed:
        raise UnsupportedStorageError(
            f"{len(subclassed)} selected weights are stored as {subclassed[0].problem} (e.g. {subclassed[0].name}), "
            f"so their stored bits are unknown; storage formats: {', '.join(format_names())}. "
            "Load the model unquantized, or narrow target/modules to exclude them"
        )
    if refused:
        unsupported = sorted({str(site.param.dtype) for site in refused})
        supported = ", ".join(layout.name for layout in LAYOUTS.values())
        raise UnsupportedStorageError(
            f"selected weights have dtypes {', '.join(unsupported)}, which cannot be faulted; supported: {supported}"
        )
    return sites if spec.storage == "none" else [part for site in sites for part in encoded_sites(site, spec)]


def encoded_sites(site: ParamSite, spec: FaultSpec) -> list[ParamSite]:
    """A selected weight as the fields of its encoding in `spec.storage`, one site each."""
    encoding = encoding_of(site.param, spec.storage, spec.group_size, site.name)
    return [
        ParamSite(
            tuple(f"{name}.{field_name}" for name in site.names),
            words,
            site.component,
            site.layer,
            encoding.codec.field_layouts[field_name],
            encoding=encoding,
            field_name=field_name,
        )
        for field_name, words in encoding.fields.items()
        if not spec.fields or field_name in spec.fields
    ]


def select_modules(model: nn.Module, spec: FaultSpec) -> list[ModuleSite]:
    """The modules whose outputs `spec` corrupts (leaf modules, or every module with act_scope=all)."""
    sites = [
        site
        for site in classify_modules(model).values()
        if _selected(spec, site.component, site.layer, (site.name,))
        and (spec.act_scope == "all" or not any(True for _ in site.module.children()))
    ]
    if not sites:
        raise ValueError(_nothing_matched(model, spec, "modules"))
    return sites


def _nothing_matched(model: nn.Module, spec: FaultSpec, what: str) -> str:
    stack = decoder_layers(model)
    layers = f"layers 0-{len(stack[1]) - 1}" if stack else "no decoder layers found"
    present = sorted({site.component for site in classify_modules(model).values()})
    return (
        f"target={'+'.join(spec.target)}, layers={spec.to_dict()['layers'] or 'all'}, modules={spec.modules!r} "
        f"select no {what} in this model ({layers}; components present: {', '.join(present)}). "
        f"Run `lm-eval-faults targets` to see what is there."
    )
