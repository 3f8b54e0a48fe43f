#!/usr/bin/env bash
# The one-shot GPU check: no arguments, one device call, under 8 minutes on one H200, build included.
#
#   benchmarks/gpu_check.sh
#
# Steps, in order of value, each under a time limit taken from what is left of the budget (GPU_CHECK_BUDGET_S,
# default 450 s; a step that no longer fits is skipped and the summary says so):
#   build        python setup.py build_ext --inplace for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16)
#   sass         tests/python/test_sass.py: 16-byte global accesses, no local memory in the bf16 fast paths
#   op-tests     the CUDA op tests against float64: both paths of every op (tests/python/test_cuda_kernels.py), sync-
#                debug mode, CUDA-graph capture, bit-identity of the gather, and the op test files on cuda
#   rope-index   the fused rope_index kernel on CUDA against transformers and the ATen reference (clean, perturbed and
#                packed cases of every family), sync-free, CUDA-graph capture, the device-side assert
#   memcheck     compute-sanitizer memcheck over benchmarks/sanitize_ops.py (every kernel once, tiny shapes)
#   bench-qk     benchmarks/bench_qk_norm_rope.py (fwd B4 S4096 and B1 S32768, fwd+bwd, decode B64 S1)
#   bench-rope   benchmarks/bench_rope.py (model-level cos/sin and apply_rope, B4 S4096)
#   bench-index  benchmarks/bench_rope_index.py (get_rope_index: B2 S4096 and B64 S1024 targets, every family)
#   bench-host   benchmarks/bench_host_overhead.py (host time per call of the patched rotary forward, decode launches)
#   racecheck    compute-sanitizer racecheck over the kernels with shared memory (qk_norm_rope backward + its sum)
#   suite        the rest of tests/python (pytest -x, xdist when present)
# and prints one final table (steps, then each performance target with its measured value) last.
#
# Everything lands in $OUT (default benchmarks/out): gpu_check.log (all output), summary.tsv (steps),
# bench_qk_norm_rope.json, bench_rope.json, RESULTS.md (with the records the benchmarks appended) and final.txt.
# Liger-Kernel is used when its src/ was copied to third_party/liger/src (git-ignored; carry it to the GPU machine).
set -uo pipefail

START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-450}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.tsv"
: > "$LOG"
printf "step\tstatus\tseconds\tnote\n" > "$SUMMARY"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")

left() { echo $((BUDGET - (SECONDS - START))); }

# step NAME MIN_S MAX_S CMD...: runs CMD (output to the log) if MIN_S seconds of the budget remain, for at most
# MAX_S seconds (or what remains); records status and time in the summary.
step() {
    local name=$1 need=$2 cap=$3
    shift 3
    local remaining
    remaining=$(left)
    if (( remaining < need )); then
        printf "%s\tskipped\t0\tonly %ss of the %ss budget left\n" "$name" "$remaining" "$BUDGET" >> "$SUMMARY"
        echo "=== $name: skipped (budget)" | tee -a "$LOG"
        return 0
    fi
    local limit=$(( cap < remaining ? cap : remaining ))
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
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

{
    echo "gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'), budget ${BUDGET}s"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    nvcc --version | tail -1
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"
    command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
} >> "$LOG" 2>&1

if ! step build 60 300 $PY setup.py --quiet build_ext --inplace; then
    tail -40 "$LOG"
    exit 1
fi
step sass 10 60 $PY tests/python/test_sass.py
OP_TESTS="tests/python/test_cuda_kernels.py tests/python/test_apply_rope.py tests/python/test_qk_norm_rope.py \
tests/python/test_rope_table.py tests/python/test_opcheck_compile.py"
[ -f tests/python/test_table_fidelity.py ] && OP_TESTS="$OP_TESTS tests/python/test_table_fidelity.py"
# shellcheck disable=SC2086
step op-tests 30 150 $PY -m pytest $OP_TESTS -x -q -p no:cacheprovider $XDIST
RI_TESTS="tests/python/test_rope_index.py tests/python/test_families_rope_index.py"
export ROPEKIT_RI_CASES=1000 ROPEKIT_RI_WILD_CASES=1000 ROPEKIT_FAMILY_CASES=600  # the CPU-side references
# shellcheck disable=SC2086
step rope-index 30 120 $PY -m pytest $RI_TESTS -x -q -p no:cacheprovider -k "cuda or packed" $XDIST
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$SANITIZER" ]; then
    step memcheck 40 100 "$SANITIZER" --tool memcheck --error-exitcode 99 $PY benchmarks/sanitize_ops.py
else
    printf "memcheck\tunavailable\t0\tcompute-sanitizer not found\n" >> "$SUMMARY"
fi
step bench-qk 60 160 $PY benchmarks/bench_qk_norm_rope.py --json "$OUT/bench_qk_norm_rope.json"
step bench-rope 40 100 $PY benchmarks/bench_rope.py --json "$OUT/bench_rope.json"
step bench-index 30 90 $PY benchmarks/bench_rope_index.py --json "$OUT/bench_rope_index.json"
step bench-host 15 40 $PY benchmarks/bench_host_overhead.py --json "$OUT/bench_host_overhead.json"
if [ -x "$SANITIZER" ]; then
    step racecheck 40 100 "$SANITIZER" --tool racecheck --racecheck-report all --error-exitcode 99 \
        $PY benchmarks/sanitize_ops.py --shared-memory-only
else
    printf "racecheck\tunavailable\t0\tcompute-sanitizer not found\n" >> "$SUMMARY"
fi
IGNORE=""
for f in $OP_TESTS $RI_TESTS; do IGNORE="$IGNORE --ignore=$f"; done
# shellcheck disable=SC2086
step suite 30 600 $PY -m pytest tests/python -x -q -p no:cacheprovider $XDIST $IGNORE

cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null
$PY benchmarks/gpu_summary.py "$OUT" > "$OUT/final.txt" 2>&1
cat "$OUT/final.txt" >> "$LOG"
cat "$OUT/final.txt"
awk -F'\t' 'NR > 1 && $2 != "ok" && $2 != "skipped" && $2 != "unavailable" { bad = 1 } END { exit bad }' "$SUMMARY"
