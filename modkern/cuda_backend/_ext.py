"""Access to the compiled extension shared by the CUDA backend modules."""

from __future__ import annotations

import torch

from modkern.backend import cuda_extension

# Element types the CUDA kernels are instantiated for; float64 runs the PyTorch backend instead
# (exact fp64 arithmetic; not a performance path).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ext():
    """``modkern._C``, or a RuntimeError that says how to build it."""
    module = cuda_extension()
    if module is None:
        raise RuntimeError(
            "the modkern._C CUDA extension is not built. Build it on a machine with a CUDA build of torch and "
            "nvcc: `MODKERN_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .`"
        )
    return module


def kernel_dtypes(*tensors: torch.Tensor) -> bool:
    """True when every tensor has a dtype the CUDA kernels handle."""
    return all(t.dtype in KERNEL_DTYPES for t in tensors)
