#!/usr/bin/env bash
# The one command to run on a borrowed GPU machine: the CUDA correctness checks of every ssl_nb.kernels op (compiled
# Triton vs the PyTorch references, fp32 and bf16, the benchmark shapes included: `pytest -m cuda` on
# tests/test_kernel_checks.py) and of the graph-captured training step (tests/test_train.py), then the benchmark
# (benchmarks/kernels.py).
#
#   bash tools/gpu_check.sh "$OUT"          # from the repository root (or from anywhere)
#
# Needs python3 with torch (CUDA), triton, numpy and pytest; not nbdev/fastcore, not an installed ssl_nb: the script
# builds the package layout in a temporary folder (ssl_nb/*.py + kernels/ -> ssl_nb/kernels) and puts it on
# PYTHONPATH. Everything goes under OUT, 8 files: checks.log (pytest -v, each case's detail printed),
# bench.md/.csv/.jsonl/.log, env.json, nvidia-smi.txt, versions.txt. Each step has its own time limit (CHECKS_TIMEOUT_S, default 240; the
# benchmark's BENCH_BUDGET_S, default 150, plus a hard 270 s), and a failing step does not stop the next one.
# CHECKS_CASES: case names to check instead of all (e.g. "sum_over_programs losses_last_program_sums");
# CHECKS_ARGS / BENCH_ARGS: more options of pytest / of the benchmark (e.g. "--no-compile --only losses").
# Exit status: 0 when every check passed and the benchmark finished.
set -u
OUT="${1:-${OUT:-./gpu_check_out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
T0=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }

# ---- package layout: ssl_nb/ with kernels/ as ssl_nb/kernels, in a folder of its own. Run from there: python puts
# the working directory first on sys.path, and the repository root has an ssl_nb/ without kernels/.
PP="$(mktemp -d)"
trap 'rm -rf "$PP"' EXIT
mkdir -p "$PP/ssl_nb"
cp "$ROOT/ssl_nb/"*.py "$PP/ssl_nb/"
cp -r "$ROOT/kernels" "$PP/ssl_nb/kernels"
rm -rf "$PP/ssl_nb/kernels/__pycache__"
export PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}"
cd "$PP"
say "PYTHONPATH=$PYTHONPATH cwd=$(pwd)"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET SSL_NB_KERNELS

(nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,power.limit --format=csv) \
    > "$OUT/nvidia-smi.txt" 2>&1 || true
head -n 12 "$OUT/nvidia-smi.txt"
"$PY" -c "import torch, triton, numpy, pytest, ssl_nb.kernels as K; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'pytest', pytest.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-', 'ssl_nb.kernels from', K.__file__)" 2>&1 | tee "$OUT/versions.txt"

# ---- 1. correctness (compiled Triton vs reference on the GPU)
TESTS="$ROOT/tests/test_kernel_checks.py"
TARGETS=("$TESTS" "$ROOT/tests/test_train.py")      # the kernels' cases and graph_step's CUDA test
if [ -n "${CHECKS_CASES:-}" ]; then
    TARGETS=()
    for c in $CHECKS_CASES; do TARGETS+=("$TESTS::test_cuda[$c]"); done
fi
say "correctness checks (pytest -m cuda ${TARGETS[*]})"
# shellcheck disable=SC2086   # CHECKS_ARGS: more pytest options, word-split (e.g. "-x" or "--deselect NODE")
timeout "${CHECKS_TIMEOUT_S:-240}" "$PY" -m pytest "${TARGETS[@]}" -m cuda -v -s -rfEs -p no:cacheprovider \
    --continue-on-collection-errors --rootdir "$ROOT" ${CHECKS_ARGS:-} 2>&1 | tee "$OUT/checks.log"
CHECKS=${PIPESTATUS[0]}
SUMMARY="$(grep -E '^=+ .*(passed|failed|error|skipped|deselected).* =+$' "$OUT/checks.log" | tail -n 1)"
if [ "$CHECKS" = 0 ] && [[ "$SUMMARY" == *skipped* ]] && [[ "$SUMMARY" != *passed* ]]; then
    CHECKS=1; say "every check was skipped (no CUDA device, or TRITON_INTERPRET=1): counted as a failure"
fi
say "checks exit status $CHECKS: $SUMMARY"
grep -E '^(FAILED|ERROR) ' "$OUT/checks.log" | cut -c1-400

# ---- 2. benchmark
say "benchmark (benchmarks/kernels.py)"
# shellcheck disable=SC2086   # BENCH_ARGS: more options, word-split (e.g. "--tune --no-compile --only losses")
timeout 270 "$PY" "$ROOT/benchmarks/kernels.py" --out "$OUT" --budget-s "${BENCH_BUDGET_S:-150}" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench.log" | grep --line-buffered -E '\] (== |copy |env:|skip |wrote )|ERROR|Traceback' | cut -c1-300
BENCH=${PIPESTATUS[0]}
say "benchmark exit status $BENCH"
[ -f "$OUT/bench.md" ] && sed '/^### /,$d' "$OUT/bench.md"      # header, targets and the layouts list
ls -la "$OUT"
say "done: checks=$CHECKS bench=$BENCH"
[ "$CHECKS" = 0 ] && [ "$BENCH" = 0 ]
