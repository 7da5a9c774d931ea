"""`inject(model, spec)`: the one verb of the Python API, usable in any pipeline.

    with inject(model, "p=1e-5,target=attention") as faults:
        model.generate(...)
        print(faults.report.format_table())
    # leaving the block restores every weight bit-exactly and removes the hooks

or keep the handle: `faults = inject(model, FaultSpec(p=1e-5)); ...; faults.restore()`.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from lm_eval_faults.activations import ActivationInjector
from lm_eval_faults.report import FaultReport
from lm_eval_faults.spec import FaultSpec, parse_arg_string, parse_fault_args
from lm_eval_faults.targets import select_modules, select_params
from lm_eval_faults.weights import WeightInjector


class Injection:
    """Faults applied to one model under one spec: the report, and the way back.

    Weight faults are applied once, at construction; activation faults at every forward call
    while the hooks are attached. `restore()` undoes both (O(number of faults)).
    """

    def __init__(self, model: nn.Module, spec: FaultSpec, progress: bool = False) -> None:
        self.model = model
        self.spec = spec
        self.report = FaultReport(spec={**spec.to_dict(), "description": spec.describe()})
        # Selecting validates the selectors even at p=0: `layers=40` on a 4-layer model is an
        # error whatever p is, so a sweep's clean baseline catches it too.
        weight_sites = select_params(model, spec) if spec.on_weights else []
        module_sites = select_modules(model, spec) if spec.on_activations else []
        self._weights = WeightInjector(spec, weight_sites)
        self._activations = ActivationInjector(spec, module_sites)
        if spec.active:
            self.report.weights = self._weights.apply(progress=progress)
            self._activations.attach()
            self.report.activations = self._activations.stats
            self.report.check_not_silent("weights")

    def restore(self) -> None:
        """Return the model to its original weights and remove activation hooks."""
        self._weights.restore()
        self._activations.detach()

    def __enter__(self) -> "Injection":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()


def as_spec(spec: FaultSpec | str | Mapping[str, Any] | None = None, **fields: Any) -> FaultSpec:
    """Accept a FaultSpec, a `model_args`-style string, a dict, or keyword fields."""
    if isinstance(spec, FaultSpec):
        if fields:
            raise TypeError("give either a FaultSpec or keyword fields, not both")
        return spec
    args = parse_arg_string(spec) if isinstance(spec, str) else dict(spec or {})
    args.update(fields)
    parsed, unknown = parse_fault_args(args)
    if unknown:
        raise TypeError(f"not fault keys: {', '.join(unknown)}")
    return parsed


def inject(
    model: nn.Module,
    spec: FaultSpec | str | Mapping[str, Any] | None = None,
    *,
    progress: bool = False,
    **fields: Any,
) -> Injection:
    """Inject faults into `model` (in place) and return the handle with `.report` and `.restore()`."""
    return Injection(model, as_spec(spec, **fields), progress=progress)
