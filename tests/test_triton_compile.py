"""The Triton kernels compile for the H100 / H200 target (sm_90) on a machine without a GPU.

The other tests run the kernels in the Triton interpreter, which accepts some programs the real
compiler rejects (this check found a loop-carried fp32 accumulator that fp64 inputs turned into
fp64). ``triton_compile_check.py`` drives every launcher through a compile-only driver in a fresh
process (the interpreter is set for this one), compiling each specialization to a cubin; then
``ptxas -v`` reports registers and spills.

``MODKERN_COMPILE_CHECKS`` (shared with test_cuda_build.py): ``quick`` (default; every kernel and
option in bf16 plus a few cases in the other dtypes, about a minute on 2 cores), ``full`` (every
dtype x option combination) or ``0`` (skip). On a CUDA machine the kernels run for real in the
op tests, so this check is skipped there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("triton_compile_check.py")
MODE = os.environ.get("MODKERN_COMPILE_CHECKS", "quick").strip().lower()


def _nvidia_backend_missing() -> str:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
        import triton.backends.nvidia.driver  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the triton build
        return f"triton's NVIDIA backend is not importable: {exc}"
    return ""


@pytest.mark.skipif(MODE == "0", reason="MODKERN_COMPILE_CHECKS=0")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the op tests run the compiled kernels")
@pytest.mark.skipif(bool(_nvidia_backend_missing()), reason=_nvidia_backend_missing() or "n/a")
def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, str(SCRIPT), "--arch", "90", "--json", str(report_path)]
    if MODE == "full":
        cmd.append("--full")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    report = json.loads(report_path.read_text())
    summary, kernels = report["summary"], report["kernels"]
    assert summary["failed_cases"] == []
    # every kernel family was reached and went through ptxas
    names = {k["kernel"] for k in kernels}
    assert {
        "_divergence_fwd_kernel",
        "_divergence_grad_p_shared_kernel",
        "_divergence_bwd_kernel",
        "_adv_stats_kernel",
        "_adv_update_kernel",
        "_perturb_fwd_kernel",
        "_perturb_bwd_kernel",
    } <= names
    assert all(k["registers"] and k["registers"] <= 255 for k in kernels)
    spilling = [k for k in kernels if k["spill_store_bytes"] or k["spill_load_bytes"]]
    assert not spilling, f"register spills on sm_90: {spilling}"
