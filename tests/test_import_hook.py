"""The `.pth` import hook runs in every Python process: it must load almost nothing.

These count modules in fresh interpreters instead of timing them (`bench/bench_import_hook.py`
does the timing): what the hook adds to `sys.modules` at start-up, against the same interpreter
with `LM_EVAL_FAULTS_NO_AUTOLOAD=1`, must be our own three tiny modules and nothing from the
standard library (`typing`, `importlib.abc`, `pathlib`, ... cost milliseconds each).
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

OPT_OUT = "LM_EVAL_FAULTS_NO_AUTOLOAD"
HOOK_MODULES = {"lm_eval_faults", "lm_eval_faults.harness", "lm_eval_faults.harness.autoload"}
REPO_PTH = Path(__file__).resolve().parent.parent / "lm_eval_faults.pth"


def installed_pth() -> Path | None:
    for directory in [*site.getsitepackages(), site.getusersitepackages()]:
        if (Path(directory) / "lm_eval_faults.pth").is_file():
            return Path(directory) / "lm_eval_faults.pth"
    return None


needs_hook = pytest.mark.skipif(installed_pth() is None, reason="lm_eval_faults.pth is not installed in this interpreter")


def start_up_modules(tmp_path: Path, opt_out: bool) -> set[str]:
    """`sys.modules` of a fresh `python -c` (run outside the checkout), with or without the hook."""
    env = {k: v for k, v in os.environ.items() if k != OPT_OUT}
    if opt_out:
        env[OPT_OUT] = "1"
    code = "import sys, json; print(json.dumps(sorted(sys.modules)))"
    # `json` is imported by the probe itself, after start-up, in both runs alike.
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_installed_pth_matches_the_checkout():
    installed = installed_pth()
    if installed is None:
        pytest.skip("lm_eval_faults.pth is not installed in this interpreter")
    assert installed.read_text() == REPO_PTH.read_text(), "reinstall: pip install -e . --no-deps"


def test_pth_checks_the_opt_out_before_importing_anything_of_ours():
    lines = [line for line in REPO_PTH.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("import "), "site.py executes only lines starting with 'import '"
    line = lines[0]
    assert line.index(OPT_OUT) < line.index("lm_eval_faults.harness.autoload")


@needs_hook
def test_hook_adds_only_our_own_tiny_modules(tmp_path):
    added = start_up_modules(tmp_path, opt_out=False) - start_up_modules(tmp_path, opt_out=True)
    assert added == HOOK_MODULES, f"the hook pulled in {sorted(added - HOOK_MODULES)} at start-up"


@needs_hook
def test_hook_imports_nothing_heavy(tmp_path):
    modules = start_up_modules(tmp_path, opt_out=False)
    heavy = {"typing", "importlib.abc", "importlib.machinery", "pathlib", "__future__", "torch", "transformers", "lm_eval"}
    assert not modules & heavy


@needs_hook
def test_opt_out_imports_nothing_of_ours(tmp_path):
    modules = start_up_modules(tmp_path, opt_out=True)
    assert not {m for m in modules if m.startswith("lm_eval_faults")}


FAKE_LM_EVAL = {
    "lm_eval/__init__.py": "",
    "lm_eval/api/__init__.py": "",
    "lm_eval/api/registry.py": """
        class Registry:
            def __init__(self):
                self.targets = {}
            def __contains__(self, name):
                return name in self.targets
            def register(self, name, target):
                self.targets[name] = target
        model_registry = Registry()
    """,
    "lm_eval/models/__init__.py": "",
    "lm_eval/tasks/__init__.py": """
        class TaskManager:
            def __init__(self, include_path=None):
                self.include_path = include_path
    """,
}


@pytest.mark.slow
@needs_hook
def test_hook_extends_lm_eval_when_it_is_imported(tmp_path):
    """The plain-class finder and loader work through the real import system (a stand-in lm_eval
    on `sys.path[0]`, so this takes milliseconds, not lm-eval's seconds)."""
    for name, text in FAKE_LM_EVAL.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text))
    code = textwrap.dedent("""
        import json, sys
        assert 'lm_eval' not in sys.modules
        import lm_eval.models, lm_eval.tasks
        from lm_eval.api.registry import model_registry
        from lm_eval.tasks import TaskManager
        print(json.dumps([
            lm_eval.__file__, model_registry.targets, TaskManager().include_path,
            TaskManager(include_path='mine').include_path, TaskManager(include_path=['mine']).include_path,
        ]))
    """)
    env = {k: v for k, v in os.environ.items() if k != OPT_OUT}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "could not register" not in out.stderr
    where, targets, default, one, several = json.loads(out.stdout)
    assert Path(where).parent.parent == tmp_path
    assert targets == {"faulty_hf": "lm_eval_faults.harness.model:FaultyHFLM"}
    ours = default[0]
    assert Path(ours).name == "tasks" and (Path(ours) / "faults_demo").is_dir()
    assert default == [ours] and one == ["mine", ours] and several == ["mine", ours]


def test_command_line_model_args_are_checked_as_written():
    """lm-eval's `--model_args` parser keeps the last of a duplicated key and turns 1e-400 into 0;
    the hook records the items as typed so `faulty_hf` refuses both (before any model loads)."""
    import argparse

    import pytest
    from lm_eval._cli.utils import MergeDictAction
    from lm_eval_faults.core.spec import FaultSpecError
    from lm_eval_faults.harness import autoload
    from lm_eval_faults.harness.preflight import check_as_written

    parser = argparse.ArgumentParser()
    parser.add_argument("--model_args", nargs="+", action=MergeDictAction)
    for typed, message in [
        (["p=1e-3,p=1e-4"], "given twice"),
        (["p=1e-3", "target=mlp", "p=1e-4"], "given twice"),
        (["pretrained=x,p=1e-400"], "underflows"),
        (['{"p": 1e-400, "seed": 1}'], "underflows"),
    ]:
        autoload.COMMAND_LINE_MODEL_ARGS.clear()
        parser.parse_args(["--model_args", *typed])
        with pytest.raises(FaultSpecError, match=message):
            check_as_written(autoload.COMMAND_LINE_MODEL_ARGS)
    autoload.COMMAND_LINE_MODEL_ARGS.clear()
    parser.parse_args(["--model_args", "p=1e-3,target=attention", "chat_template_args={a: 1, b: 2}"])
    check_as_written(autoload.COMMAND_LINE_MODEL_ARGS)
    assert ("p", "1e-3") in autoload.COMMAND_LINE_MODEL_ARGS
    autoload.COMMAND_LINE_MODEL_ARGS.clear()
