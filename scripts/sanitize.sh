#!/usr/bin/env bash
# The GPU test suite under compute-sanitizer memcheck, one test file at a time (so that a long
# file costs itself, not the run), until a deadline; a summary line per file in OUT_DIR/summary.
#
#   scripts/sanitize.sh OUT_DIR [test files...]      # default: every tests/test_*.py
#
# Environment: DEADLINE_S (default 540): stop starting files after this many seconds;
# PYTHON (python3); SELECT (default "not graph"): pytest -k expression. PyTorch's caching
# allocator is turned off so that memcheck sees every allocation's real bounds (an overrun
# inside a cached block would pass unseen otherwise); without it a CUDA-graph capture calls
# cudaMalloc mid-capture, which CUDA forbids, so the capture tests are deselected by default
# (they run in the plain GPU suite).
set -uo pipefail
OUT=${1:?usage: scripts/sanitize.sh OUT_DIR [test files...]}
shift
PYTHON=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-540}
SELECT=${SELECT:-not graph}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
FILES=("$@")
[[ ${#FILES[@]} -eq 0 ]] && FILES=(tests/test_*.py)
export PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONUNBUFFERED=1
compute-sanitizer --version | tail -1 | tee "$OUT/summary"
for f in "${FILES[@]}"; do
    if (( SECONDS > DEADLINE_S )); then
        echo "NOT RUN (deadline) $f" | tee -a "$OUT/summary"
        continue
    fi
    name=$(basename "$f" .py)
    start=$SECONDS
    timeout -k 10 $((DEADLINE_S + 60 - SECONDS)) compute-sanitizer --tool memcheck \
        --leak-check no --error-exitcode 99 --print-limit 20 --target-processes all \
        "$PYTHON" -P -m pytest -m gpu -k "$SELECT" -q -p no:cacheprovider "$f" \
        > "$OUT/$name.log" 2>&1
    rc=$?
    errors=$(grep -cE "^========= (Invalid|Program hit|Misaligned)" "$OUT/$name.log")
    result=$(grep -E "passed|failed|no tests ran|error" "$OUT/$name.log" | tail -1)
    echo "rc=$rc memcheck_errors=$errors $((SECONDS - start))s $f: $result" | tee -a "$OUT/summary"
done
