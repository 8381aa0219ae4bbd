"""Constants shared by the library, its backends and the Triton kernels (a leaf module: it imports
only torch, so ``kernels/`` can use it without importing the rest of modkern)."""

from __future__ import annotations

import torch

# The label of a position that is not an answer token (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100

# Element types of GPU kernels written for fp32 accumulation of 16/32-bit inputs (what
# the ops register for them in modkern.ops.dispatch; other inputs, float64, run the PyTorch backend).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The divergence kinds every backend implements, with the integer code the Triton and CUDA kernels
# take (csrc/divergence_kernels.cuh's enum follows this order; tests/test_cuda_build.py checks it).
DIVERGENCE_KIND_IDS: dict[str, int] = {"js": 0, "kl_forward": 1, "kl_reverse": 2, "kl_symmetric": 3}

# The per-row statistics the divergence forward stores for its backward:
# (shift_a, logsum_a, shift_b, logsum_b, S_P, S_Q).
STATS_WIDTH = 6

# The PGD step directions and projections, with the integer codes of the Triton and CUDA kernels
# (csrc/adv_step_kernels.cuh's enums follow these; tests/test_cuda_build.py checks them).
STEP_CODES = {"raw": 0, "sign": 1, "l2": 2, "l2_token": 3, "linf": 4}
NORM_CODES = {"none": 0, "linf": 1, "l2": 2, "l2_token": 3}


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype every backend accumulates in for inputs like ``t``: float64 stays float64, else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
