"""The registry of fault sites: one entry per place faults can go, each with its injector.

A site (`weights`, `activations`, and whatever registers next: a KV cache, a buffer) is one
module that defines an `Injector` plus one `register_site(...)` call, as a method is one folder
plus `register_peft_method` in peft. `FaultSpec` validates `site=` against these names,
`Injection` builds and drives one injector per selected site, and `FaultReport` holds one part
per site: none of them names a site.

Why a registry rather than an `if site == ...` per caller: before it, the two sites were
compared as substrings in six modules, and adding one touched nine files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

    from lm_eval_faults.core.fault_map import FaultMap
    from lm_eval_faults.core.report import ReportPart
    from lm_eval_faults.core.spec import FaultSpec


class Injector(Protocol):
    """One site's faults on one model under one spec, and the way back.

    `attach` injects (persistent sites write their faults once; transient sites attach the hooks
    that fault every forward call), `restore` undoes it exactly, `part` is the site's part of the
    report (live: transient counts grow while attached). `pause` and `next_forward` matter to
    sites faulted per forward call; a persistent site accepts them and does nothing.
    """

    def attach(self, fault_map: FaultMap | None, progress: bool) -> None: ...

    def restore(self) -> None: ...

    def part(self) -> ReportPart: ...

    def pause(self) -> contextlib.AbstractContextManager[None]: ...

    def next_forward(self, rows: Any) -> None: ...


class Pausable:
    """`pause()` for a site faulted per forward call: no faults and no counts inside the block
    (lm-eval's batch-size probes, calibration passes); the injector checks `paused` per call."""

    paused: bool = False

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        previous, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = previous


@runtime_checkable
class MapsFaults(Protocol):
    """An injector whose faults can be saved as a fault map and replayed (persistent faults)."""

    def fault_map(self, spec: dict[str, Any], version: str) -> FaultMap: ...


InjectorFactory = Callable[["nn.Module", "FaultSpec", bool], Injector]
"""(model, spec, replaying) -> the injector of its site, its selection already made. `replaying`
is True when a fault map, not the selectors, says which tensors are faulted."""


@dataclass(frozen=True)
class SiteKind:
    """A registered site: its name in `site=`, and how to build its injector.

    `per_call` marks a site faulted afresh at every forward call (its report part sums over the
    calls); otherwise its faults persist until restored. `always_reported` keeps a part for the
    site in every report, selected or not: the results JSON has had both original sites' keys
    since the first release.
    """

    name: str
    build: InjectorFactory
    per_call: bool = False
    always_reported: bool = False


_SITES: dict[str, SiteKind] = {}


def register_site(kind: SiteKind) -> SiteKind:
    """Add a site (its name must be new and free of `+`, which joins sites in `site=`)."""
    if not kind.name or "+" in kind.name or kind.name in _SITES:
        raise ValueError(f"site name {kind.name!r}: must be new, non-empty and without '+'")
    _SITES[kind.name] = kind
    return kind


def unregister_site(name: str) -> None:
    """Remove a registered site (a test's toy site, when it is done)."""
    _SITES.pop(name)


@contextlib.contextmanager
def registered_site(kind: SiteKind) -> Iterator[SiteKind]:
    """`register_site` for the duration of a block."""
    register_site(kind)
    try:
        yield kind
    finally:
        unregister_site(kind.name)


def site_names() -> tuple[str, ...]:
    """Every registered site, in registration order: the order `site=` is written back in."""
    return tuple(_SITES)


def site_kind(name: str) -> SiteKind:
    return _SITES[name]


def parse_sites(value: str) -> tuple[str, ...] | None:
    """`weights+activations` as registered names in registration order, or None if any part is unknown."""
    parts = {part.strip().lower() for part in value.split("+")}
    if not parts or not parts <= set(_SITES):
        return None
    return tuple(name for name in _SITES if name in parts)
