"""Backend selection shared by every modkern op.

Each op has up to three implementations that must agree with the reference:

* ``"torch"``  - plain PyTorch (any device; the CPU default),
* ``"triton"`` - the Triton kernels in ``modkern.kernels`` (CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before the kernels were imported - the test mode),
* ``"cuda"``   - the CUDA C++ extension ``modkern._C`` (CUDA tensors, when it was built).

``backend="auto"`` (the default) honours the environment variable ``MODKERN_BACKEND`` when it is
set (one of ``BACKENDS``; any other value is a ValueError naming the variable), else picks
``cuda`` where it is built and preferred for the op, then ``triton`` for CUDA tensors, and
``torch`` elsewhere. Resolution happens inside the registered custom ops, so it never breaks a
``torch.compile`` graph.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

import torch

from modkern.constants import DIVERGENCE_KIND_IDS, KERNEL_DTYPES, accumulation_dtype  # noqa: F401 (re-exported)

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "MODKERN_BACKEND"

# Ops for which the CUDA extension was measured faster than Triton (see benchmarks/README.md).
# Filled in by measurement on the GPU machine; until then Triton is preferred under "auto".
CUDA_PREFERRED_OPS: frozenset[str] = frozenset()

# What ``grad_mode="auto"`` of fused_js / fused_kl runs: "backward" (the recomputing backward) or
# "forward" (the one-read forward that writes the gradients). To be set from the GPU check's
# measurement of both (benchmarks/README.md); until one exists, the mode whose forward keeps
# nothing [R, V] alive until the backward.
DIVERGENCE_GRAD_MODE_AUTO = "backward"


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the divergence forward stores its per-row gradients in for logits of ``dtype``.

    The backward only scales them by the incoming per-row gradient (which carries any loss scale),
    so they are stored unscaled: in fp16 the small entries (probabilities ~1e-5..1e-8 at V = 152k)
    would be subnormal or 0 before the scale could lift them. fp16 logits therefore keep fp32
    gradients until the backward; bf16 has fp32's exponent range and keeps its own dtype.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def check_backend(backend: str) -> str:
    """Validate a ``backend=`` argument and return it (``None`` means ``"auto"``)."""
    if backend is None:
        return "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def cuda_extension():
    """The compiled ``modkern._C`` module, or ``None`` when it was not built."""
    try:
        return importlib.import_module("modkern._C")
    except ImportError:
        return None


def cuda_extension_available() -> bool:
    return cuda_extension() is not None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    out = ["torch"]
    if triton_available() and (device.type == "cuda" or triton_interpret()):
        out.append("triton")
    if device.type == "cuda" and cuda_extension_available():
        out.append("cuda")
    return out


def resolve_backend(backend: str, device: torch.device, op: str = "") -> str:
    """Turn ``"auto"`` (or an explicit name) into the backend that runs on ``device``.

    Raises ``RuntimeError`` with instructions when an explicitly requested backend cannot run.
    """
    backend = check_backend(backend)
    if backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"the environment variable {ENV_VAR}={env!r} must be one of {BACKENDS}")
            backend = env
        elif device.type == "cuda":
            if cuda_extension_available() and op in CUDA_PREFERRED_OPS:
                return "cuda"
            return "triton" if triton_available() else "torch"
        else:
            return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' requested but the 'triton' package is not installed: "
                "pip install 'modkern[triton]' (Linux; torch's CUDA builds include it), or use backend='torch'"
            )
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got device {device}); on CPU set "
                "TRITON_INTERPRET=1 before importing modkern to run the kernels in the interpreter"
            )
    elif backend == "cuda":
        if cuda_extension() is None:
            raise RuntimeError(
                "backend='cuda' requested but the modkern._C extension was not built. Build it on a "
                "machine with a CUDA build of torch and nvcc: "
                "`MODKERN_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .`"
            )
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got device {device}")
    return backend


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of an op family.

    ``module``: where it lives, imported on first use (the Triton kernels must be defined after
    ``TRITON_INTERPRET`` is read); every backend module of a family exposes the same functions with
    the same signatures. ``dtypes``: the element types its kernels take, or None for every dtype; a
    call with another dtype runs the PyTorch backend (exact fp64 arithmetic, not a performance path).
    """

    module: str
    dtypes: Optional[tuple[torch.dtype, ...]] = None

    def load(self):
        return importlib.import_module(self.module)


class OpImpls:
    """The registry entry of one op family: its implementation per backend, registered once by the
    op's ``api.py`` (:func:`register`) and asked at every call which one runs."""

    def __init__(self, op: str, **impls: Impl):
        unknown = set(impls) - set(BACKENDS[1:])
        if "torch" not in impls or unknown:
            raise ValueError(
                f"op {op!r}: a 'torch' implementation and only backends of {BACKENDS[1:]}, got {sorted(impls)}"
            )
        self.op = op
        self.impls = dict(impls)

    def name(self, backend: str, device: torch.device, dtypes=()) -> str:
        """The backend that runs a call (``dtypes``: the element types of its floating inputs /
        outputs), decided without importing it: :func:`resolve_backend`, then the PyTorch backend
        for a backend this op lacks or a dtype its kernels do not take."""
        name = resolve_backend(backend, device, self.op)
        impl = self.impls.get(name)
        if impl is None or (impl.dtypes is not None and any(d not in impl.dtypes for d in dtypes)):
            return "torch"
        return name

    def load(self, backend: str, device: torch.device, dtypes=()):
        """The implementation module that runs the call (see :meth:`name`)."""
        return self.impls[self.name(backend, device, dtypes)].load()


REGISTRY: dict[str, OpImpls] = {}


def register(op: str, **impls: Impl) -> OpImpls:
    """Register op family ``op``'s implementations (``torch=Impl(...)``, ``triton=...``, ``cuda=...``);
    a second registration (a reloaded module) replaces the first."""
    REGISTRY[op] = OpImpls(op, **impls)
    return REGISTRY[op]


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device (Triton launches on the current device, not on the
    tensors'); a no-op context elsewhere."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
