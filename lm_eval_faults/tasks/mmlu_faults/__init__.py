"""The mmlu_faults task: its YAML(s) and the helpers they name with `!function`."""
