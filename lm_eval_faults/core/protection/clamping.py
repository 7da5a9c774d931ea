"""Range restriction on activations (Ranger, Chen et al. 2021): clamp module outputs to clean bounds.

A fault that turns a weight or an activation huge propagates as a huge activation; clamping each
module's output to the [min, max] it reaches on clean data stops it there, for two stored values
per module. `record_bounds` calibrates the bounds on clean forward passes; `ActivationClamp`
applies them with one forward hook per module, registered after any fault hooks so that it sees
the faulty output. NaN reads as 0 (clamped into the bounds). The clamped-element counts stay on
the tensors' device and are read once, when the report asks, not once per forward.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lm_eval_faults.core.files import write_atomically
from lm_eval_faults.core.sites.hooks import ForwardHooks
from lm_eval_faults.core.sites.targets import ModuleSite, select_modules
from lm_eval_faults.core.spec import FaultSpec

BOUND_BITS = 2 * 32
"""Storage of one module's bounds: two float32 values."""


class MissingBoundsError(ValueError):
    """`clamp=activations` without bounds calibrated on clean data."""


@dataclass
class ActivationBounds:
    """Per module name, the [min, max] of its floating-point outputs over clean forward passes."""

    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)

    def update(self, name: str, low: float, high: float) -> None:
        old = self.bounds.get(name)
        self.bounds[name] = (low, high) if old is None else (min(old[0], low), max(old[1], high))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically, so a killed calibration never leaves a half-written cache entry."""
        data = json.dumps({name: list(pair) for name, pair in sorted(self.bounds.items())}).encode("utf-8")
        write_atomically(path, data)  # two processes saving one key never share a temporary file

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ActivationBounds:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls({name: (float(low), float(high)) for name, (low, high) in data.items()})


def calibration_sites(model: nn.Module) -> list[ModuleSite]:
    """Every leaf module: bounds are recorded for all of them once, whatever a spec later targets."""
    return select_modules(model, FaultSpec())


def clamp_sites(model: nn.Module, spec: FaultSpec) -> list[ModuleSite]:
    """The modules whose outputs `clamp=activations` restricts: the spec's target, leaf modules
    (or every module with act_scope=all, as for activation faults)."""
    return select_modules(model, spec)


@contextlib.contextmanager
def record_bounds(model: nn.Module, sites: list[ModuleSite] | None = None) -> Iterator[ActivationBounds]:
    """Record output bounds of `sites` (default: every leaf module) over the forwards run inside."""
    bounds = ActivationBounds()
    hooks = ForwardHooks()

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            for tensor in _float_tensors(output):
                values = tensor.detach()
                finite = values[torch.isfinite(values)]
                if finite.numel():
                    low, high = torch.aminmax(finite.float())
                    bounds.update(name, float(low), float(high))

        return hook

    hooks.attach((site.module, recorder(site.name)) for site in (calibration_sites(model) if sites is None else sites))
    try:
        yield bounds
    finally:
        hooks.remove()


class ActivationClamp:
    """Clamps the outputs of modules to calibrated bounds while attached; counts what it changed."""

    def __init__(self, sites: list[ModuleSite], bounds: ActivationBounds) -> None:
        missing = [site.name for site in sites if site.name not in bounds.bounds]
        if missing:
            raise MissingBoundsError(
                f"clamp=activations: no calibrated bounds for {len(missing)} targeted modules (first: {missing[0]}); "
                "calibrate on the same model"
            )
        self.sites = sites
        self.bounds = bounds
        self._counts: dict[str, torch.Tensor] = {}
        self._hooks = ForwardHooks()

    def attach(self) -> None:
        self._hooks.attach((site.module, self._hook(site.name)) for site in self.sites)

    def detach(self) -> None:
        self._hooks.remove()

    @property
    def bound_bits(self) -> int:
        return BOUND_BITS * len(self.sites)

    def counts(self) -> dict[str, int]:
        """Clamped output elements per module, over every call so far (one device read each)."""
        return {name: int(count) for name, count in self._counts.items()}

    def _hook(self, name: str):
        low, high = self.bounds.bounds[name]

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            return _map_tensors(output, lambda tensor: self._clamp(name, tensor, low, high))

        return hook

    def _clamp(self, name: str, tensor: torch.Tensor, low: float, high: float) -> torch.Tensor:
        clamped = torch.nan_to_num(tensor, nan=0.0).clamp(low, high)
        changed = (clamped != tensor).sum()  # NaN != anything: every NaN counts
        previous = self._counts.get(name)
        self._counts[name] = changed if previous is None else previous + changed
        return clamped


def _float_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _float_tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _float_tensors(item)


def _map_tensors(value: Any, function) -> Any:
    """`value` with every floating-point tensor in it replaced by `function(tensor)`."""
    if isinstance(value, torch.Tensor):
        return function(value) if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_map_tensors(item, function) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(item, function) for item in value)
    if isinstance(value, dict):  # ModelOutput is an OrderedDict: update in place keeps its type
        for key in list(value.keys()):
            value[key] = _map_tensors(value[key], function)
        return value
    return value
