"""Backend dispatch (modkern.ops.dispatch): which implementation module runs a call."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import modkern  # noqa: F401  (the ops register their implementations on import)
from modkern.ops.dispatch import KERNEL_DTYPES, REGISTRY, Impl, OpImpls, available_backends, register


def load_impl(op, backend, device, dtypes):
    return REGISTRY[op].load(backend, device, dtypes)


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
    def dtypes(op, backend):
        return REGISTRY[op].impls[backend].dtypes

    for op in ("adv_step", "perturb"):
        assert dtypes(op, "cuda") == KERNEL_DTYPES
        assert dtypes(op, "triton") is None  # an fp64 path of their own
    # the CUDA divergence kernels store the forward's gradients in the logits' dtype; fp16 needs
    # fp32 there (saved_grad_dtype), so fp16 runs the PyTorch backend
    assert dtypes("divergence", "cuda") == (torch.float32, torch.bfloat16)
    assert dtypes("divergence", "triton") == KERNEL_DTYPES
    for op in ("adv_step", "divergence", "perturb"):
        assert torch.float64 not in dtypes(op, "cuda")
        assert dtypes(op, "torch") is None  # PyTorch takes every dtype


def test_registry_entries_are_checked_and_fall_back_to_torch():
    with pytest.raises(ValueError, match="'torch' implementation"):
        OpImpls("x", triton=Impl("modkern.kernels.perturb"))
    with pytest.raises(ValueError, match="only backends"):
        OpImpls("x", torch=Impl("modkern.ops.perturb.torch_impl"), tpu=Impl("x"))
    only_torch = register("test-only-op", torch=Impl("modkern.ops.perturb.torch_impl"))
    try:
        # a backend the op lacks runs PyTorch, decided without importing anything
        assert only_torch.name("triton" if "triton" in available_backends(DEVICE) else "torch", DEVICE) == "torch"
        assert only_torch.load("auto", DEVICE).__name__ == "modkern.ops.perturb.torch_impl"
    finally:
        del REGISTRY["test-only-op"]


def test_every_divergence_backend_has_the_one_read_entry_points():
    # grad_mode="forward" calls forward_with_grads / scale_ on whichever backend runs (no hasattr)
    import modkern.ops.divergence.cuda_impl as cuda_impl
    import modkern.ops.divergence.torch_impl as torch_impl

    modules = [torch_impl, cuda_impl]
    if "triton" in available_backends(DEVICE):
        modules.append(load_impl("divergence", "triton", DEVICE, (torch.float32,)))
    for module in modules:
        assert callable(module.forward_with_grads) and callable(module.scale_), module.__name__


def test_ops_make_the_tensors_device_current(monkeypatch):
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
    out = torch.ops.modkern.perturb_fwd(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, dtype=torch.bool), "torch")
    assert torch.equal(out, torch.full((2, 3), 2.0))
