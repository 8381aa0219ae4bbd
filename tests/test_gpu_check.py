"""``benchmarks/gpu_check.sh --dry-run``: the GPU session's one command plans and runs its CPU side.

The dry run checks the script's syntax, writes the environment record, collects every benchmark
selection at the GPU shapes (a selection that collects nothing fails), collects the CUDA test
stage and folds the committed CPU results through ``benchmarks/report.py`` - without a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]
    for stage in ("build", "div", "pgd", "e2e", "tests", "div-cuda", "baselines"):
        assert f"PLAN {stage} " in proc.stdout, stage
    assert "collects 0 " not in proc.stdout
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"torch", "triton", "cuda", "git_commit", "device_name", "stages"} <= set(record)
    # the stage order puts the headline numbers first
    out = proc.stdout
    assert out.index("PLAN div ") < out.index("PLAN pgd ") < out.index("PLAN e2e ") < out.index("PLAN tests ")
