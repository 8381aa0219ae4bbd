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

from modkern.ops.dispatch import available_backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = available_backends(DEVICE)
ALL_BACKENDS = ("torch", "triton", "cuda")

# MODKERN_REQUIRE_BACKENDS="cuda,triton" (set by benchmarks/gpu_check.sh on the GPU machine): a
# test case of one of these backends that is skipped - unavailable backend, unsupported dtype, a
# pytest.skip inside the test - is reported as a failure instead, so a GPU run cannot pass with
# the kernels it was meant to check silently left out.
REQUIRED_BACKENDS = tuple(
    b.strip() for b in os.environ.get("MODKERN_REQUIRE_BACKENDS", "").split(",") if b.strip() in ALL_BACKENDS
)


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not REQUIRED_BACKENDS or not report.skipped:
        return
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    if backend in REQUIRED_BACKENDS:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        required = ",".join(REQUIRED_BACKENDS)
        report.longrepr = f"MODKERN_REQUIRE_BACKENDS={required}: the {backend} case was skipped ({reason})"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
