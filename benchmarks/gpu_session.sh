#!/usr/bin/env bash
# One GPU session's work, in stages that each fit the device tool's 10-minute command limit.
#
#   bash benchmarks/gpu_session.sh STAGE [STAGE ...]
#
# Stages (run in the order given; each writes its raw output under $OUT, default ./gpu-out):
#   build       pip install -e . (builds modkern._C with nvcc), then the torch-free csrc harness
#               (csrc/tools/standalone_check.cu; the cluster / DSMEM path has never run before)
#   test        the whole test suite on CUDA (op tests take backend="cuda" and "triton")
#   sanitize    compute-sanitizer memcheck over the op tests of the CUDA and Triton backends
#   div-bf16    divergence benchmarks, bf16 (the headline cases)
#   div-fp32    divergence benchmarks, fp32
#   adv         masked_adv_step + perturb benchmarks
#   e2e         one robust training step end to end vs the official-style eager objective
#   compile     the Triton compile-only report for this GPU's Triton (no launch)
#
# Suggested calls (each one `run` of the device tool, carrying .whl when it holds the
# liger-kernel wheel, see benchmarks/README.md):
#   1. bash benchmarks/gpu_session.sh build test            (~6-8 min)
#   2. bash benchmarks/gpu_session.sh build div-bf16 adv    (~8 min; build is a no-op when warm)
#   3. bash benchmarks/gpu_session.sh build div-fp32 e2e
# then here: copy the gpu-*.json files into benchmarks/results/ and run
#   python benchmarks/report.py
# The device tool returns at most 8 files per call: each stage writes one log and at most one JSON.
set -uo pipefail

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
# the op tests and benchmarks compile kernels; the nvcc / Triton compile-only checks are for
# machines without a GPU (the build itself compiles csrc here)
export MODKERN_COMPILE_CHECKS="${MODKERN_COMPILE_CHECKS:-0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

gpu_name() {
    nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_'
}

require_gpu() {
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_session.sh: no CUDA device visible to torch; these stages are for the GPU machine" >&2
        exit 2
    fi
}

install_wheels() {
    # Optional wheels carried in .whl/ (liger-kernel for the Liger providers).
    if compgen -G ".whl/*.whl" >/dev/null; then
        python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
}

stage_build() {
    python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$OUT/build.log" || return 1
    python -c "import modkern._C; print('modkern._C built:', modkern._C.__file__)" 2>&1 | tee -a "$OUT/build.log"
    # the same flags as setup.py's device code (csrc/README.md, "What remains to validate")
    nvcc -std=c++17 -O3 --use_fast_math -gencode=arch=compute_90a,code=sm_90a -Icsrc \
        csrc/tools/standalone_check.cu csrc/device_info.cu csrc/divergence*.cu csrc/adv_step*.cu \
        csrc/perturb.cu -o /tmp/modkern_check 2>&1 | tee -a "$OUT/build.log" &&
        /tmp/modkern_check 2>&1 | tee -a "$OUT/build.log"
}

stage_test() {
    python -m pytest tests -q -x --durations=15 -p no:cacheprovider 2>&1 | tee "$OUT/test.log"
}

stage_sanitize() {
    compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
        python -m pytest tests/test_divergence.py tests/test_adv_step.py tests/test_perturb.py -q -x \
        -k "not compile and not opcheck and not liger" -p no:cacheprovider 2>&1 | tail -200 >"$OUT/sanitize.log"
}

bench() {
    local name="$1"
    shift
    python -m pytest "$@" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$OUT/gpu-$(gpu_name)-$name.json" 2>&1 | tail -60 >"$OUT/bench-$name.log"
}

stage_compile() {
    python tests/triton_compile_check.py --arch 90 --json "$OUT/compile-sm90.json" 2>&1 | tail -5 >"$OUT/compile.log"
}

if [ "$#" -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,26p' "$0"
    exit 0
fi

status=0
for stage in "$@"; do
    echo "== $stage ($(date -u +%H:%M:%S))"
    case "$stage" in
    build) require_gpu && install_wheels && stage_build ;;
    test) require_gpu && install_wheels && stage_test ;;
    sanitize) require_gpu && stage_sanitize ;;
    div-bf16) require_gpu && install_wheels && bench div-bf16 benchmarks/bench_divergence.py -k bfloat16 ;;
    div-fp32) require_gpu && install_wheels && bench div-fp32 benchmarks/bench_divergence.py -k float32 ;;
    adv) require_gpu && bench adv benchmarks/bench_adv_step.py ;;
    e2e) require_gpu && bench e2e benchmarks/bench_robust_step.py ;;
    compile) stage_compile ;;
    *)
        echo "unknown stage: $stage (see --help)" >&2
        exit 2
        ;;
    esac
    rc=$?
    echo "== $stage exit $rc"
    [ "$rc" -eq 0 ] || status=$rc
done
exit "$status"
