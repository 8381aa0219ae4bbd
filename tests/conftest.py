"""Test configuration.

Without a GPU the Triton kernels run on CPU tensors through the Triton interpreter, which must be
switched on before any ``@triton.jit`` function is defined - hence before modkern's kernels are
imported. With a GPU the same tests run on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from modkern.backend import available_backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)
ALL_BACKENDS = ("torch", "triton", "cuda")


def backend_params():
    """Every backend as a pytest param; those that cannot run here are skipped with the reason."""
    params = []
    for b in ALL_BACKENDS:
        marks = []
        if b not in BACKENDS:
            reason = {
                "triton": "triton is not installed or cannot run on this device",
                "cuda": "the modkern._C CUDA extension is not built (needs a CUDA machine)",
            }.get(b, "unavailable")
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(b, marks=marks, id=b))
    return params


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
