#!/usr/bin/env bash
# The one command to run on a borrowed GPU machine: CUDA correctness checks of every ssl_nb.kernels op (compiled
# Triton vs the PyTorch references, fp32 and bf16, the benchmark shapes included), then the benchmark.
#
#   bash kernels/gpu_check.sh "$OUT"          # from the repository root (or from anywhere)
#
# Needs python3 with torch (CUDA), triton, numpy; not nbdev/fastcore. If `ssl_nb.kernels` is not importable as is,
# the script builds the package layout itself in a temporary folder (ssl_nb/ + kernels/ -> ssl_nb/kernels) and puts
# it on PYTHONPATH. Everything goes under OUT: checks.jsonl/.log, bench.md/.csv/.jsonl/.log, env.json, nvidia-smi.txt.
# Each step has its own time limit (CHECKS_TIMEOUT_S, default 240; the benchmark's BENCH_BUDGET_S, default 150, plus
# a hard 270 s; CHECKS_ARGS / BENCH_ARGS: more options of each), and a failing step does not stop the next one. Exit
# status: 0 when every check passed and the benchmark finished.
set -u
OUT="${1:-${OUT:-./gpu_check_out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
T0=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*"; }

# ---- package layout: prefer this script's own sources
if [ -f "$HERE/../ssl_nb/__init__.py" ] && [ -f "$HERE/__init__.py" ]; then           # repository: kernels/ next to ssl_nb/
    PP="$(mktemp -d)"
    trap 'rm -rf "$PP"' EXIT
    mkdir -p "$PP/ssl_nb"
    cp "$HERE/../ssl_nb/"*.py "$PP/ssl_nb/"
    cp -r "$HERE" "$PP/ssl_nb/kernels"
    rm -rf "$PP/ssl_nb/kernels/__pycache__"
    export PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}"
elif [ "$(basename "$(dirname "$HERE")")" = "ssl_nb" ]; then                          # already ssl_nb/kernels/
    export PYTHONPATH="$(dirname "$(dirname "$HERE")")${PYTHONPATH:+:$PYTHONPATH}"
fi
# python puts the working directory first on sys.path: run from a folder without a stray ssl_nb/ (the repository
# root has ssl_nb/ without kernels/)
cd "${PP:-$(mktemp -d)}"
say "PYTHONPATH=${PYTHONPATH:-} cwd=$(pwd)"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET SSL_NB_KERNELS

(nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,power.limit --format=csv) \
    > "$OUT/nvidia-smi.txt" 2>&1 || true
head -n 12 "$OUT/nvidia-smi.txt"
"$PY" -c "import torch, triton, numpy, ssl_nb.kernels as K; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-', 'ssl_nb.kernels from', K.__file__)" 2>&1 | tee "$OUT/versions.txt"

# ---- 1. correctness (compiled Triton vs reference on the GPU)
say "correctness checks (python -m ssl_nb.kernels.checks --device cuda)"
# shellcheck disable=SC2086   # CHECKS_ARGS: e.g. "--cases sum_over_programs losses_last_program_sums" or "--skip ..."
timeout "${CHECKS_TIMEOUT_S:-240}" "$PY" -m ssl_nb.kernels.checks --device cuda --out "$OUT" ${CHECKS_ARGS:-} 2>&1 \
    | tee "$OUT/checks.log"
CHECKS=${PIPESTATUS[0]}
say "checks exit status $CHECKS ($(grep -c '^PASS' "$OUT/checks.log") passed, $(grep -c '^FAIL' "$OUT/checks.log") failed)"
grep '^FAIL' "$OUT/checks.log" | cut -c1-400

# ---- 2. benchmark
say "benchmark (python -m ssl_nb.kernels.bench)"
# shellcheck disable=SC2086   # BENCH_ARGS: more options, word-split (e.g. "--tune --no-compile --only losses")
timeout 270 "$PY" -m ssl_nb.kernels.bench --out "$OUT" --budget-s "${BENCH_BUDGET_S:-150}" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/bench.log" | grep --line-buffered -E '\] (== |copy |env:|skip |wrote )|ERROR|Traceback' | cut -c1-300
BENCH=${PIPESTATUS[0]}
say "benchmark exit status $BENCH"
[ -f "$OUT/bench.md" ] && sed '/^### /,$d' "$OUT/bench.md"      # header, targets and the layouts list
ls -la "$OUT"
say "done: checks=$CHECKS bench=$BENCH"
[ "$CHECKS" = 0 ] && [ "$BENCH" = 0 ]
