"""The random-stream layout (host, numpy) and its torch twin: every random number a fault map is drawn from."""
