#!/usr/bin/env bash
# The one-shot GPU check: one device call, under 8 minutes on one H200, build included.
#
#   benchmarks/gpu_check.sh                 build, then every step below
#   benchmarks/gpu_check.sh --wheel W.whl   install a built wheel instead of building
#   benchmarks/gpu_check.sh --dry-run       every step's command on the CPU, no build, no GPU: arguments parse,
#                                           imports work, the JSON and the summary are written (`make test` runs it)
#
# Preflight, in the first seconds: python and torch import, torch has CUDA and sees a GPU with enough free memory,
# torch's CUDA major equals nvcc's, ninja is importable (else the build is serial), compute-sanitizer is present.
# What is wrong is printed and the check stops before spending its minutes (a dry run reports and goes on).
#
# Steps, in order of value, each under its own cap; the caps add up to less than the budget (GPU_CHECK_BUDGET_S,
# default 450 s), and a step that no longer fits what is left is skipped and the summary says so:
#   build        setup.py build_ext --inplace for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)  120 s
#   sass         tests/python/test_sass.py: 16-byte global accesses, no local memory in the bf16 fast paths  30 s
#   smoke        benchmarks/sanitize_ops.py without a sanitizer: every kernel of every op once against the CPU  25 s
#   bench-qk     benchmarks/bench_qk_norm_rope.py (fwd B4 S4096, fwd+bwd, decode B64, fwd B1 S32768)  45 s
#   bench-rope   benchmarks/bench_rope.py (model-level cos/sin and apply_rope, B4 S4096)  30 s
#   bench-index  benchmarks/bench_rope_index.py (B2 S4096 and B64 S1024 targets, device time and latency)  30 s
#   bench-vision benchmarks/bench_vision.py (vision rotary apply at tower shapes, tower syncs, tower forward)  40 s
#   bench-host   benchmarks/bench_host_overhead.py (host time per patched rotary call, decode launches)  15 s
#   cuda-tests   pytest -k cuda --maxfail=10: every CUDA test (bound-based against float64, sync-free, graphs)  60 s
#   memcheck     compute-sanitizer memcheck over benchmarks/sanitize_ops.py  35 s
#   racecheck    compute-sanitizer racecheck over the kernels with shared memory  20 s
# Every benchmark writes its JSON after each measured case, so a step stopped by its cap keeps what it measured.
# Then one final table (steps, then each performance target of DESIGN.md section 5 with its measured value).
#
# Everything lands in $OUT (default benchmarks/out): gpu_check.log (all output), summary.tsv (steps),
# bench_*.json, RESULTS.md (with the records the benchmarks appended) and final.txt.
# Liger-Kernel is used when its src/ was copied to third_party/liger/src (git-ignored; carry it to the GPU machine).
set -uo pipefail

DRY=0
WHEEL=""
while (( $# )); do
    case $1 in
        --dry-run) DRY=1 ;;
        --wheel) WHEEL=$2; shift ;;
        *) echo "usage: $0 [--dry-run] [--wheel PATH]" >&2; exit 2 ;;
    esac
    shift
done

START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-450}
# A dry run times CPU stand-ins on a machine that may be running other suites (make test runs two at a time): its
# caps and budget are DRY_SCALE times the GPU's, so that it checks the script, not the CPU's speed.
DRY_SCALE=4
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.tsv"
: > "$LOG"
printf "step\tstatus\tseconds\tnote\n" > "$SUMMARY"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DRYARG=""
(( DRY )) && DRYARG="--dry-run"
(( DRY )) && BUDGET=$((BUDGET * DRY_SCALE))

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME CAP_S CMD...: runs CMD (output to the log) for at most CAP_S seconds, or what remains of the budget if
# less (skipped when under 5 s remain); records status and time in the summary.
step() {
    local name=$1 cap=$2
    shift 2
    (( DRY )) && cap=$((cap * DRY_SCALE))
    local remaining
    remaining=$(left)
    if (( remaining < 5 )); then
        printf "%s\tskipped\t0\tonly %ss of the %ss budget left\n" "$name" "$remaining" "$BUDGET" >> "$SUMMARY"
        echo "=== $name: skipped (budget)" | tee -a "$LOG"
        return 0
    fi
    local limit=$(( cap < remaining ? cap : remaining ))
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local took=$((SECONDS - t0)) status note
    if (( rc == 0 )); then status=ok; note=""
    elif (( rc == 124 || rc == 137 )); then status=timeout; note="stopped after ${limit}s"
    else status="rc=$rc"; note=$(tail -n 1 "$LOG" | tr '\t' ' ' | cut -c1-120)
    fi
    printf "%s\t%s\t%s\t%s\n" "$name" "$status" "$took" "$note" >> "$SUMMARY"
    echo "=== $name: $status in ${took}s" | tee -a "$LOG"
    return $rc
}

# ---- preflight: seconds, before anything expensive
{
    echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET}s$( (( DRY )) && echo ', DRY RUN (CPU)')"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free,\
clocks.max.sm --format=csv,noheader
    command -v nvcc > /dev/null && nvcc --version | tail -1
} >> "$LOG" 2>&1
problems=$($PY - "$DRY" <<'EOF' 2>> "$LOG"
import importlib.util, re, shutil, subprocess, sys
dry = sys.argv[1] == "1"
bad = []
try:
    import torch
except Exception as exc:  # noqa: BLE001
    print(f"torch does not import: {exc}")
    sys.exit(0)
if torch.__version__ is None:  # pragma: no cover
    bad.append("torch has no version")
print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}", file=sys.stderr)
if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
    bad.append("ninja is not importable: the build would be serial (pip install ninja)")
if not dry:
    if torch.version.cuda is None:
        bad.append("torch is a CPU build: no CUDA kernels can be built or run")
    elif not torch.cuda.is_available():
        bad.append("torch sees no GPU")
    else:
        free, total = torch.cuda.mem_get_info()
        if free < 8 * 2**30:
            bad.append(f"only {free / 2**30:.1f} GiB of {total / 2**30:.0f} GiB GPU memory free (need 8)")
    nvcc = shutil.which("nvcc")
    if nvcc and torch.version.cuda:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release (\d+)\.", out)
        if m and m.group(1) != torch.version.cuda.split(".")[0]:
            bad.append(f"nvcc is CUDA {m.group(1)}, torch is CUDA {torch.version.cuda}: the build would fail")
    elif not nvcc:
        bad.append("nvcc not on PATH")
for line in bad:
    print(line)
EOF
)
if [ -n "$problems" ]; then
    echo "preflight:" | tee -a "$LOG"
    echo "$problems" | sed 's/^/  /' | tee -a "$LOG"
    printf "preflight\tfailed\t%s\t%s\n" "$((SECONDS - START))" "$(echo "$problems" | head -1 | cut -c1-120)" >> "$SUMMARY"
    if (( ! DRY )); then
        echo "stopping before the build: fix the above" | tee -a "$LOG"
        exit 2
    fi
else
    printf "preflight\tok\t%s\t\n" "$((SECONDS - START))" >> "$SUMMARY"
fi
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
[ -x "$SANITIZER" ] || echo "preflight: compute-sanitizer not found: memcheck and racecheck will not run" | tee -a "$LOG"

# ---- build (or install the wheel given)
if (( DRY )); then
    printf "build\tskipped\t0\tdry run: the existing build is used\n" >> "$SUMMARY"
    $PY -c "import ropekit" >> "$LOG" 2>&1 || { echo "dry run: ropekit does not import" | tee -a "$LOG"; exit 1; }
elif [ -n "$WHEEL" ]; then
    if ! step build 120 $PY -m pip install --no-deps --force-reinstall "$WHEEL"; then tail -40 "$LOG"; exit 1; fi
else
    if ! step build 120 $PY setup.py --quiet build_ext --inplace; then tail -40 "$LOG"; exit 1; fi
fi

DEVICE_ARGS=()
(( DRY )) && DEVICE_ARGS=(--device cpu)
step sass 30 $PY tests/python/test_sass.py
step smoke 25 $PY benchmarks/sanitize_ops.py "${DEVICE_ARGS[@]}"
step bench-qk 45 $PY benchmarks/bench_qk_norm_rope.py $DRYARG --json "$OUT/bench_qk_norm_rope.json"
step bench-rope 30 $PY benchmarks/bench_rope.py $DRYARG --json "$OUT/bench_rope.json"
step bench-index 30 $PY benchmarks/bench_rope_index.py $DRYARG --json "$OUT/bench_rope_index.json"
step bench-vision 40 $PY benchmarks/bench_vision.py $DRYARG --json "$OUT/bench_vision.json"
step bench-host 15 $PY benchmarks/bench_host_overhead.py $DRYARG --json "$OUT/bench_host_overhead.json"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
export ROPEKIT_RI_CASES=600 ROPEKIT_RI_WILD_CASES=600 ROPEKIT_FAMILY_CASES=400  # the CPU-side references
if (( DRY )); then  # the CUDA tests cannot run here: their selection must collect
    step cuda-tests 60 $PY -m pytest tests/python -q -p no:cacheprovider -k cuda --collect-only
else
    # shellcheck disable=SC2086
    step cuda-tests 60 $PY -m pytest tests/python -q -p no:cacheprovider -k cuda --maxfail=10 $XDIST
fi
if (( DRY )); then  # the sanitizer's script, without the sanitizer
    step memcheck 35 $PY benchmarks/sanitize_ops.py --device cpu
    step racecheck 20 $PY benchmarks/sanitize_ops.py --device cpu --shared-memory-only
elif [ -x "$SANITIZER" ]; then
    step memcheck 35 "$SANITIZER" --tool memcheck --error-exitcode 99 $PY benchmarks/sanitize_ops.py
    step racecheck 20 "$SANITIZER" --tool racecheck --racecheck-report all --error-exitcode 99 \
        $PY benchmarks/sanitize_ops.py --shared-memory-only
else
    printf "memcheck\tunavailable\t0\tcompute-sanitizer not found\n" >> "$SUMMARY"
    printf "racecheck\tunavailable\t0\tcompute-sanitizer not found\n" >> "$SUMMARY"
fi

cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
$PY benchmarks/gpu_summary.py "$OUT" $DRYARG > "$OUT/final.txt" 2>&1
cat "$OUT/final.txt" >> "$LOG"
cat "$OUT/final.txt"
awk -F'\t' 'NR > 1 && $2 != "ok" && $2 != "skipped" && $2 != "unavailable" { bad = 1 } END { exit bad }' "$SUMMARY"
