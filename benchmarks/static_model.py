"""Static performance model of the main Triton kernels, from their compiled sm_90 code (no GPU).

    python benchmarks/static_model.py                 # writes benchmarks/results/static_model.json
    python benchmarks/static_model.py --check         # compare with the committed JSON (CI)
    python benchmarks/static_model.py --out x.json

Each case launches the real launchers of ``modkern.kernels`` through the compile-only driver of
``tests/triton_compile_check.py`` (a cubin for sm_90a, nothing runs), disassembles every kernel
with ``cuobjdump -sass`` and reads, per kernel:

- the main loops (a backward branch ``BRA`` to an earlier address; loops with no global load
  are left out: the only one is the divergence backward's zero-fill of masked-out rows, which runs
  no iteration for an active row) or, for loop-free kernels, the whole body;
- per element of the ``[R, V]`` (or ``[B, L, H]``) grid: SASS instructions, MUFU operations
  (``MUFU.EX2`` / ``MUFU.LG2`` / ...), and global bytes loaded + stored (from the widths of
  ``LDG`` / ``STG``: ``.128`` = 16 bytes per thread), i.e. ``count x threads / elements per
  iteration``;
- registers and spills (``ptxas -v``), CTAs per SM from registers / warps / shared memory.

H200 model (one SM of 132, ``CLOCK_HZ`` 1.755 GHz sustained, boost 1.98): 4 warp schedulers x 32 =
128 thread-instructions issued per clock, 16 MUFU results per clock (sm_90), memory 4.3 TB/s
(the device-to-device copy measured on such a machine, read + write); a memory-bound kernel
needs ``BW x LATENCY / SMs`` bytes in flight per SM (800 ns) - the loads one loop iteration
issues before their first use, times the threads an SM holds. Per element:

    t_mem   = bytes / (BW x min(1, in-flight / needed))
    t_issue = instructions / (SMs x 128 x clock)
    t_mufu  = mufu / (SMs x 16 x clock)
    t       = max(t_mem, t_issue, t_mufu) / wave efficiency (last partial wave of CTAs)

``bound`` is the largest term; a kernel's ``predicted_pct_of_copy`` = bytes it moves / t over
the copy bandwidth (100% = it streams its own bytes at copy speed). The ``op total`` rows add the
kernels of one op call (forward + backward) and count SPEC §4's minimal bytes (each input read
once, each output written once), the figure the GPU benchmarks measure as "% copy": the two
compare like with like. Reuse through L2 is not modelled (V = 152064 rows are re-read from HBM:
~260 rows in flight x 608 KB > the 60 MB L2).

The one-read kernel (``_divergence_fused_kernel``, ``grad_mode="forward"``) has no loop over V: a
program holds one tile in registers from its load to its stores and waits in between for its row
partners' partials (one or two exchange rounds). Its counts are those of the code outside loops
of the kernel compiled once more without the branch that computes a missing partner's partial
from memory (which the model assumes never runs: a program enters it only after one check that a
partial is missing): the path every program takes (the loops left are the polling of the
partners' words). Its registers and occupancy are those of the kernel as launched. It gets a
fourth term, residency (Little's law): an SM holds
``CTAs x BLOCK`` elements, each for the tile's load latency, the exchange rounds and its own
instructions at the SM's issue rate:

    t_resident = (LATENCY + rounds x EXCHANGE + BLOCK x instr / (128 x clock)) / (CTAs x BLOCK x SMs)

``EXCHANGE_S`` per round = 1.5 L2 round trips (the partial's relaxed 64-bit atomic exchange
reaching L2, then one relaxed atomic poll of the row's words; ``L2_ROUND_TRIP_S`` = 0.3 us with the
memory system loaded) + 0.1 us for the row's last program (its programs start within ~1/10 of a
program's life): 0.55 us, an assumption for the GPU run to correct (``*_forward_grads`` in its
headline set). The first protocol (plain stores, a release fence, a flag, an acquire poll, a load of
the partials) was 3.5 trips (1.15 us; modelled then as 1 us).
Its backward (``_scale_inplace_kernel``) moves nothing when the incoming gradient is 1 (the
``op total`` rows); ``op total, grad != 1`` adds its read and write of every gradient.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "static_model.json"

SMS = 132
CLOCK_HZ = 1.755e9
ISSUE_PER_CLK = 128  # thread-instructions per SM per clock (4 schedulers x 32 lanes)
MUFU_PER_CLK = 16  # sm_90: ex2 / lg2 / rcp / rsqrt results per SM per clock
COPY_BPS = 4.3e12  # H200 device-to-device copy, read + write (SPEC §6)
LATENCY_S = 800e-9  # loaded HBM latency the bytes in flight must cover
# One round of the one-read kernel's partials exchange (see above): the partial's relaxed 64-bit
# atomic exchange reaches L2 (half a round trip), one relaxed atomic poll of the row's words comes
# back with them (one round trip), plus the wait for the row's last program. The first protocol
# (stores, a release fence, a flag, an acquire poll, a load of the partials: 3.5 trips) came to
# 1.15 us with the same constants (it was modelled as 1 us).
L2_ROUND_TRIP_S = 0.3e-6  # an atomic to L2 and back, with the memory system loaded (assumed)
EXCHANGE_TRIPS = 1.5
EXCHANGE_SKEW_S = 0.1e-6  # the row's programs start within ~1/10 of a program's life (assumed)
EXCHANGE_S = EXCHANGE_TRIPS * L2_ROUND_TRIP_S + EXCHANGE_SKEW_S
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 228 * 1024

R, V = 4096, 152064  # the headline divergence shape (SPEC §3)
PGD = (18, 1000, 4096)  # LLaVA-1.5-7B PGD batch

# Main kernels: a CI test fails when one of them spills or its prediction drops.
MAIN_KERNELS = ("_divergence_fwd_kernel", "_divergence_bwd_kernel", "_divergence_fused_kernel", "_adv_update_kernel")


# ------------------------------------------------------------------------------------------------
# SASS reading

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


def sass_of(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """[(address, opcode, operands)] without NOPs."""
    out = []
    for m in _INSTR.finditer(text):
        if m.group(2) == "NOP":
            continue
        out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def _access_bytes(opcode: str) -> int:
    parts = opcode.split(".")
    for width, nbytes in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if width in parts:
            return nbytes
    return 4


def body_counts(instrs, broadcast_scalars: bool = False) -> dict:
    """Counts of one loop body (per thread). ``broadcast_scalars``: a loop-free kernel whose bulk
    accesses are vectors - its <= 4-byte loads and stores are per-program scalars (a row's scale,
    a mask entry, a partial sum), not per-element traffic, and are left out of the bytes."""
    vector = any(op.startswith("LDG") and _access_bytes(op) > 4 for _, op, _ in instrs)
    vector_st = any(op.startswith("STG") and _access_bytes(op) > 4 for _, op, _ in instrs)
    counts = {"instructions": len(instrs), "mufu": 0, "ld_bytes": 0, "st_bytes": 0, "ldg": 0}
    for _, op, _ in instrs:
        if op.startswith("MUFU"):
            counts["mufu"] += 1
        elif op.startswith("LDG"):
            counts["ldg"] += 1
            if not (broadcast_scalars and vector and _access_bytes(op) <= 4):
                counts["ld_bytes"] += _access_bytes(op)
        elif op.startswith("STG"):
            if not (broadcast_scalars and vector_st and _access_bytes(op) <= 4):
                counts["st_bytes"] += _access_bytes(op)
    return counts


def loops(instrs) -> list[list]:
    """Bodies of the outermost loops (backward branches)."""
    spans = []
    for addr, op, operands in instrs:
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) <= addr:
                spans.append((int(target.group(1), 16), addr))
    outer = [s for s in spans if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in spans)]
    return [[i for i in instrs if lo <= i[0] <= hi] for lo, hi in sorted(set(outer))]


# ------------------------------------------------------------------------------------------------
# the model


def ctas_per_sm(registers: int, warps: int, shared: int) -> int:
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256  # allocation unit: 256 per warp
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_warps = MAX_WARPS_PER_SM // warps
    by_smem = SMEM_PER_SM // shared if shared else MAX_CTAS_PER_SM
    return max(0, min(by_regs, by_warps, by_smem, MAX_CTAS_PER_SM))


def model_kernel(
    name, kernel, elems_per_iter: int, programs: int, ptxas: dict, exchange_rounds=None, counted=None
) -> dict:
    """``exchange_rounds``: None for a streaming kernel (its loops over the row are the work); a
    number for the one-read kernel (the code outside loops is the work, plus the residency term).
    ``counted``: the compiled kernel whose SASS gives the counts (the one-read kernel without its
    fallback branch), when not ``kernel`` itself; registers and occupancy are ``kernel``'s."""
    warps = kernel.metadata.num_warps
    threads = warps * 32
    instrs = parse_sass(sass_of((counted or kernel).asm["cubin"]))
    if exchange_rounds is None:
        bodies = [b for b in loops(instrs) if body_counts(b)["ldg"] > 0]
    else:
        in_loops = {addr for body in loops(instrs) for addr, _, _ in body}
        bodies = [[i for i in instrs if i[0] not in in_loops]]
    loop_free = exchange_rounds is not None or not bodies
    bodies = bodies or [instrs]
    total = {"instructions": 0, "mufu": 0, "ld_bytes": 0, "st_bytes": 0}
    inflight_per_thread = 0
    for body in bodies:
        c = body_counts(body, broadcast_scalars=loop_free)
        for k in total:
            total[k] += c[k]
        inflight_per_thread = max(inflight_per_thread, c["ld_bytes"])
    per = threads / elems_per_iter
    instr_pe = total["instructions"] * per
    mufu_pe = total["mufu"] * per
    bytes_pe = (total["ld_bytes"] + total["st_bytes"]) * per
    ctas = ctas_per_sm(ptxas["registers"], warps, kernel.metadata.shared)
    needed = COPY_BPS * LATENCY_S / SMS
    inflight = inflight_per_thread * threads * ctas
    mem_eff = min(1.0, inflight / needed) if needed else 1.0
    waves = programs / max(1, SMS * ctas)
    wave_eff = waves / math.ceil(waves) if waves > 0 else 1.0
    terms = {
        "memory": bytes_pe / (COPY_BPS * max(mem_eff, 1e-9)),
        "issue": instr_pe / (SMS * ISSUE_PER_CLK * CLOCK_HZ),
        "mufu": mufu_pe / (SMS * MUFU_PER_CLK * CLOCK_HZ),
    }
    if exchange_rounds is not None:
        lifetime = LATENCY_S + exchange_rounds * EXCHANGE_S + elems_per_iter * instr_pe / (ISSUE_PER_CLK * CLOCK_HZ)
        terms["residency"] = lifetime / (max(ctas, 1) * elems_per_iter * SMS)
    bound = max(terms, key=terms.get)
    t = terms[bound] / wave_eff
    return {
        "kernel": name,
        "loops": len(bodies),
        "bytes_per_elem": round(bytes_pe, 3),
        "mufu_per_elem": round(mufu_pe, 3),
        "instr_per_elem": round(instr_pe, 2),
        "registers": ptxas["registers"],
        "spill_bytes": ptxas["spill_store_bytes"] + ptxas["spill_load_bytes"],
        "num_warps": warps,
        "ctas_per_sm": ctas,
        "occupancy_warps": ctas * warps,
        "inflight_kb_per_sm": round(inflight / 1024, 1),
        "wave_efficiency": round(wave_eff, 3),
        "t_ns_per_kelem": {k: round(v * 1e12, 4) for k, v in terms.items()},
        "bound": bound,
        "t_s_per_elem": t,
        "predicted_pct_of_copy": round(100 * bytes_pe / t / COPY_BPS, 1) if t else None,
    }


# ------------------------------------------------------------------------------------------------
# the cases


def _divergence_case(kind, grad_p, grad_q, dtype_name="bfloat16", grad_mode="backward"):
    import torch
    from modkern.kernels import divergence as kd
    from modkern.kernels import divergence_one_read as one_read

    from modkern.ops.divergence import DivergenceSpec

    dtype = getattr(torch, dtype_name)
    rows = 4  # rows are not specialized: the same kernels as R = 4096
    spec = DivergenceSpec.of(kind, 0.5, 1.0, grad_p, grad_q)
    elem = torch.empty((), dtype=dtype).element_size()
    n_grads = int(grad_p) + int(grad_q)

    def launch():
        p = torch.randn(rows, V, dtype=dtype)
        q = torch.randn(rows, V, dtype=dtype)
        if grad_mode == "forward":
            # first the kernel without its fallback branch (the path every program takes: the
            # model's counts), then the kernel as launched (its registers and occupancy)
            one_read.STATIC_MODEL_COMMON_PATH = True
            try:
                kd.forward_with_grads(p, q, None, None, torch.ones(()), spec)
            finally:
                one_read.STATIC_MODEL_COMMON_PATH = False
            _, gp, gq = kd.forward_with_grads(p, q, None, None, torch.ones(()), spec)
            kd.scale_(torch.full((), 2.0), *(g for g in (gp, gq) if g.numel()))
            return
        _, stats, gp, gq = kd.forward(p, q, None, None, spec)
        if grad_p or grad_q:
            kd.backward(torch.ones(rows), p, q, None, None, stats, gp, gq, spec)

    if grad_mode == "forward":
        block = one_read.fused_block(V, elem)
        geometry = {
            "_divergence_fused_kernel": (block, R * math.ceil(V / block), 1 + int(spec.grads_read_row_sums)),
            # per gradient tensor; only when the incoming gradient is not 1 (op total, grad != 1)
            "_scale_inplace_kernel": (one_read.SCALE_BLOCK, R * V // one_read.SCALE_BLOCK, "grad != 1"),
        }
    else:
        block = kd.block_v(V)
        chunk = block * kd.BWD_BLOCKS_PER_PROGRAM
        geometry = {"_divergence_fwd_kernel": (block, R), "_divergence_bwd_kernel": (block, R * math.ceil(V / chunk))}
    mode = "fwd" if n_grads == 0 else ("fwd_bwd_q" if n_grads == 1 else "fwd_bwd_pq")
    bench_key = {
        "op": "fused_js" if kind == "js" else "fused_kl",
        "mode": mode + ("_forward_grads" if grad_mode == "forward" else ""),
        "shape": f"R={R} V={V}",
        "dtype": dtype_name,
    }
    return launch, geometry, R * V, (2 + n_grads) * elem, bench_key


def _pgd_case(delta_dtype_name):
    import torch
    from modkern.kernels import adv_step as ka

    B, L, H = PGD
    dd = getattr(torch, delta_dtype_name)

    def launch():
        delta = torch.zeros(2, L, H, dtype=dd)
        grad = torch.randn(2, L, H, dtype=torch.bfloat16)
        mask = torch.rand(2, L) < 0.5
        ka.step(delta, grad, mask, delta, 0.1, None, 1e-3, None, "raw", "linf")

    rows, block_h, *_ = ka._tiling(L, H)
    ed = torch.empty((), dtype=dd).element_size()
    geometry = {"_adv_update_kernel": (rows * block_h, B * math.ceil(L / rows) * math.ceil(H / block_h))}
    bench_key = {
        "op": "masked_adv_step",
        "mode": "raw+linf",
        "shape": f"B={B} L={L} H={H}",
        "dtype": f"delta {delta_dtype_name}, grad bfloat16",
    }
    return launch, geometry, B * L * H, 2 * ed + 2 + 1 / H, bench_key


CASES = {
    f"fused_js fwd+bwd dP dQ, R={R} V={V} bf16": lambda: _divergence_case("js", True, True),
    f"fused_js fwd+bwd dQ, R={R} V={V} bf16": lambda: _divergence_case("js", False, True),
    f"fused_kl fwd+bwd dQ (P detached), R={R} V={V} bf16": lambda: _divergence_case("kl_forward", False, True),
    f"fused_kl fwd+bwd dP dQ, R={R} V={V} bf16": lambda: _divergence_case("kl_forward", True, True),
    f"fused_js fwd, R={R} V={V} bf16": lambda: _divergence_case("js", False, False),
    f"fused_kl fwd, R={R} V={V} bf16": lambda: _divergence_case("kl_forward", False, False),
    f"fused_kl fwd+bwd dQ (P detached), R={R} V={V} fp32": lambda: _divergence_case(
        "kl_forward", False, True, "float32"
    ),
    f"fused_js fwd+bwd dP dQ, grad_mode=forward, R={R} V={V} bf16": lambda: _divergence_case(
        "js", True, True, grad_mode="forward"
    ),
    f"fused_kl fwd+bwd dQ (P detached), grad_mode=forward, R={R} V={V} bf16": lambda: _divergence_case(
        "kl_forward", False, True, grad_mode="forward"
    ),
    f"fused_js fwd+bwd dQ, grad_mode=forward, R={R} V={V} bf16": lambda: _divergence_case(
        "js", False, True, grad_mode="forward"
    ),
    f"fused_kl fwd+bwd dP dQ, grad_mode=forward, R={R} V={V} bf16": lambda: _divergence_case(
        "kl_forward", True, True, grad_mode="forward"
    ),
    f"fused_kl fwd+bwd dQ (P detached), grad_mode=forward, R={R} V={V} fp32": lambda: _divergence_case(
        "kl_forward", False, True, "float32", grad_mode="forward"
    ),
    "masked_adv_step raw+linf 18x1000x4096, fp32 delta, bf16 grad": lambda: _pgd_case("float32"),
    "masked_adv_step raw+linf 18x1000x4096, bf16 delta, bf16 grad": lambda: _pgd_case("bfloat16"),
}


def build(arch: int = 90) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    import triton
    import triton_compile_check as tcc
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(tcc.CompileOnlyDriver(arch))
    JITFunction.run = tcc._compile_only_run(JITFunction.run)
    records = []
    for case, make in CASES.items():
        launch, geometry, elements, spec_bytes, bench_key = make()
        before = len(tcc.COMPILED)
        launch()
        op_t, scale_t = 0.0, 0.0
        compiled = tcc.COMPILED[before:]
        # the one-read kernel compiles twice: without its fallback (counted), then as launched
        fused = [k for n, k in compiled if n == "_divergence_fused_kernel"]
        compiled = [(n, k) for n, k in compiled if n != "_divergence_fused_kernel" or k is not fused[0]]
        for name, kernel in compiled:
            elems_per_iter, programs, *extra = geometry[name]
            scale_pass = extra == ["grad != 1"]
            rounds = extra[0] if extra and not scale_pass else None
            report = tcc.ptxas_report(kernel.asm["ptx"], arch)
            counted = fused[0] if name == "_divergence_fused_kernel" else None
            rec = model_kernel(name, kernel, elems_per_iter, programs, report, exchange_rounds=rounds, counted=counted)
            t = rec.pop("t_s_per_elem")
            if scale_pass:  # one launch per [R, V] gradient
                scale_t += t
                rec["case_note"] = "runs only when the incoming gradient is not 1"
            else:
                op_t += t
            records.append({"case": case, **rec})
        totals = [("op total", op_t)] + ([("op total, grad != 1", op_t + scale_t)] if scale_t else [])
        for label, t in totals:
            records.append(
                {
                    "case": case,
                    "kernel": label,
                    "bytes_per_elem": round(spec_bytes, 3),
                    "bound": "sum of the kernels above" + (" (the scale pass included)" if "!=" in label else ""),
                    "predicted_pct_of_copy": round(100 * spec_bytes / t / COPY_BPS, 1),
                    "predicted_ms": round(t * elements * 1e3, 3),
                    "bench_key": bench_key if label == "op total" else None,
                }
            )
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "what": (
            "static performance model of the compiled sm_90 kernels (no GPU, nothing ran): "
            "see benchmarks/static_model.py for the formulas"
        ),
        "hardware": {
            "sms": SMS,
            "clock_hz": CLOCK_HZ,
            "issue_per_clk_per_sm": ISSUE_PER_CLK,
            "mufu_per_clk_per_sm": MUFU_PER_CLK,
            "copy_bytes_per_s": COPY_BPS,
            "latency_s": LATENCY_S,
            "l2_round_trip_s": L2_ROUND_TRIP_S,
            "exchange_trips": EXCHANGE_TRIPS,
            "exchange_skew_s": EXCHANGE_SKEW_S,
            "exchange_s": EXCHANGE_S,
        },
        "arch": f"sm_{arch}",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "git_commit": commit or None,
        "records": records,
    }


def compare(new: dict, old: dict, tolerance: float = 1.0) -> list[str]:
    """Problems of ``new`` against the committed ``old``: a main kernel spills, or a main kernel's
    (or an op's) prediction drops by more than ``tolerance`` percentage points."""
    problems = []
    old_by = {(r["case"], r["kernel"]): r for r in old.get("records", [])}
    for r in new["records"]:
        main = r["kernel"] in MAIN_KERNELS
        if main and r.get("spill_bytes"):
            problems.append(f"{r['kernel']} spills {r['spill_bytes']} bytes in [{r['case']}]")
        prev = old_by.get((r["case"], r["kernel"]))
        if (main or r["kernel"].startswith("op total")) and prev and prev.get("predicted_pct_of_copy"):
            if r["predicted_pct_of_copy"] < prev["predicted_pct_of_copy"] - tolerance:
                problems.append(
                    f"{r['kernel']} [{r['case']}]: predicted {r['predicted_pct_of_copy']}% of copy, "
                    f"was {prev['predicted_pct_of_copy']}% (bound {prev.get('bound')} -> {r.get('bound')})"
                )
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--check", action="store_true", help="compare with --against instead of writing")
    parser.add_argument("--against", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    result = build()
    for r in result["records"]:
        print(
            f"{r['kernel']:<24} {r['bound']:<24} {r['predicted_pct_of_copy']:>6}%  "
            f"B/el={r['bytes_per_elem']:<7} mufu/el={r.get('mufu_per_elem', '-'):<6} "
            f"instr/el={r.get('instr_per_elem', '-'):<7} regs={r.get('registers', '-')}  [{r['case']}]"
        )
    if args.check:
        old = json.loads(Path(args.against).read_text())
        problems = compare(result, old)
        for p in problems:
            print("REGRESSION:", p)
        return 1 if problems else 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":  # kernels must be compiled, not interpreted
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execvpe(sys.executable, [sys.executable, *sys.argv], env)
    sys.exit(main())
