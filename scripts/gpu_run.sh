#!/usr/bin/env bash
# One GPU session: install the working tree, print the environment, run the GPU tests, the
# tuner (optional) and the benchmark; everything lands in OUT_DIR.
#
#   scripts/gpu_run.sh OUT_DIR                      # tests + bench: the tests + ~2 min
#   STAGES="tune bench" scripts/gpu_run.sh OUT_DIR  # tuner + bench: ~3 min
#   QUICK=1 scripts/gpu_run.sh OUT_DIR              # smoke run, small sizes
# (H100, 2026-11: tuner 70 s, bench 110 s, install 4 s; the stage timeouts bound the worst case
# at 9 min for the default stages)
#
# Environment:
#   STAGES       stages, run in the order install env tests tune bench; default "tests bench"
#                (install and env always run)
#   TUNE=1       add the tuner to the default stages (worst case beyond a 10-minute call)
#   QUICK=1      --quick for the tuner and the benchmark
#   PYTHON       interpreter (python3)
#   INSTALL=0    use the package as installed (skip pip install -e .)
#   TESTS_TIMEOUT=180 TUNE_TIMEOUT=240 BENCH_TIMEOUT=330: seconds per stage (a hang costs one
#                stage, not the run); tuner and benchmark get a budget 40/60 s shorter, skip
#                what does not fit and still write their results
#   BENCHES      kernel-family benchmarks of the bench stage, each bench/bench_<name>.py
#                (default "block_sparse stripe topk decode estimate select lowbit_qk"; missing ones are skipped);
#                each gets --out, --budget-s and --quick
#   TESTS        test files or folders for the tests stage (default tests/)
#   PYTEST_ARGS, TUNE_ARGS, BENCH_ARGS: extra arguments (BENCH_ARGS go to every benchmark)
#
# Files in OUT_DIR: run.log (all output) and results.tar.gz (pytest_gpu.log, every benchmark's
# json/csv/png, the tuner's json), since only 8 files come back from the device.
set -uo pipefail

OUT=${1:?usage: scripts/gpu_run.sh OUT_DIR}
PYTHON=${PYTHON:-python3}
DEFAULT_STAGES="tests bench"
[[ ${TUNE:-0} == 1 ]] && DEFAULT_STAGES="tests tune bench"
STAGES=${STAGES:-$DEFAULT_STAGES}
QUICK_FLAG=$([[ ${QUICK:-0} == 1 ]] && echo --quick || true)
TESTS_TIMEOUT=${TESTS_TIMEOUT:-180}
TUNE_TIMEOUT=${TUNE_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-330}
BENCHES=${BENCHES:-block_sparse stripe topk decode estimate select lowbit_qk}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RES=$OUT/results
mkdir -p "$RES"

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

SUMMARY=()
# stage NAME TIMEOUT LOG CMD...: run CMD under timeout (output also to LOG unless "-"), record
# its status
stage() {
    local name=$1 limit=$2 log=$3 start=$SECONDS rc
    shift 3
    echo
    echo "=== $name (timeout ${limit}s): $*"
    if [[ $log == - ]]; then
        timeout -k 15 "$limit" "$@"
        rc=$?
    else
        timeout -k 15 "$limit" "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    [[ $rc == 124 || $rc == 137 ]] && echo "=== $name: TIMED OUT after ${limit}s"
    SUMMARY+=("$name: exit $rc in $((SECONDS - start)) s")
    return $rc
}

main() {
    echo "=== gpu_run.sh $OUT  stages: $STAGES  quick: ${QUICK:-0}  $(date -u '+%F %T') UTC"
    if [[ ${INSTALL:-1} != 0 ]]; then
        stage install 300 - "$PYTHON" -m pip install --no-build-isolation --no-deps -q -e . || {
            echo "install failed: nothing else can run"; return 1; }
    fi

    echo
    echo "=== env"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
            --format=csv
    else
        echo "nvidia-smi: not available"
    fi
    "$PYTHON" bench/_common.py

    if has_stage tests; then
        local pytest=("$PYTHON" -P -m pytest)  # -P: keep the repository root off sys.path
        "$PYTHON" -P -c '' 2>/dev/null || pytest=(pytest)
        # shellcheck disable=SC2086
        stage tests "$TESTS_TIMEOUT" "$RES/pytest_gpu.log" \
            "${pytest[@]}" -m gpu ${TESTS:-tests/} -q ${PYTEST_ARGS:-}
    fi
    if has_stage tune; then
        # shellcheck disable=SC2086
        stage tune "$TUNE_TIMEOUT" - "$PYTHON" bench/tune_block_sparse.py --out "$RES" \
            --budget-s $((TUNE_TIMEOUT - 40)) $QUICK_FLAG ${TUNE_ARGS:-}
    fi
    if has_stage bench; then
        local name script
        for name in $BENCHES; do
            script=bench/bench_$name.py
            [[ -f $script ]] || { echo "=== bench_$name: no $script, skipped"; continue; }
            # shellcheck disable=SC2086
            stage "bench_$name" "$BENCH_TIMEOUT" - "$PYTHON" "$script" --out "$RES" \
                --budget-s $((BENCH_TIMEOUT - 60)) $QUICK_FLAG ${BENCH_ARGS:-}
        done
    fi

    echo
    echo "=== summary"
    printf '%s\n' "${SUMMARY[@]}"
    tar -czf "$OUT/results.tar.gz" -C "$OUT" results && echo "results.tar.gz: $(ls "$RES" | wc -l) files"
    [[ " ${SUMMARY[*]} " != *"exit "[1-9]* ]]
}

main 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
