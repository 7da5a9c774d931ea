"""Forward hooks on many modules, attached all or none and removed together.

Fault hooks, range-restriction clamps and bound recorders all attach one hook per selected module.
If a registration fails halfway (a module that refuses hooks), the hooks already registered must
not stay behind on the model: a half-faulted model that reads as clean, or a clamp on some modules
only, would mislead silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class ForwardHooks:
    """A set of forward hooks: `attach` registers them all (or, on any failure, none); `remove` undoes it."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def __bool__(self) -> bool:
        return bool(self._handles)

    def attach(self, hooks: Iterable[tuple[nn.Module, Callable[..., Any]]], with_kwargs: bool = False) -> None:
        """Register each (module, hook) pair; if one fails, remove every hook this set holds and re-raise."""
        try:
            for module, hook in hooks:
                self._handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
