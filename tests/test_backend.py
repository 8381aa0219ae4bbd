"""Backend dispatch (modkern.ops.dispatch): which implementation module runs a call."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from modkern.ops.dispatch import KERNEL_DTYPES, available_backends, load_impl

needs_triton = pytest.mark.skipif(
    "triton" not in available_backends(DEVICE), reason="Triton cannot run here (no GPU and no interpreter)"
)


def test_torch_backend_takes_every_dtype():
    for dtype in (*KERNEL_DTYPES, torch.float64):
        for op in ("divergence", "adv_step", "perturb"):
            assert load_impl(op, "torch", DEVICE, (dtype,)).__name__ == f"modkern.ops.{op}.torch_impl"


@needs_triton
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_triton_backend_runs_its_kernel_dtypes(dtype):
    for op in ("divergence", "adv_step", "perturb"):
        assert load_impl(op, "triton", DEVICE, (dtype, dtype)).__name__ == f"modkern.kernels.{op}"


@needs_triton
def test_float64_divergence_goes_to_torch_while_fp64_kernels_stay():
    # the divergence kernels accumulate in fp32 and declare SUPPORTED_DTYPES; the PGD step and
    # perturb kernels have an fp64 path of their own
    assert load_impl("divergence", "triton", DEVICE, (torch.float64, torch.float64)).__name__ == (
        "modkern.ops.divergence.torch_impl"
    )
    assert load_impl("divergence", "triton", DEVICE, (torch.float32, torch.float64)).__name__ == (
        "modkern.ops.divergence.torch_impl"
    )
    assert load_impl("adv_step", "triton", DEVICE, (torch.float64,)).__name__ == "modkern.kernels.adv_step"
    assert load_impl("perturb", "triton", DEVICE, (torch.float64,)).__name__ == "modkern.kernels.perturb"


def test_cuda_backends_declare_their_dtypes():
    from modkern.ops.dispatch import SUPPORTED_DTYPES

    for op in ("adv_step", "perturb"):
        assert SUPPORTED_DTYPES[(op, "cuda")] == KERNEL_DTYPES
    # the CUDA divergence kernels store the forward's gradients in the logits' dtype; fp16 needs
    # fp32 there (saved_grad_dtype), so fp16 runs the PyTorch backend
    assert SUPPORTED_DTYPES[("divergence", "cuda")] == (torch.float32, torch.bfloat16)
    assert SUPPORTED_DTYPES[("divergence", "triton")] == KERNEL_DTYPES
    for op in ("adv_step", "divergence", "perturb"):
        assert torch.float64 not in SUPPORTED_DTYPES[(op, "cuda")]
        assert "torch" not in {b for o, b in SUPPORTED_DTYPES if o == op}  # PyTorch takes every dtype


def test_every_divergence_backend_has_the_one_read_entry_points():
    # grad_mode="forward" calls forward_with_grads / scale_ on whichever backend runs (no hasattr)
    import modkern.ops.divergence.cuda_impl as cuda_impl
    import modkern.ops.divergence.torch_impl as torch_impl

    modules = [torch_impl, cuda_impl]
    if "triton" in available_backends(DEVICE):
        modules.append(load_impl("divergence", "triton", DEVICE, (torch.float32,)))
    for module in modules:
        assert callable(module.forward_with_grads) and callable(module.scale_), module.__name__


def test_call_impl_makes_the_tensors_device_current(monkeypatch):
    # Triton launches on the *current* CUDA device: the ops make the tensors' device current
    import modkern.ops.dispatch as B

    entered = []

    class Guard:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Guard)
    assert isinstance(B.device_guard(torch.device("cpu")), type(B.contextlib.nullcontext()))
    B.device_guard(torch.device("cuda", 1))
    assert entered == [torch.device("cuda", 1)]
    out = B.call_impl(
        "perturb",
        "forward",
        "torch",
        torch.device("cpu"),
        (torch.float32,),
        torch.ones(2, 3),
        torch.ones(2, 3),
        torch.ones(2, dtype=torch.bool),
    )
    assert torch.equal(out, torch.full((2, 3), 2.0))
