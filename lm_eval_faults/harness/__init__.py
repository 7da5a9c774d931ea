"""The lm-eval side: the `faulty_hf` model, the import hook that registers it, one model loader.

Kept free of imports: the import hook (`autoload`) runs in every interpreter at start-up.
"""
