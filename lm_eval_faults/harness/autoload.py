"""Make `faulty_hf` and this package's tasks visible to an unmodified lm-eval, at zero cost.

lm-eval 0.4.x discovers models only through its own registry and tasks only through
`--include_path`. This module is imported at interpreter start by `lm_eval_faults.pth` and
installs a meta-path finder that waits, doing nothing, until `lm_eval.models` or `lm_eval.tasks`
is imported. Only then does it add, lazily:

- the model name `faulty_hf` as a registry placeholder `lm_eval_faults.harness.model:FaultyHFLM`
  (torch and transformers load only when someone asks for that model);
- this package's task directory to every `TaskManager`, so `--tasks faults_demo` just works;
- a record of `--model_args` as typed on lm-eval's command line (`COMMAND_LINE_MODEL_ARGS`):
  lm-eval's parser turns `p=1e-400` into 0 and keeps the last of a duplicated key, so
  `faulty_hf` checks the words the user wrote, not what the parser made of them;
- with that command line, a `sys.excepthook` that ends a user error of this package in one line.

It imports nothing at all at start-up (`os` and `sys` are already loaded by then; no
`__future__`, `typing`, `types` or `importlib`), so that unrelated Python processes pay nothing:
the `.pth` line plus the three tiny modules `lm_eval_faults`, `lm_eval_faults.harness` and this
one. Set `LM_EVAL_FAULTS_NO_AUTOLOAD=1` to switch it off: the `.pth` line checks it before
importing anything of ours, so then not even those load. `tests/test_import_hook.py` keeps it so.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

MODEL_NAME = "faulty_hf"
MODEL_TARGET = "lm_eval_faults.harness.model:FaultyHFLM"
OPT_OUT = "LM_EVAL_FAULTS_NO_AUTOLOAD"

# Annotations are strings (no `from __future__ import annotations`: that imports `__future__`).


def register_model_placeholder(models_module: "ModuleType | None" = None) -> None:
    """Register `faulty_hf` in lm-eval's model registry without importing our model code."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def add_task_dir_to_task_manager(tasks_module: "ModuleType") -> None:
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


COMMAND_LINE_MODEL_ARGS: "list[tuple[str, object]]" = []
"""(key, value as written) of every `--model_args` item lm-eval's command line parsed, in order."""


def record_command_line_model_args(cli_utils: "ModuleType") -> None:
    """Wrap lm-eval's `MergeDictAction` so `--model_args` items are recorded as written."""
    action = cli_utils.MergeDictAction
    if getattr(action.__call__, "_lm_eval_faults", False):
        return
    original_call = action.__call__

    def __call__(self, parser, namespace, values, option_string=None):
        if self.dest == "model_args" and values:
            COMMAND_LINE_MODEL_ARGS.extend(_written_pairs(values, cli_utils.split_top_level))
        return original_call(self, parser, namespace, values, option_string)

    __call__._lm_eval_faults = True  # type: ignore[attr-defined]
    action.__call__ = __call__
    install_one_line_errors()


def install_one_line_errors() -> None:
    """Under lm-eval's command line, a user error of this package (`FaultSpecError`, a map
    error: a ValueError defined here) ends in one line, `lm_eval: FaultSpecError: ...`, exit 2,
    not as the last line of a 25-41-line traceback. Anything else keeps lm-eval's traceback, and
    `LM_EVAL_FAULTS_TRACEBACK=1` keeps it for ours too."""
    previous = sys.excepthook
    if getattr(previous, "_lm_eval_faults", False):
        return

    def excepthook(kind, error, traceback):
        ours = isinstance(error, ValueError) and kind.__module__.startswith("lm_eval_faults.")
        if not ours or os.environ.get("LM_EVAL_FAULTS_TRACEBACK"):
            return previous(kind, error, traceback)
        lines = str(error).strip().splitlines() or [""]
        print(f"lm_eval: {kind.__name__}: {lines[0]}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)  # an excepthook cannot choose the exit status; 2 is a usage error, as for our commands

    excepthook._lm_eval_faults = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook


def _written_pairs(values, split_top_level) -> "list[tuple[str, object]]":
    """(key, value) pairs with numbers kept as the text typed (JSON or key=value items)."""
    import json

    text = values[0] if isinstance(values, (list, tuple)) else values
    if isinstance(text, str) and text.lstrip().startswith("{"):
        try:
            return list(json.loads(text, parse_float=str, parse_int=str, object_pairs_hook=list))
        except ValueError:
            return []
    pairs = []
    for value in values if isinstance(values, (list, tuple)) else [values]:
        for item in split_top_level(value):
            key, sep, written = item.partition("=")
            if sep:
                pairs.append((key.strip(), written.strip()))
    return pairs


_AFTER_IMPORT: "dict[str, Callable[[ModuleType], None]]" = {
    "lm_eval.models": register_model_placeholder,
    "lm_eval.tasks": add_task_dir_to_task_manager,
    "lm_eval._cli.utils": record_command_line_model_args,
}


class _RunAfterExec:
    """Delegate to the real loader, then run our callback on the fresh module.

    A plain class: the import system needs only `create_module` and `exec_module`, and
    subclassing `importlib.abc.Loader` would import `importlib.abc` (about 50 modules) at start-up.
    """

    def __init__(self, loader, callback) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: "ModuleType") -> None:
        self._loader.exec_module(module)
        try:
            self._callback(module)
        except Exception as error:  # never break lm-eval because of us
            print(f"lm_eval_faults: could not register with lm-eval: {error!r}", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _LmEvalWatcher:
    """Finds nothing itself; wraps the loader of the lm-eval modules we extend.

    A plain meta-path finder (only `find_spec` is required). For the names it watches it
    asks the finders after it, so lm-eval is found however it is installed.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _AFTER_IMPORT:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _LmEvalWatcher):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or isinstance(spec.loader, _RunAfterExec):
            return spec
        spec.loader = _RunAfterExec(spec.loader, _AFTER_IMPORT[fullname])
        return spec


def install() -> None:
    """Install the watcher once; handle modules that were imported before us."""
    if os.environ.get(OPT_OUT):
        return
    if any(isinstance(finder, _LmEvalWatcher) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _LmEvalWatcher())
    for name, callback in _AFTER_IMPORT.items():
        if name in sys.modules:
            callback(sys.modules[name])


install()
