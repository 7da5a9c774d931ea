"""`inject(model, spec)`: the one verb of the Python API, usable in any pipeline.

    with inject(model, "p=1e-5,target=attention") as faults:
        model.generate(...)
        print(faults.report.format_table())
    # leaving the block restores every weight bit-exactly and removes the hooks

or keep the handle: `faults = inject(model, FaultSpec(p=1e-5)); ...; faults.restore()`.

Injections stack: a second `inject` on a faulted model faults it further, and restoring undoes
them in reverse order. Restoring out of order is refused (the earlier undo log would write back
words that the later injection logged as its own originals).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from lm_eval_faults.core import injectors as _registers_the_sites  # noqa: F401
from lm_eval_faults.core.fault_map import FaultMap, check_writable
from lm_eval_faults.core.protection.clamping import ActivationBounds, ActivationClamp, MissingBoundsError, clamp_sites
from lm_eval_faults.core.protection.schemes import protection_gaps
from lm_eval_faults.core.report import FaultReport
from lm_eval_faults.core.sites.registry import Injector, MapsFaults, site_kind
from lm_eval_faults.core.sites.rows import Rows
from lm_eval_faults.core.spec import FaultSpec, to_spec

_active: weakref.WeakKeyDictionary[nn.Module, list[Injection]] = weakref.WeakKeyDictionary()
"""Per model, its injections still applied, oldest first: restores must come newest first."""


class Injection:
    """Faults applied to one model under one spec: the report, and the way back.

    Built by `inject` (or `Injection.apply`): one injector per site the spec selects (see
    `sites.registry`), driven alike: weight faults are applied once, activation faults at every
    forward call while the hooks are attached. `restore()` undoes them all in O(faults).
    """

    def __init__(
        self, model: nn.Module, spec: FaultSpec, replaying: bool = False, activation_bounds: ActivationBounds | None = None
    ) -> None:
        """A handle that has not touched the model yet; `apply` injects."""
        self.model = model
        self.spec = spec
        self.report = FaultReport(spec={**spec.to_dict(), "description": spec.describe()})
        # Selecting validates the selectors even at p=0: `layers=40` on a 4-layer model is an
        # error whatever p is, so a sweep's clean baseline catches it too.
        self._injectors: dict[str, Injector] = {name: site_kind(name).build(model, spec, replaying) for name in spec.sites}
        self._clamp: ActivationClamp | None = None
        if "activations" in spec.clamp and spec.active:
            if activation_bounds is None:
                raise MissingBoundsError(
                    "clamp=activations needs output bounds calibrated on clean data: pass activation_bounds= "
                    "(see protection.clamping.record_bounds); under lm-eval, faulty_hf calibrates on the task's own requests"
                )
            self._clamp = ActivationClamp(clamp_sites(model, spec), activation_bounds)
            self.report.clamp_counts = self._clamp.counts
            self.report.activation_bound_bits = self._clamp.bound_bits
        selected = {name: list(getattr(injector, "selected", [])) for name, injector in self._injectors.items()}
        self.report.protection_notes = protection_gaps(spec, selected)
        self.applied = False

    @property
    def injectors(self) -> Mapping[str, Injector]:
        """This injection's injector per site, in registration order."""
        return dict(self._injectors)

    @classmethod
    def apply(
        cls,
        model: nn.Module,
        spec: FaultSpec,
        progress: bool = False,
        fault_map: FaultMap | None = None,
        activation_bounds: ActivationBounds | None = None,
    ) -> Injection:
        """Inject `spec` into `model` (or replay `fault_map`, or the map file `spec.replay`).

        If anything fails partway (a tensor that can't be written, a hook that can't be
        registered), every word already written is restored, every hook is removed, and the error
        propagates: the model is left exactly as it was. With `spec.save_map`, the map of what
        was injected is written there: its path is checked before anything is injected, and a
        save that fails anyway restores the model before the error propagates.
        """
        if fault_map is None and spec.replay is not None:
            fault_map = FaultMap.load(spec.replay)
        elif fault_map is not None:
            fault_map.check(spec.replay or "fault map")
        if spec.save_map is not None:
            check_writable(spec.save_map)
        injection = cls(model, spec, replaying=fault_map is not None, activation_bounds=activation_bounds)
        if not spec.changes_model and fault_map is None:
            return injection
        for note in injection.report.protection_notes:
            warnings.warn(f"lm_eval_faults: {note}", stacklevel=2)
        attached: list[Injector] = []
        try:
            for injector in injection._injectors.values():
                attached.append(injector)
                injector.attach(fault_map, progress)
            if injection._clamp is not None:
                injection._clamp.attach()  # after the fault hooks: it clamps what they corrupted
        except BaseException:
            for injector in reversed(attached):
                injector.restore()
            if injection._clamp is not None:
                injection._clamp.detach()
            raise
        for name, injector in injection._injectors.items():
            injection.report.parts[name] = injector.part()
        injection.applied = True
        _active.setdefault(model, []).append(injection)
        for name, part in injection.report.parts.items():
            if spec.active and not part.per_call:  # a site faulted per call is checked once it has been called
                injection.report.check_not_silent(name)
        if spec.save_map is not None:
            try:
                injection.fault_map().save(spec.save_map)
            except BaseException:
                injection.restore()  # no handle reaches the caller: leave the model clean
                raise
        return injection

    @classmethod
    def replay(cls, model: nn.Module, fault_map: FaultMap) -> Injection:
        """Apply exactly the faults of `fault_map` (or any subset of one): bisection's trials."""
        spec = FaultSpec(replay=f"<{len(fault_map)} faults in memory>")
        return cls.apply(model, spec, fault_map=fault_map)

    def fault_map(self) -> FaultMap:
        """The exact persistent faults this injection wrote: save it, replay it, bisect it."""
        maps = [
            injector.fault_map(self.report.spec, self.report.version)
            for injector in self._injectors.values()
            if isinstance(injector, MapsFaults)
        ]
        return FaultMap.merged(maps, self.report.spec, self.report.version)

    def restore(self) -> None:
        """Return the model to its state before this injection and remove its hooks."""
        if not self.applied:
            return
        stack = _active.get(self.model, [])
        if stack and stack[-1] is not self:
            raise RuntimeError(
                "lm_eval_faults: restore the later injection first (injections on one model undo in "
                f"reverse order); still applied after this one: {stack[-1].spec.describe()}"
            )
        for injector in reversed(self._injectors.values()):
            injector.restore()
        if self._clamp is not None:
            self._clamp.detach()
        self.applied = False
        if stack:
            stack.pop()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Faults made per forward call off and uncounted inside (probe passes); persistent ones stay."""
        with contextlib.ExitStack() as stack:
            for injector in self._injectors.values():
                stack.enter_context(injector.pause())
            yield

    def next_forward(self, rows: Rows | None) -> None:
        """Declare the request rows of the next forward pass (see `injectors/activations.py`)."""
        for injector in self._injectors.values():
            injector.next_forward(rows)

    def __enter__(self) -> Injection:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()


def live_injections(model: nn.Module) -> list[Injection]:
    """The injections applied to `model` now, oldest first, whoever applied them: a wrapper
    (lm-eval's `faulty_hf`) reports these, not only its own, so faults replayed on its model
    from outside (`Injection.replay(lm.model, ...)`, as bisection does) are reported too."""
    return list(_active.get(model, []))


def inject(
    model: nn.Module,
    spec: FaultSpec | str | Mapping[str, Any] | None = None,
    *,
    progress: bool = False,
    activation_bounds: ActivationBounds | None = None,
    **fields: Any,
) -> Injection:
    """Inject faults into `model` (in place) and return the handle with `.report` and `.restore()`.

    `activation_bounds` are the clean output bounds `clamp=activations` needs (`record_bounds`)."""
    return Injection.apply(model, to_spec(spec, **fields), progress=progress, activation_bounds=activation_bounds)
