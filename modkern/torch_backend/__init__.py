"""Plain-PyTorch implementations of the modkern op families (the CPU default backend)."""
