"""Install (issue 13): triton is not a requirement; `import modkern`, the ops and the CPU demo work
without it, and asking for the Triton backend then says what is missing."""

import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter where `import triton` fails as if it were not installed.
WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # importlib: "not installed"; `import triton` raises ImportError

import torch
import modkern

p, q = torch.randn(3, 16), torch.randn(3, 16)
assert torch.isfinite(modkern.fused_kl(p, q))
try:
    modkern.fused_kl(p, q, backend="triton")
except RuntimeError as exc:
    print("TRITON ERROR:", exc)
else:
    raise SystemExit("backend='triton' ran without triton")

from modkern.apps.demo import DemoConfig, run_demo

out = run_demo(DemoConfig(quick=True, steps=1, methods=("modkern",), out=sys.argv[1], progress=False,
                          save_checkpoints=False), log=lambda *a: None)
assert set(out["summary"]) == {"modkern"}
assert not any(name == "triton" or name.startswith("triton.") for name, m in sys.modules.items() if m is not None)
print("OK")
"""


def test_modkern_and_the_cpu_demo_work_without_triton(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WITHOUT_TRITON), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    expected = "TRITON ERROR: backend='triton' requested but the 'triton' package is not installed: pip install"
    assert expected in proc.stdout


def test_triton_is_an_extra_not_a_requirement(monkeypatch):
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.setenv("MODKERN_BUILD_CUDA", "0")
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    assert not any(r.startswith("triton") for r in captured["install_requires"])
    extras = captured["extras_require"]
    for extra in ("triton", "test"):
        assert any(r.startswith("triton") for r in extras[extra]), extra
    assert not any(r.startswith("triton") for r in extras["demo"])
