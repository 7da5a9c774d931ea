"""Make `faulty_hf` and this package's tasks visible to an unmodified lm-eval, at zero cost.

lm-eval 0.4.x discovers models only through its own registry and tasks only through
`--include_path`. This module is imported at interpreter start by `lm_eval_faults.pth` and
installs a meta-path finder that waits, doing nothing, until `lm_eval.models` or `lm_eval.tasks`
is imported. Only then does it add, lazily:

- the model name `faulty_hf` as a registry placeholder `lm_eval_faults.harness.model:FaultyHFLM`
  (torch and transformers load only when someone asks for that model);
- this package's task directory to every `TaskManager`, so `--tasks faults_demo` just works.

It imports nothing but the standard library, so unrelated Python processes pay nothing.
Set `LM_EVAL_FAULTS_NO_AUTOLOAD=1` to switch it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

MODEL_NAME = "faulty_hf"
MODEL_TARGET = "lm_eval_faults.harness.model:FaultyHFLM"


def register_model_placeholder(models_module: ModuleType | None = None) -> None:
    """Register `faulty_hf` in lm-eval's model registry without importing our model code."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def add_task_dir_to_task_manager(tasks_module: ModuleType) -> None:
    """Wrap `TaskManager.__init__` so our task YAMLs are always on its include path."""
    from lm_eval_faults.harness.package_data import tasks_dir

    manager_cls = tasks_module.TaskManager
    if getattr(manager_cls.__init__, "_lm_eval_faults", False):
        return
    original_init = manager_cls.__init__

    def __init__(self, *args, include_path=None, **kwargs):
        ours = str(tasks_dir())
        if include_path is None:
            include_path = [ours]
        elif isinstance(include_path, (list, tuple)):
            include_path = [*include_path, ours] if ours not in include_path else include_path
        elif include_path != ours:
            include_path = [include_path, ours]
        original_init(self, *args, include_path=include_path, **kwargs)

    __init__._lm_eval_faults = True  # type: ignore[attr-defined]
    __init__.__wrapped__ = original_init  # type: ignore[attr-defined]
    manager_cls.__init__ = __init__


_AFTER_IMPORT = {
    "lm_eval.models": register_model_placeholder,
    "lm_eval.tasks": add_task_dir_to_task_manager,
}


class _RunAfterExec(importlib.abc.Loader):
    """Delegate to the real loader, then run our callback on the fresh module."""

    def __init__(self, loader: importlib.abc.Loader, callback) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        try:
            self._callback(module)
        except Exception as error:  # never break lm-eval because of us
            print(f"lm_eval_faults: could not register with lm-eval: {error!r}", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _LmEvalWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of the two lm-eval modules we extend."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _AFTER_IMPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunAfterExec(spec.loader, _AFTER_IMPORT[fullname])
        return spec


def install() -> None:
    """Install the watcher once; handle modules that were imported before us."""
    if os.environ.get("LM_EVAL_FAULTS_NO_AUTOLOAD"):
        return
    if any(isinstance(finder, _LmEvalWatcher) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _LmEvalWatcher())
    for name, callback in _AFTER_IMPORT.items():
        if name in sys.modules:
            callback(sys.modules[name])


install()
