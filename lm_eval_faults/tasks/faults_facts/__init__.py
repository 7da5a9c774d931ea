"""The faults_facts task: its YAML(s) and the helpers they name with `!function`."""
