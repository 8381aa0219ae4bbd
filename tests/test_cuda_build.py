"""The CUDA C++ backend (csrc/, modkern._C): build logic, fallbacks, compile checks, GPU paths.

* CPU-runnable: setup.py installs no extension without a CUDA build of torch (and explains a
  forced build), the build lists every csrc source with the Hopper + portable targets,
  ``backend="cuda"`` fails with instructions and ``available_backends`` leaves it out when the
  extension is missing, and importing the CUDA backend modules never needs the extension.
* Compile checks (skipped with the reason when the tool is missing): the torch-free ``.cu`` files
  of csrc/ compile with nvcc for sm_90a with no register spill (ptxas -v), and the torch glue
  (``*.cpp``) parses against torch's headers with g++. ``MODKERN_COMPILE_CHECKS``: ``quick``
  (default; one element type per kernel family - every kernel template, ~30 s on 2 cores),
  ``full`` (every file and the standalone harness, ~60-90 s on 2 cores) or ``0`` (skip).
* GPU (skipped unless modkern._C is built and a GPU is present): every launch shape of the
  divergence forward (shared-memory rows with clusters of 1/2/4/8 blocks, streamed rows, scalar
  accesses) against the torch backend. The op-level tests (test_divergence.py, test_adv_step.py,
  test_perturb.py) cover the rest through ``backend_params()``.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICE

import modkern
from modkern.ops.dispatch import available_backends, cuda_extension_available

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HAS_EXT = cuda_extension_available()
COMPILE_CHECKS = os.environ.get("MODKERN_COMPILE_CHECKS", "quick").strip().lower()
# Quick mode: the dispatch units, one element type of each kernel family (the templates are the
# same code for every type), perturb (all types in one unit).
QUICK_SOURCES = (
    "device_info.cu",
    "divergence.cu",
    "divergence_bf16.cu",
    "adv_step.cu",
    "adv_step_f32.cu",
    "perturb.cu",
)


def _run_setup(monkeypatch, build_flag, fake_cuda=False):
    """Execute setup.py with setuptools.setup captured; returns its keyword arguments."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    if build_flag is None:
        monkeypatch.delenv("MODKERN_BUILD_CUDA", raising=False)
    else:
        monkeypatch.setenv("MODKERN_BUILD_CUDA", build_flag)
    if fake_cuda:  # pretend to be a CUDA build of torch; CUDAExtension records its arguments
        import torch.utils.cpp_extension as cpp

        monkeypatch.setattr(torch.version, "cuda", "13.0")
        monkeypatch.setattr(cpp, "CUDA_HOME", "/usr/local/cuda")
        monkeypatch.setattr(
            cpp, "CUDAExtension", lambda name, sources, **kw: SimpleNamespace(name=name, sources=sources, **kw)
        )
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    return captured


# ------------------------------------------------------------------------------------------------
# Build logic and fallbacks (CPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build: setup.py builds the extension")
@pytest.mark.parametrize("flag", [None, "auto", "0"])
def test_setup_without_cuda_installs_no_extension(monkeypatch, flag):
    kw = _run_setup(monkeypatch, flag)
    assert kw["ext_modules"] == [] and kw["cmdclass"] == {}
    assert "modkern" in kw["packages"] and "modkern.kernels" in kw["packages"]


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch is a CUDA build")
def test_forced_build_on_cpu_torch_explains(monkeypatch):
    with pytest.raises(RuntimeError, match="CPU-only build.*CUDA build of torch"):
        _run_setup(monkeypatch, "1")


def test_cuda_build_lists_every_source_and_target(monkeypatch):
    kw = _run_setup(monkeypatch, "1", fake_cuda=True)
    (ext,) = kw["ext_modules"]
    assert ext.name == "modkern._C"
    want = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*") if p.suffix in (".cu", ".cpp"))
    assert sorted(ext.sources) == want
    assert "csrc/bindings.cpp" in ext.sources and "csrc/divergence_f32.cu" in ext.sources
    assert not any("tools" in s for s in ext.sources)  # the standalone harness is not built
    nvcc = ext.extra_compile_args["nvcc"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in nvcc
    assert any("code=sm_80" in f for f in nvcc) and "-std=c++17" in nvcc
    assert "build_ext" in kw["cmdclass"]


@pytest.mark.skipif(HAS_EXT, reason="modkern._C is built here")
def test_backend_cuda_explains_how_to_build():
    p = torch.randn(2, 16)
    q = torch.randn(2, 16)
    for call in (
        lambda: modkern.fused_js(p, q, backend="cuda"),
        lambda: modkern.fused_kl(p, q, backend="cuda"),
        lambda: modkern.masked_adv_step(
            torch.zeros(1, 2, 4),
            torch.ones(1, 2, 4),
            torch.ones(1, 2, dtype=torch.bool),
            alpha=0.1,
            epsilon=0.1,
            backend="cuda",
        ),
        lambda: modkern.perturb(
            torch.zeros(1, 2, 4), torch.ones(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), backend="cuda"
        ),
    ):
        with pytest.raises(RuntimeError, match=r"modkern\._C extension was not built.*pip install"):
            call()
    from modkern.ops.cuda_ext import ext

    with pytest.raises(RuntimeError, match="MODKERN_BUILD_CUDA=1 pip install --no-build-isolation"):
        ext()


@pytest.mark.skipif(HAS_EXT, reason="modkern._C is built here")
def test_available_backends_exclude_cuda_without_extension():
    assert "cuda" not in available_backends("cpu")
    assert "cuda" not in available_backends("cuda")
    assert "cuda" not in available_backends(DEVICE)
    # "auto" never picks it
    assert modkern.resolve_backend("auto", torch.device("cuda"), "divergence") in ("triton", "torch")


def test_cuda_backend_modules_import_without_extension():
    # The wrappers import lazily through modkern.ops.dispatch.cuda_extension(): no ImportError here.
    import modkern.ops.adv_step.cuda_impl as adv
    import modkern.ops.divergence.cuda_impl as div
    import modkern.ops.perturb.cuda_impl as pert

    assert div.KIND_IDS == {"js": 0, "kl_forward": 1, "kl_reverse": 2, "kl_symmetric": 3}
    assert adv.STEP_CODES == {"raw": 0, "sign": 1, "l2": 2, "l2_token": 3, "linf": 4}
    assert adv.NORM_CODES == {"none": 0, "linf": 1, "l2": 2, "l2_token": 3}
    assert callable(pert.forward) and callable(pert.backward)


def test_cuda_codes_match_the_kernels_headers():
    """The Python code tables and the C++ enums agree (csrc/divergence.h, csrc/adv_step.h)."""
    import modkern.ops.adv_step.cuda_impl as adv
    import modkern.ops.divergence.cuda_impl as div

    div_h = (CSRC / "divergence.h").read_text()
    adv_h = (CSRC / "adv_step.h").read_text()
    enum = dict(re.findall(r"k(\w+) = (\d+)", div_h + adv_h))
    assert {k: int(v) for k, v in enum.items() if k in ("JS", "KLForward", "KLReverse", "KLSymmetric")} == {
        "JS": div.KIND_IDS["js"],
        "KLForward": div.KIND_IDS["kl_forward"],
        "KLReverse": div.KIND_IDS["kl_reverse"],
        "KLSymmetric": div.KIND_IDS["kl_symmetric"],
    }
    steps = {"StepRaw": "raw", "StepSign": "sign", "StepL2": "l2", "StepL2Token": "l2_token", "StepLinf": "linf"}
    norms = {"NormNone": "none", "NormLinf": "linf", "NormL2": "l2", "NormL2Token": "l2_token"}
    for c, name in steps.items():
        assert int(enum[c]) == adv.STEP_CODES[name]
    for c, name in norms.items():
        assert int(enum[c]) == adv.NORM_CODES[name]


# ------------------------------------------------------------------------------------------------
# Compile checks (nvcc for the kernels, g++ for the torch glue)
# ------------------------------------------------------------------------------------------------

_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _nvcc_compile(src: Path, out_dir: Path):
    cmd = [
        shutil.which("nvcc"),
        "-std=c++17",
        "-O3",
        "--use_fast_math",
        # the macros torch's BuildExtension adds: no implicit half / bfloat16 conversions
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-Xptxas=-v",
        f"-I{CSRC}",
        "-c",
        str(src),
        "-o",
        str(out_dir / (src.stem + ".o")),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return src, proc


def _glue_parse(out_dir: Path):
    """g++ -fsyntax-only of all torch glue files at once (one parse of torch/extension.h)."""
    from torch.utils.cpp_extension import include_paths

    stub = out_dir / "stub"
    macros = Path(include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.exists():  # CPU wheels lack this generated header; an empty one suffices to parse
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    unity = out_dir / "glue.cpp"
    unity.write_text("".join(f'#include "{p.name}"\n' for p in sorted(CSRC.glob("*.cpp"))))
    cuda_inc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    cmd = [shutil.which("g++"), "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror"]
    cmd += ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{CSRC}"]
    for inc in [stub, *include_paths(), sysconfig.get_paths()["include"], cuda_inc]:
        cmd += ["-isystem", str(inc)]
    return subprocess.run([*cmd, str(unity)], capture_output=True, text=True)


def _spills(ptxas_log: str):
    """(kernel, arch) of every entry function with a stack frame or spills."""
    bad, entry = [], None
    for line in ptxas_log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            entry = m.groups()
            continue
        m = _PTXAS_SPILL.search(line)
        if m and entry is not None and any(int(x) for x in m.groups()):
            bad.append((entry, m.group(0)))
    return bad


@pytest.mark.skipif(COMPILE_CHECKS in ("0", "no", "off"), reason="MODKERN_COMPILE_CHECKS=0")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
def test_kernels_compile_for_hopper_without_spills(tmp_path):
    if COMPILE_CHECKS == "full":
        sources = sorted(CSRC.glob("*.cu")) + [CSRC / "tools" / "standalone_check.cu"]
    else:
        sources = [CSRC / name for name in QUICK_SOURCES]
    # Longest jobs first (the divergence units), so that the pool finishes together.
    sources.sort(key=lambda p: (not p.name.startswith("divergence_"), p.name))
    can_parse_glue = shutil.which("g++") is not None and (CSRC / "bindings.cpp").exists()
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        glue = pool.submit(_glue_parse, tmp_path) if can_parse_glue else None
        results = list(pool.map(lambda s: _nvcc_compile(s, tmp_path), sources))
        glue_proc = glue.result() if glue is not None else None
    entries = 0
    for src, proc in results:
        assert proc.returncode == 0, f"nvcc failed on {src.name}:\n{proc.stderr[-4000:]}"
        assert "warning" not in proc.stderr.lower(), f"{src.name}:\n{proc.stderr[-4000:]}"
        assert _spills(proc.stderr) == [], f"{src.name}: register spills {_spills(proc.stderr)}"
        entries += len(_PTXAS_ENTRY.findall(proc.stderr))
    assert entries >= (150 if COMPILE_CHECKS == "full" else 70)  # every instantiation went through ptxas
    if glue_proc is not None:
        assert glue_proc.returncode == 0, f"torch glue does not parse:\n{glue_proc.stderr[-4000:]}"


# ------------------------------------------------------------------------------------------------
# GPU: every launch shape of the divergence forward (needs the built extension)
# ------------------------------------------------------------------------------------------------

needs_ext = pytest.mark.skipif(
    not (HAS_EXT and torch.cuda.is_available()), reason="the modkern._C CUDA extension is not built (needs a GPU)"
)

# (cluster, cache, threads): auto; streamed rows one block per row / 4-block clusters; shared-memory
# rows in clusters of 1, 2, 4, 8 blocks; 128 threads.
TUNINGS = [(0, -1, 0), (1, 0, 0), (4, 0, 0), (1, 1, 0), (2, 1, 0), (4, 1, 0), (8, 1, 0), (1, 1, 128)]


@needs_ext
def test_device_info():
    info = modkern.ops.dispatch.cuda_extension().device_info(torch.cuda.current_device())
    assert info["sm_count"] > 0 and info["l2_bytes"] > 0 and info["smem_optin"] >= 48 * 1024
    assert info["cluster_launch"] == (info["cc"][0] >= 9)


@needs_ext
@pytest.mark.parametrize("tuning", TUNINGS, ids=lambda t: f"c{t[0]}_m{t[1]}_t{t[2]}")
@pytest.mark.parametrize("kind", ["js", "kl_forward", "kl_reverse", "kl_symmetric"])
@pytest.mark.parametrize("dtype,vocab", [(torch.float32, 4096), (torch.bfloat16, 8200), (torch.bfloat16, 1003)])
def test_divergence_launch_shapes_match_torch(tuning, kind, dtype, vocab):
    ext = modkern.ops.dispatch.cuda_extension()
    info = ext.device_info(torch.cuda.current_device())
    cluster, cache, threads = tuning
    if cluster > 1 and not info["cluster_launch"]:
        pytest.skip("thread-block clusters need sm_90")
    fn = modkern.fused_js if kind == "js" else modkern.fused_kl
    kw = {"beta": 0.3} if kind == "js" else {"direction": kind[3:]}
    for use_ref in (False, True):
        p = (torch.randn(5, vocab, device="cuda") * 3).to(dtype).requires_grad_()
        q = (torch.randn(7 if use_ref else 5, vocab, device="cuda") * 3).to(dtype).requires_grad_()
        ref_index = torch.tensor([0, 2, 2, 4, 1, 0, 2], device="cuda") if use_ref else None
        mask = torch.rand(q.shape[0], device="cuda") > 0.3
        w = torch.rand(q.shape[0], device="cuda") + 0.5
        outs = {}
        for backend in ("torch", "cuda"):
            ext.divergence_set_tuning(cluster, cache, threads)
            try:
                rows = fn(
                    p, q, mask=mask, ref_index=ref_index, reduction="none", temperature=1.3, backend=backend, **kw
                )
                grads = torch.autograd.grad((rows * w).sum(), [p, q])
                launch = ext.divergence_last_launch()
            finally:
                ext.divergence_set_tuning(0, -1, 0)
            outs[backend] = (rows, grads)
        if cluster:
            assert launch["cluster"] == cluster
        if cache >= 0:
            assert launch["cached"] == cache
        assert launch["vec"] == (1 if vocab % (16 // p.element_size()) else 16 // p.element_size())
        torch.testing.assert_close(outs["cuda"][0], outs["torch"][0], rtol=2e-5, atol=2e-6)
        rtol = 1e-4 if dtype == torch.float32 else 1.6e-2
        for g, g_ref in zip(outs["cuda"][1], outs["torch"][1]):
            atol = rtol * g_ref.float().abs().max().item() + 1e-10
            torch.testing.assert_close(g.float(), g_ref.float(), rtol=rtol, atol=atol)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
