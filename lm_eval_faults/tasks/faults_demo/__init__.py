"""The faults_demo task: its YAML(s) and the helpers they name with `!function`."""
