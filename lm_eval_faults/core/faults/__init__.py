"""What a fault does at the sampled positions (flip, stuck-at, value error), on the host and on the device."""
