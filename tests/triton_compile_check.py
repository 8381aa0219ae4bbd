"""Compile every Triton kernel for a real GPU target on a machine without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python bodies through numpy; it
accepts programs the real compiler rejects (type mismatches between ``tl.where`` branches, loop-
carried values that change dtype, bad constexpr use, too much shared memory...). This script drives
the real launchers of ``modkern.kernels`` with a compile-only driver: each launch compiles its
specialization to PTX and a cubin for ``sm_<arch>`` (``ptxas`` included) and returns without
running anything. Then ``ptxas -v`` reports registers and spills per kernel.

    python tests/triton_compile_check.py [--arch 90] [--full] [--json out.json]

Without ``--full`` it compiles every kernel and option in bf16 and a few cases in the other dtypes
(about a minute); ``--full`` every combination.

Exit status 1 if a kernel fails to compile (its error printed), else 0. Spills are reported, not
fatal (the caller decides). Must run in a process without ``TRITON_INTERPRET`` (the kernels are
compiled as they are defined).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, not interpret

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver, CudaLauncher  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class CompileOnlyDriver(CudaDriver):
    """A CUDA driver for a fixed target that needs no GPU: launches compile and stop there."""

    def __init__(self, capability: int):
        self.capability = capability
        self.launcher_cls = CudaLauncher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.capability, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    @staticmethod
    def is_active():
        return True


COMPILED: list = []


def _compile_only_run(original):
    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.append((self.fn.__name__, kernel))
        return kernel

    return run


# ------------------------------------------------------------------------------------------------
# the launches: every specialization the ops can ask for, at the realistic sizes of SPEC §3 (the
# block sizes and warps depend on V and H)


def divergence_cases(full: bool):
    from modkern.kernels import divergence as kd

    kinds = ("js", "kl_forward", "kl_reverse", "kl_symmetric")
    grads = ((True, True), (False, True), (True, False))
    # V = 152064 and 32064 share one specialization (block 4096, V % 16 == 0); V = 1000 has a
    # smaller block and fewer warps.
    for vocab in (152064, 1000):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for kind in kinds:
                for gp, gq in grads:
                    for with_ref, with_mask in ((False, False), (True, True)):
                        core = dtype == torch.bfloat16 or (kind in ("js", "kl_forward") and gp and gq)
                        if not full and (not core or (vocab == 1000 and with_ref)):
                            continue
                        name = f"divergence {kind} V={vocab} {dtype} grad_p={gp} grad_q={gq} ref={with_ref}"
                        yield (
                            name,
                            (
                                lambda vocab=vocab, dtype=dtype, kind=kind, gp=gp, gq=gq, r=with_ref, m=with_mask: (
                                    _divergence(kd, vocab, dtype, kind, gp, gq, r, m)
                                )
                            ),
                        )


def _divergence(kd, vocab, dtype, kind, gp, gq, with_ref, with_mask):
    from modkern.ops.divergence import DivergenceSpec

    rows = 4
    p = torch.randn(2 if with_ref else rows, vocab, dtype=dtype)
    q = torch.randn(rows, vocab, dtype=dtype)
    ref = torch.tensor([0, 1, 0, 1]) if with_ref else None
    mask = torch.tensor([True, False, True, True]) if with_mask else None
    spec = DivergenceSpec.of(kind, 0.5, 1.0, gp, gq)
    loss, stats, saved_p, saved_q = kd.forward(p, q, ref, mask, spec)
    stats.uniform_()  # garbage from the compile-only launch: keep the host-side code sane
    kd.backward(torch.ones(rows), p, q, ref, mask, stats, saved_p, saved_q, spec)
    # grad_mode="forward": the one-read kernel (no P gradient shared through ref_index) and its scale
    if not (gp and with_ref) and dtype != torch.float16:
        _, gp_out, gq_out = kd.forward_with_grads(p, q, ref, mask, torch.ones(()), spec)
        kd.scale_(torch.full((), 2.0), *(g for g in (gp_out, gq_out) if g.numel()))


def adv_step_cases(full: bool):
    from modkern.kernels import adv_step as ka

    for step in ka.STEP_CODES:
        for norm in ka.NORM_CODES:
            for delta_dtype, grad_dtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)):
                if not full and delta_dtype == torch.bfloat16 and (step, norm) not in (("raw", "linf"), ("l2", "l2")):
                    continue
                yield (
                    (f"adv_step {step}+{norm} delta={delta_dtype} grad={grad_dtype}"),
                    (lambda s=step, n=norm, dd=delta_dtype, gd=grad_dtype: _adv_step(ka, s, n, dd, gd, False)),
                )
    yield (
        "adv_step raw+linf, tensor alpha/epsilon",
        lambda: _adv_step(ka, "raw", "linf", torch.float32, torch.bfloat16, True),
    )
    yield (
        "adv_step l2+l2 fp16 grad, odd H",
        lambda: _adv_step(ka, "l2", "l2", torch.float32, torch.float16, False, hidden=3584),
    )
    for step, norm in (("raw", "linf"), ("l2_token", "l2_token"), ("l2", "l2")):
        # H above MAX_BLOCK_H: the kernels loop over H chunks (a second code path)
        yield (
            f"adv_step {step}+{norm} H=12288 (H chunks)",
            lambda s=step, n=norm: _adv_step(ka, s, n, torch.float32, torch.bfloat16, False, hidden=12288),
        )
    yield "adv_step l2+l2 fp64", lambda: _adv_step(ka, "l2", "l2", torch.float64, torch.float64, True, hidden=1000)


def _adv_step(ka, step, norm, delta_dtype, grad_dtype, tensor_scalars, hidden=4096):
    B, L = 2, 1000
    delta = torch.zeros(B, L, hidden, dtype=delta_dtype)
    grad = torch.randn(B, L, hidden, dtype=grad_dtype)
    mask = torch.rand(B, L) < 0.5
    alpha_t = torch.tensor(0.1) if tensor_scalars else None
    epsilon_t = torch.tensor(1e-3) if tensor_scalars else None
    ka.step(delta, grad, mask, delta, 0.1, alpha_t, 1e-3, epsilon_t, step, norm)


def perturb_cases(full: bool):
    from modkern.kernels import perturb as kp

    for embeds_dtype, delta_dtype in ((torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        for hidden in (4096, 3584):
            if not full and hidden != 4096:
                continue
            yield (
                (f"perturb embeds={embeds_dtype} delta={delta_dtype} H={hidden}"),
                (lambda e=embeds_dtype, d=delta_dtype, h=hidden: _perturb(kp, e, d, h)),
            )


def _perturb(kp, embeds_dtype, delta_dtype, hidden):
    embeds = torch.randn(2, 1000, hidden, dtype=embeds_dtype)
    delta = torch.randn(2, 1000, hidden, dtype=delta_dtype)
    mask = torch.rand(2, 1000) < 0.5
    kp.forward(embeds, delta, mask)
    kp.backward(embeds, mask, delta_dtype)


# ------------------------------------------------------------------------------------------------


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` for one kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
        path = f.name
    try:
        res = subprocess.run(
            [ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(path)
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(stores.group(1)) if stores else 0,
        "spill_load_bytes": int(loads.group(1)) if loads else 0,
    }


def global_access_widths(ptx: str) -> dict:
    """Count the global loads / stores of a kernel's PTX by width (``v4`` = 16-byte accesses)."""
    counts = {"ld_v4": 0, "ld_v2": 0, "ld_scalar": 0, "st_v4": 0, "st_v2": 0, "st_scalar": 0}
    for op, mods in re.findall(r"\b(ld|st)\.global((?:\.\w+)*)", ptx):
        width = "v4" if ".v4" in mods else ("v2" if ".v2" in mods else "scalar")
        counts[f"{op}_{width}"] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    parser.add_argument("--json", help="write the per-kernel report here")
    parser.add_argument("--only", default="", help="only cases whose name contains this")
    parser.add_argument("--full", action="store_true", help="every dtype x option combination (slower)")
    args = parser.parse_args(argv)

    driver.set_active(CompileOnlyDriver(args.arch))
    JITFunction.run = _compile_only_run(JITFunction.run)

    cases = [
        c
        for c in (*divergence_cases(args.full), *adv_step_cases(args.full), *perturb_cases(args.full))
        if args.only in c[0]
    ]
    failures, report, seen = [], [], set()
    start = time.perf_counter()
    for name, launch in cases:
        before = len(COMPILED)
        try:
            launch()
        except Exception:
            failures.append(name)
            print(f"FAILED {name}\n{traceback.format_exc()}", file=sys.stderr)
            continue
        for kernel_name, kernel in COMPILED[before:]:
            key = kernel.hash
            if key in seen:
                continue
            seen.add(key)
            entry = {
                "case": name,
                "kernel": kernel_name,
                "num_warps": kernel.metadata.num_warps,
                "shared_bytes": kernel.metadata.shared,
                **ptxas_report(kernel.asm["ptx"], args.arch),
                **global_access_widths(kernel.asm["ptx"]),
            }
            report.append(entry)
    elapsed = time.perf_counter() - start
    spilling = [e for e in report if e["spill_store_bytes"] or e["spill_load_bytes"]]
    for e in report:
        flag = "  SPILLS" if e in spilling else ""
        print(
            f"{e['kernel']:<36} warps={e['num_warps']} regs={e['registers']} smem={e['shared_bytes']} "
            f"spill={e['spill_store_bytes']}/{e['spill_load_bytes']} ld.v4={e['ld_v4']} st.v4={e['st_v4']}"
            f"{flag}  [{e['case']}]"
        )
    import triton

    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__))
    ).stdout.strip()
    summary = {
        "what": "compile-only check (no GPU, nothing ran): Triton kernels -> PTX -> cubin, ptxas -v",
        "arch": f"sm_{args.arch}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "git_commit": commit or None,
        "mode": "full" if args.full else "quick",
        "cases": len(cases),
        "failed_cases": failures,
        "kernels_compiled": len(report),
        "kernels_spilling": len(spilling),
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "kernels": report}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
