#!/usr/bin/env bash
# Everything a GPU session checks, as ONE command that finishes in under 9 minutes on a bare
# H100 / H200 machine (torch + CUDA, triton, nvcc, pytest, pytest-benchmark; no network).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]        (OUT_DIR default: $OUT or ./gpu-out)
#
# Stages, in this order, each time-boxed with `timeout` (budgets in seconds, overridable with
# MODKERN_GPU_CHECK_<STAGE>_S; the whole run stops starting stages at MODKERN_GPU_CHECK_BUDGET_S,
# default 530):
#   env        nvidia-smi, torch / triton / CUDA versions, git commit  -> gpu_check.json
#   install    MODKERN_BUILD_CUDA=0 pip install --no-build-isolation --no-deps -e . : modkern
#              and modkern.kernels importable (seconds; the stages below and their subprocesses
#              need the install, the source tree alone has no modkern.kernels)
#   build      python setup.py build_ext --inplace (modkern._C with nvcc, MAX_JOBS parallel jobs;
#              the editable install finds it in modkern/), started IN THE BACKGROUND so that the
#              headline numbers below do not wait for it; its time is printed and recorded
#   headline   the numbers that matter, first (device copy measured in the same pytest session):
#              div       fused_js / fused_kl bf16 R=4096 V=152064 fwd+bwd, one gradient (q; KL with
#                        P detached = the paper's case) and two gradients (p, q): torch + triton
#              pgd       masked_adv_step raw+linf, 18 x 1000 x 4096 (fp32 / bf16 delta)
#              e2e       one robust training step end to end (bench_robust_step.py)
#              cost      the step against SFT at a layers-dominated shape (bench_step_cost.py)
#              linear    bench_linear_divergence.py (when it exists)
#   wait       for the build (fails the CUDA stages below if it failed)
#   tests      the CUDA op test suite with MODKERN_REQUIRE_BACKENDS=cuda,triton: a skipped cuda or
#              triton case counts as a failure
#   div-cuda   the headline divergence cases on the CUDA backend
#   baselines  torch.compile / eager / Liger on the headline divergence cases
#   more       the rest of the divergence and PGD grids, while time is left
#
# Output (a few files, easy to copy back from a remote machine):
#   OUT/gpu_check.log                 all stage logs, in order
#   OUT/gpu_check.json                environment + per-stage {rc, seconds, timed_out} + build time
#   OUT/gpu-<device>.json             every benchmark of the run merged into one pytest-benchmark
#                                     JSON (re-merged after each stage: a killed run keeps what ran)
#   OUT/tests.xml                     JUnit XML of the test stage
# Fold into the report here: cp OUT/gpu-*.json benchmarks/results/ && python benchmarks/report.py
#
# --dry-run prints the plan and runs every CPU-side part (shell syntax, the env record, the
# pytest selections of each stage collected with the GPU shapes, the merge and the report on the
# committed CPU results) without a GPU; CI runs it (tests/test_gpu_check.py).
set -uo pipefail

DRY=0
OUT_ARG=""
for arg in "$@"; do
    case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help)
        sed -n '2,40p' "$0"
        exit 0
        ;;
    -*)
        echo "gpu_check.sh: unknown option $arg" >&2
        exit 2
        ;;
    *) OUT_ARG="$arg" ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT_ARG:-${OUT:-$ROOT/gpu-out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d /tmp/modkern-gpu-check.XXXXXX)"
LOG="$OUT/gpu_check.log"
: >"$LOG"
STAGES_TSV="$WORK/stages.tsv"
: >"$STAGES_TSV"

export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-12}" # leaves a few of the 16 cores to the benchmarks running meanwhile
export MODKERN_COMPILE_CHECKS=0   # the compile-only checks are for machines without a GPU
START=$(date +%s)
BUDGET="${MODKERN_GPU_CHECK_BUDGET_S:-530}"

budget() { # budget NAME DEFAULT -> seconds for this stage, capped by what is left of the run
    local name default var left
    name="$1"
    default="$2"
    var="MODKERN_GPU_CHECK_$(echo "$name" | tr 'a-z-' 'A-Z_')_S"
    left=$((BUDGET - ($(date +%s) - START)))
    local want="${!var:-$default}"
    if [ "$left" -lt "$want" ]; then want="$left"; fi
    echo "$want"
}

say() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

record() { # record NAME RC SECONDS
    local timed_out=false
    if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then timed_out=true; fi
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$timed_out" >>"$STAGES_TSV"
    say "stage $1: rc=$2 ${3}s timed_out=$timed_out"
}

run_stage() { # run_stage NAME DEFAULT_BUDGET CMD... : time-boxed, logged, recorded
    local name="$1" default="$2"
    shift 2
    local secs
    secs=$(budget "$name" "$default")
    if [ "$DRY" -eq 1 ]; then
        say "PLAN $name (<= ${default}s): $*"
        return 0
    fi
    if [ "$secs" -le 5 ]; then
        say "SKIP $name: the run's ${BUDGET}s budget is spent"
        record "$name" 125 0
        return 0
    fi
    say "START $name (timeout ${secs}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$secs" "$@" >>"$LOG" 2>&1
    rc=$?
    record "$name" "$rc" $(($(date +%s) - t0))
    merge
    return 0
}

BENCH_JSONS="$WORK/bench"
mkdir -p "$BENCH_JSONS"

bench() { # bench NAME BUDGET PYTEST-ARGS... : one pytest-benchmark session -> $WORK/bench/NAME.json
    local name="$1" default="$2"
    shift 2
    if [ "$DRY" -eq 1 ]; then
        # the selection must collect cases at the GPU shapes (MODKERN_BENCH_PLAN=gpu)
        say "PLAN $name (<= ${default}s): pytest $*"
        local n
        n=$(MODKERN_BENCH_PLAN=gpu python -m pytest "$@" --collect-only -q -p no:cacheprovider 2>>"$LOG" |
            grep -c '::')
        say "  collects $n cases"
        if [ "$n" -eq 0 ]; then
            say "  ERROR: the selection of stage $name collects nothing"
            DRY_FAIL=1
        fi
        return 0
    fi
    run_stage "$name" "$default" python -m pytest "$@" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json "$BENCH_JSONS/$name.json"
}

merge() { # every stage's benchmark JSON -> one OUT/gpu-<device>.json; stage records -> gpu_check.json
    python - "$BENCH_JSONS" "$OUT" "$STAGES_TSV" "$WORK/env.json" "$DRY" <<'PY' >>"$LOG" 2>&1
import glob, json, os, sys
bench_dir, out, stages_tsv, env_path, dry = sys.argv[1:]
env = json.load(open(env_path)) if os.path.exists(env_path) else {}
merged = None
for path in sorted(glob.glob(os.path.join(bench_dir, "*.json")), key=os.path.getmtime):
    try:
        data = json.load(open(path))
    except (OSError, ValueError):
        continue
    stage = os.path.basename(path)[:-5]
    for b in data.get("benchmarks", []):
        b.setdefault("extra_info", {})["gpu_check_stage"] = stage
    if merged is None:
        merged = data
        merged.setdefault("modkern", {})["failures"] = list(data.get("modkern", {}).get("failures", []))
    else:
        merged["benchmarks"].extend(data.get("benchmarks", []))
        merged["modkern"]["failures"].extend(data.get("modkern", {}).get("failures", []))
        merged["modkern"].setdefault("copy_gbps_per_stage", {})[stage] = data.get("modkern", {}).get("copy_gbps")
if merged is not None:
    merged["modkern"]["gpu_check"] = True
    name = (merged["modkern"].get("device_name") or "unknown").replace(" ", "_")
    if dry != "1":
        with open(os.path.join(out, f"gpu-{name}.json"), "w") as f:
            json.dump(merged, f, indent=1)
stages = []
if os.path.exists(stages_tsv):
    for line in open(stages_tsv):
        n, rc, s, to = line.rstrip("\n").split("\t")
        stages.append({"stage": n, "rc": int(rc), "seconds": int(s), "timed_out": to == "true"})
env["stages"] = stages
env["ok"] = bool(stages) and all(s["rc"] == 0 for s in stages)
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(env, f, indent=1)
PY
}

write_env() {
    python - "$WORK/env.json" "$DRY" <<'PY' 2>>"$LOG"
import datetime, json, subprocess, sys
import torch
def sh(*cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
try:
    import triton
    triton_version = triton.__version__
except Exception:
    triton_version = None
cuda = torch.cuda.is_available()
env = {
    "what": "benchmarks/gpu_check.sh" + (" --dry-run (no GPU; nothing measured)" if sys.argv[2] == "1" else ""),
    "device_name": torch.cuda.get_device_name(0) if cuda else None,
    "nvidia_smi": sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "triton": triton_version,
    "nvcc": (sh("nvcc", "--version") or "").splitlines()[-1:] or None,
    "python": sys.version.split()[0],
    "git_commit": sh("git", "rev-parse", "HEAD"),
    "git_dirty": bool(sh("git", "status", "--porcelain", "--untracked-files=no")),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
PY
}

DRY_FAIL=0
say "modkern GPU check: out=$OUT dry_run=$DRY budget=${BUDGET}s MAX_JOBS=$MAX_JOBS"
write_env | tee -a "$LOG"
if [ "$DRY" -eq 0 ] && ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA device visible to torch: run with --dry-run on a machine without a GPU"
    exit 2
fi
merge

# --- install (pure Python), then the CUDA build in the background -------------------------------
# The machine has no network: --no-build-isolation uses its own setuptools (pyproject.toml).
run_stage install 90 env MODKERN_BUILD_CUDA=0 python -m pip install --no-build-isolation --no-deps -e .
BUILD_RC_FILE="$WORK/build.rc"
BUILD_LOG="$WORK/build.log"
if [ "$DRY" -eq 1 ]; then
    say "PLAN build (background, <= 300s): MAX_JOBS=$MAX_JOBS MODKERN_BUILD_CUDA=1 python setup.py build_ext --inplace"
    bash -n "$0" || DRY_FAIL=1
else
    say "START build in the background (timeout $(budget build 300)s, MAX_JOBS=$MAX_JOBS)"
    (
        t0=$(date +%s)
        MODKERN_BUILD_CUDA=1 timeout --kill-after=10 "$(budget build 300)" \
            python setup.py build_ext --inplace >"$BUILD_LOG" 2>&1
        rc=$?
        if [ "$rc" -eq 0 ]; then
            python -c "import modkern._C as c; print('modkern._C built:', c.__file__)" >>"$BUILD_LOG" 2>&1 || rc=3
        fi
        echo "$rc $(($(date +%s) - t0))" >"$BUILD_RC_FILE"
    ) &
    BUILD_PID=$!
fi

# --- headline benchmarks (torch + triton; they need no build) ---------------------------------
HEAD_DIV='R4096xV152064 and bfloat16 and fwd_bwd and (modkern-triton or modkern-torch)'
bench div 130 benchmarks/bench_divergence.py -k "$HEAD_DIV"
bench pgd 45 benchmarks/bench_adv_step.py -k "test_masked_adv_step and raw and (modkern-triton or modkern-torch)"
bench e2e 150 benchmarks/bench_robust_step.py
bench cost 150 benchmarks/bench_step_cost.py
if [ -f benchmarks/bench_linear_divergence.py ]; then
    bench linear 75 benchmarks/bench_linear_divergence.py
else
    say "benchmarks/bench_linear_divergence.py does not exist: stage linear skipped"
fi

# --- the build's result ------------------------------------------------------------------------
BUILD_OK=1
if [ "$DRY" -eq 0 ]; then
    say "waiting for the build"
    wait "$BUILD_PID"
    read -r BUILD_RC BUILD_S <"$BUILD_RC_FILE" || { BUILD_RC=1; BUILD_S=0; }
    cat "$BUILD_LOG" | tail -40 >>"$LOG"
    say "BUILD TIME ${BUILD_S}s (rc=$BUILD_RC, MAX_JOBS=$MAX_JOBS)"
    record build "$BUILD_RC" "$BUILD_S"
    merge
    [ "$BUILD_RC" -eq 0 ] || BUILD_OK=0
fi

# --- tests: a skipped cuda / triton case is a failure ------------------------------------------
TESTS="tests/test_divergence.py tests/test_divergence_errors.py tests/test_adv_step.py tests/test_perturb.py tests/test_backend.py tests/test_cuda_build.py"
[ -f tests/test_linear_divergence.py ] && TESTS="$TESTS tests/test_linear_divergence.py"
if [ "$DRY" -eq 1 ]; then
    say "PLAN tests (<= 150s): MODKERN_REQUIRE_BACKENDS=cuda,triton pytest $TESTS"
    n=$(python -m pytest $TESTS --collect-only -q -p no:cacheprovider 2>>"$LOG" | grep -c '::')
    say "  collects $n tests"
    [ "$n" -gt 0 ] || DRY_FAIL=1
elif [ "$BUILD_OK" -eq 1 ]; then
    # shellcheck disable=SC2086
    run_stage tests 150 env MODKERN_REQUIRE_BACKENDS=cuda,triton python -m pytest $TESTS -q --maxfail=30 \
        -p no:cacheprovider --junitxml="$OUT/tests.xml" --durations=10
else
    say "build failed: the CUDA test stage runs without the extension and must fail"
    # shellcheck disable=SC2086
    run_stage tests 150 env MODKERN_REQUIRE_BACKENDS=cuda,triton python -m pytest $TESTS -q \
        -p no:cacheprovider --junitxml="$OUT/tests.xml"
fi

# --- the rest, while time is left ---------------------------------------------------------------
bench div-cuda 60 benchmarks/bench_divergence.py -k "R4096xV152064 and bfloat16 and fwd_bwd and modkern-cuda"
bench pgd-cuda 30 benchmarks/bench_adv_step.py -k "test_masked_adv_step and raw and modkern-cuda"
bench baselines 120 benchmarks/bench_divergence.py -k "R4096xV152064 and bfloat16 and fwd_bwd and (compile or eager or liger)"
bench more 200 benchmarks/bench_divergence.py -k "modkern and not (R4096xV152064 and bfloat16 and fwd_bwd)"

merge
if [ "$DRY" -eq 1 ]; then
    # the JSON folding step on the committed CPU results (the GPU file folds the same way)
    if ls benchmarks/results/cpu.json >/dev/null 2>&1; then
        python benchmarks/report.py --no-chart --out "$WORK/README.md" benchmarks/results/cpu.json >>"$LOG" 2>&1 ||
            { say "ERROR: benchmarks/report.py failed"; DRY_FAIL=1; }
    fi
    say "dry run done (status $DRY_FAIL); the real run writes $OUT/gpu-<device>.json, gpu_check.json, gpu_check.log, tests.xml"
    rm -rf "$WORK"
    exit "$DRY_FAIL"
fi
say "done in $(($(date +%s) - START))s; fold in: cp $OUT/gpu-*.json benchmarks/results/ && python benchmarks/report.py"
rm -rf "$WORK"
python -c "import json,sys; sys.exit(0 if json.load(open('$OUT/gpu_check.json'))['ok'] else 1)"
