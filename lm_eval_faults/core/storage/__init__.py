"""How a tensor stores its values: bit layouts of each dtype, and reading and writing its stored words."""
