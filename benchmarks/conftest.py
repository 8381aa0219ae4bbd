"""Benchmark configuration (independent of tests/conftest.py).

- Collects ``bench_*.py`` files (``pytest benchmarks/ --benchmark-only``).
- Never sets ``TRITON_INTERPRET``: the interpreter is not a speed measurement. Triton providers
  are skipped on CPU, and on GPU too when the variable is set in the environment.
- Measures a large device-to-device copy once per session (the bandwidth ceiling every case is
  compared with).
- Writes into the results JSON (``--benchmark-json``) the device name, torch / triton /
  transformers / liger versions, the copy bandwidth and the git commit measured.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch
from _harness import DEVICE, ON_CUDA, SESSION, events_median_ms, interpreter_on, median

REPO = Path(__file__).resolve().parent.parent

# One intra-op thread on CPU (override: MODKERN_BENCH_CPU_THREADS): on a shared machine, a
# multi-threaded op waits for its slowest, descheduled thread, and the medians turn to noise.
CPU_THREADS = int(os.environ.get("MODKERN_BENCH_CPU_THREADS", "1"))


@contextlib.contextmanager
def _bench_threads():
    """Set the CPU thread count for the benchmarks only (restored for tests run in the same session)."""
    if ON_CUDA:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself already (collecting it here
    # too ran every case twice).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _copy_bandwidth_gbps() -> tuple[float, int]:
    """Device-to-device copy: (bytes read + bytes written) / median time."""
    if ON_CUDA:
        import triton.testing

        n = 2**30 // 4  # 1 GiB fp32 source, far beyond the L2
        src = torch.randn(n, device=DEVICE)
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    else:
        n = 2**26 // 4  # 64 MiB
        src = torch.randn(n)
        dst = torch.empty_like(src)
        ms = median(events_median_ms(lambda: dst.copy_(src), warmup=3, repeat=15))
    moved = 2 * n * 4
    return moved / (ms * 1e-3) / 1e9, moved


@pytest.fixture(scope="session", autouse=True)
def copy_bandwidth():
    with _bench_threads():
        gbps, moved = _copy_bandwidth_gbps()
    SESSION["copy_gbps"] = gbps
    SESSION["copy_bytes"] = moved
    return gbps


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with _bench_threads():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment_info() -> dict:
    import modkern

    info = {
        "device": DEVICE.type,
        "device_name": torch.cuda.get_device_name(DEVICE) if ON_CUDA else _cpu_name(),
        "cpu_threads": None if ON_CUDA else CPU_THREADS,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel"),
        "modkern": getattr(modkern, "__version__", None),
        "modkern_backends": modkern.available_backends(DEVICE),
        "triton_interpret": interpreter_on(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "copy_gbps": SESSION.get("copy_gbps"),
        "copy_bytes": SESSION.get("copy_bytes"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if ON_CUDA:
        props = torch.cuda.get_device_properties(DEVICE)
        info["sm_count"] = props.multi_processor_count
        info["l2_bytes"] = getattr(props, "L2_cache_size", None)
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["modkern"] = environment_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # Computed again at the end: the copy bandwidth is known only once the session ran.
    output_json["modkern"] = environment_info()
    output_json["modkern"]["failures"] = list(SESSION["failures"])
