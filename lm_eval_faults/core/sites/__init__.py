"""Where faults can go: the component taxonomy that selects parameters and modules, and the hooks on them."""
