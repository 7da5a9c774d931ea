"""Ship the import hook (`lm_eval_faults.pth`) with every install.

lm-eval 0.4.x has no plugin entry points for models, so `--model faulty_hf` works through a
one-line `.pth` file that installs a lazy import hook (see `lm_eval_faults/harness/autoload.py`).
Hatchling's `force-include` is ignored in editable installs, hence this hook, which adds the
file to both kinds of wheel.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        files = {"lm_eval_faults.pth": "lm_eval_faults.pth"}
        key = "force_include_editable" if version == "editable" else "force_include"
        build_data.setdefault(key, {}).update(files)
