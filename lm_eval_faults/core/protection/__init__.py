"""What protects stored weights and activations: backup and ECC schemes, the SECDED code, range clamping."""
