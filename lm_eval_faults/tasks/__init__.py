"""lm-eval task YAMLs with their helpers beside them (`!function demo_data.load_dataset`), as lm-eval's own."""
