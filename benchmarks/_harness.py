"""Measurement machinery shared by the benchmark suites (``bench_*.py``).

One case = one provider (modkern backend, eager reference, ``torch.compile`` of the reference,
Liger) on one shape. :func:`measure` times it and records in ``benchmark.extra_info``:

- ``median_ms``: CUDA - ``triton.testing.do_bench(..., return_mode="median")`` (device events,
  L2 flushed before every call); CPU - the median of pytest-benchmark's rounds (host clock; the
  CPU run is a smoke test of the suites, not a performance claim);
- ``bytes``: the fewest bytes the op must move (SPEC §4: each input read once, each output written
  once), ``gbps`` = bytes / median, ``copy_fraction`` = gbps / the device-to-device copy bandwidth
  measured in the same session (``conftest.copy_bandwidth``);
- ``peak_mem_mb``: CUDA only - the most memory one call allocates above what was allocated
  before it (outputs and temporaries).

On CUDA, pytest-benchmark's own statistics come from a few synchronized host-timed rounds; the
report uses ``median_ms``.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"

# Filled by the session fixtures in conftest.py and written into the results JSON.
SESSION: dict = {"copy_gbps": None, "copy_bytes": None, "failures": []}

# CPU: pytest-benchmark rounds per case are chosen to fill about this many seconds.
CPU_CASE_SECONDS = float(os.environ.get("MODKERN_BENCH_CPU_SECONDS", "0.25"))


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def l2_bytes() -> int:
    if not ON_CUDA:
        return 0
    props = torch.cuda.get_device_properties(DEVICE)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def rotation_sets(bytes_per_set: int) -> int:
    """How many independent input sets to rotate so consecutive calls do not hit a warm L2."""
    l2 = l2_bytes()
    if l2 == 0 or bytes_per_set >= 4 * l2:
        return 1
    return min(8, math.ceil(4 * l2 / max(bytes_per_set, 1)))


def cycling(calls):
    """A zero-argument callable that runs ``calls[0]``, ``calls[1]``, ... round-robin."""
    it = itertools.cycle(calls)
    return lambda: next(it)()


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------

MODKERN_BACKENDS = ("torch", "triton", "cuda")


def modkern_skip_reason(backend: str) -> str | None:
    import modkern

    if backend == "triton" and not ON_CUDA:
        return "Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1), which is not a speed measurement"
    if backend == "triton" and interpreter_on():
        return "TRITON_INTERPRET=1 is set: run the benchmarks in their own pytest session, without it"
    if backend not in modkern.available_backends(DEVICE):
        if backend == "cuda":
            return "the modkern._C CUDA extension is not built (needs a CUDA machine)"
        return f"backend {backend!r} is not available on {DEVICE.type}"
    return None


def provider_params(*, op_available: str | None = None, liger: str | None = None):
    """pytest params for the providers of one op family, with skip reasons.

    ``op_available``: None when the modkern op imports, else the reason it does not (all
    ``modkern-*`` providers are then skipped). ``liger``: None to leave Liger out, else
    ``"ok"`` or the reason it cannot run.
    """
    params = []
    for b in MODKERN_BACKENDS:
        reason = op_available or modkern_skip_reason(b)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(f"modkern-{b}", marks=marks, id=f"modkern-{b}"))
    params.append(pytest.param("eager", id="eager"))
    params.append(pytest.param("compile", id="compile"))
    if liger is not None:
        marks = [] if liger == "ok" else [pytest.mark.skip(reason=liger)]
        params.append(pytest.param("liger", marks=marks, id="liger"))
    return params


def liger_status() -> str:
    """``"ok"`` when Liger's functional kernels can run here, else why not."""
    if not ON_CUDA:
        return "Liger-Kernel runs only on GPU"
    try:
        importlib.import_module("liger_kernel.transformers.functional")
    except Exception as exc:  # ImportError, or an incompatible triton
        return f"liger-kernel is not importable ({type(exc).__name__}: {exc})"
    return "ok"


def modkern_op(name: str):
    """(function, None) when ``modkern.<name>`` imports, else (None, reason)."""
    try:
        import modkern

        fn = getattr(modkern, name)
    except (ImportError, AttributeError) as exc:
        return None, f"modkern.{name} is not importable yet ({type(exc).__name__}: {exc})"
    return fn, None


_COMPILED: dict = {}


def compiled(fn):
    """``torch.compile(fn, dynamic=False)``, one wrapper per function for the whole session.

    Every (shape, dtype, requires_grad) combination is its own static graph; the recompile
    limits are raised so that dynamo does not fall back to eager after 8 of them.
    """
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def _synced(fn):
    def run():
        out = fn()
        _sync()
        return out

    return run


def peak_memory_mb(fn) -> float | None:
    """Most memory one call of ``fn`` allocates above the allocation before it (CUDA only)."""
    if not ON_CUDA:
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    out = fn()
    _sync()
    peak = torch.cuda.max_memory_allocated(DEVICE) - base
    del out
    return peak / 2**20


def _cpu_rounds(fn) -> tuple[int, float]:
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(3, min(50, int(CPU_CASE_SECONDS / dt))), dt


def measure(benchmark, fn, *, bytes_moved: int | None, info: dict):
    """Time ``fn`` (zero-argument; rotates its own inputs) and fill ``benchmark.extra_info``.

    The first call's outputs must be finite. A CUDA out-of-memory error is recorded in the
    results JSON (``modkern.failures``) and the case is skipped, so one provider that does not fit
    does not end the run.
    """
    set_group(benchmark, info)
    try:
        check_finite(fn(), info.get("provider"))  # warm-up: compilation, autotuning, allocator
        fn()
        _sync()
        peak = peak_memory_mb(fn)
        if ON_CUDA:
            import triton.testing

            median_ms = float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except torch.OutOfMemoryError as exc:
        skip_out_of_memory(info, exc)
    if ON_CUDA:
        benchmark.pedantic(_synced(fn), rounds=5, iterations=1, warmup_rounds=1)
        timer = "triton.testing.do_bench median (CUDA events, L2 flushed)"
    else:
        rounds, first = _cpu_rounds(fn)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        median_ms = 1e3 * (stats.median if stats is not None else first)
        timer = "host perf_counter median (CPU)"
    record(benchmark, median_ms=median_ms, bytes_moved=bytes_moved, peak_mem_mb=peak, timer=timer, info=info)
    return median_ms


def check_finite(out, provider):
    values = out if isinstance(out, (tuple, list)) else (out,)
    for v in values:
        assert bool(torch.isfinite(v).all()), f"{provider} produced non-finite values"


def skip_out_of_memory(info, exc):
    """Record an out-of-memory case in the results JSON and skip it."""
    message = str(exc).splitlines()[0] if str(exc) else "out of memory"
    SESSION["failures"].append({**info, "error": f"OutOfMemoryError: {message}"})
    if ON_CUDA:
        torch.cuda.empty_cache()
    pytest.skip(f"{info.get('provider')} ran out of memory at {info.get('shape')} {info.get('dtype')}")


def record(benchmark, *, median_ms, bytes_moved, peak_mem_mb, timer, info):
    gbps = bytes_moved / (median_ms * 1e-3) / 1e9 if bytes_moved and median_ms > 0 else None
    copy = SESSION.get("copy_gbps")
    benchmark.extra_info.update(info)
    benchmark.extra_info.update(
        device=DEVICE.type,
        median_ms=median_ms,
        bytes=bytes_moved,
        gbps=gbps,
        copy_gbps=copy,
        copy_fraction=(gbps / copy) if (gbps and copy) else None,
        peak_mem_mb=peak_mem_mb,
        timer=timer,
    )
    set_group(benchmark, info)


def set_group(benchmark, info):
    """Group the terminal table by case, so providers of one case sit together."""
    benchmark.group = f"{info.get('op')} {info.get('mode')} {info.get('shape')} {info.get('dtype')}"


def events_median_ms(fn, *, warmup: int, repeat: int) -> list[float]:
    """Per-call times (ms) of ``fn``: CUDA events on GPU, perf_counter after a sync on CPU."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeat):
        if ON_CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def median(values):
    return statistics.median(values)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


STEP_WORKER = Path(__file__).resolve().parent / "robust_step_worker.py"


def run_step_worker(provider: str, case: dict) -> dict:
    """``robust_step_worker.py --provider P --key value ...`` in a fresh interpreter (its peak memory
    is the provider's alone); its JSON line."""
    args = [sys.executable, str(STEP_WORKER), "--provider", provider]
    args += [x for k, v in case.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    args += ["--device", DEVICE.type, "--dtype", "bfloat16" if ON_CUDA else "float32"]
    args += ["--threads", os.environ.get("MODKERN_BENCH_MEM_THREADS", "2")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{provider} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
