#!/usr/bin/env bash
# Everything that needs a GPU, for one device call per stage (each call is capped at 10 minutes, and the machine
# comes back bare after 30 s idle, so a stage rebuilds when its build is missing):
#
#   benchmarks/gpu_check.sh test       build, then the whole pytest suite on the GPU (CUDA variants, sync-debug mode,
#                                      CUDA-graph capture, bit-identity of in-kernel cos/sin)
#   benchmarks/gpu_check.sh sanitize   build, then the op tests' CUDA cases under compute-sanitizer memcheck/racecheck
#   benchmarks/gpu_check.sh bench      build, then the three op benchmarks and the demo (plot to $OUT/demo-gpu.png)
#
# Logs go to $OUT/gpu_check.log; bench also leaves $OUT/RESULTS.md (the appended benchmark records) and the plot.
# Liger-Kernel is used when its src/ was copied to third_party/liger/src (git-ignored) and carried.
set -uo pipefail

stage=${1:-test}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
if [ -d third_party/liger/src ]; then export PYTHONPATH="$PYTHONPATH:$PWD/third_party/liger/src"; fi
PY=${PYTHON:-python3}
status=0

run() {  # run NAME CMD...: log everything, remember the first failure, keep going
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$LOG"
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nvcc --version | tail -1
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >> "$LOG" 2>&1

if ! $PY -c "import ropekit, sys; sys.exit(not ropekit.has_cuda_kernels())" 2>/dev/null; then
    run build $PY setup.py --quiet build_ext --inplace || { tail -40 "$LOG"; exit 1; }
fi

case $stage in
test)
    parallel=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist, when the image has it
    # shellcheck disable=SC2086
    run pytest $PY -m pytest tests/python -q -x -p no:cacheprovider $parallel
    ;;
sanitize)
    ops="tests/python/test_apply_rope.py tests/python/test_rope_table.py tests/python/test_qk_norm_rope.py \
         tests/python/test_rope_index.py"
    for tool in memcheck racecheck; do
        # shellcheck disable=SC2086
        run "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 99 \
            $PY -m pytest $ops -q -x -p no:cacheprovider -k "cuda and not gradcheck"
    done
    ;;
bench)
    run bench-rope $PY benchmarks/bench_rope.py
    run bench-qk-norm-rope $PY benchmarks/bench_qk_norm_rope.py
    run bench-rope-index $PY benchmarks/bench_rope_index.py
    run demo $PY benchmarks/demo.py --plot "$OUT/demo-gpu.png"
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
    ;;
*)
    echo "unknown stage '$stage' (test | sanitize | bench)" >&2
    exit 2
    ;;
esac
tail -60 "$LOG"
exit $status
