"""Ship the import hook (`lm_eval_faults.pth`) and the task YAMLs with every install.

lm-eval 0.4.x has no plugin entry points for models, so `--model faulty_hf` works through a
one-line `.pth` file that installs a lazy import hook (see `lm_eval_faults/_autoload.py`).
Hatchling's `force-include` is ignored in editable installs, hence this hook, which adds the
file to both kinds of wheel.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        files = {"lm_eval_faults.pth": "lm_eval_faults.pth"}
        if version == "editable":
            build_data.setdefault("force_include_editable", {}).update(files)
        else:
            files["tasks"] = "lm_eval_faults/tasks"
            build_data.setdefault("force_include", {}).update(files)
