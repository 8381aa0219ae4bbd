"""Thin Python interface over the compiled CUDA extension ``modkern._C`` (built from ``csrc/``)."""
