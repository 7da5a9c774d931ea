"""Where faults land: exact O(k) Bernoulli positions on the host, the same on the device, and per-forward planned draws."""
