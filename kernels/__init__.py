"""Triton kernels of modkern, installed as ``modkern.kernels``.

One module per op family. Importing a module defines its ``@triton.jit`` kernels, so on a machine
without a GPU ``TRITON_INTERPRET=1`` must be set before the import (modkern imports these modules
lazily, on first use of ``backend="triton"``).
"""
