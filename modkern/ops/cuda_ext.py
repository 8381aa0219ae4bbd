"""Access to the compiled extension shared by the CUDA backend modules."""

from __future__ import annotations

from modkern.ops.dispatch import cuda_extension


def ext():
    """``modkern._C``, or a RuntimeError that says how to build it."""
    module = cuda_extension()
    if module is None:
        raise RuntimeError(
            "the modkern._C CUDA extension is not built. Build it on a machine with a CUDA build of torch and "
            "nvcc: `MODKERN_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .`"
        )
    return module
