#!/usr/bin/env bash
# The one command of a borrowed-GPU session: what the open GPU items need, in order of priority, each step with its
# own time limit inside TOTAL_S (default 540 s; the device tool stops a command at 600 s) so that the summary is always
# written:
#   1. benchmarks/throughput.py: ssl_nb's whole SSL iteration against the USB-style pipeline, WRN-28-2 / WRN-28-8 and
#      the ViT-B/16 MAE step (issue 18's table)                                           THROUGHPUT_S (default 260)
#   2. benchmarks/mim_step.py: ViT-B/16 MAE step against anchors.py's, and SymMIM's (issue 14)      MIM_S (70)
#   3. benchmarks/save_speed.py: SAVE ViT-B training step and inference at 256 and 1024 px (issue 17) SAVE_S (70)
#   4. pytest -m cuda: every compiled kernel against its reference, and the graph-captured step     CHECKS_S (110)
# Synthetic data only. Before the call (here, once), the shared baselines travel in an ignored folder:
#   mkdir -p .carry/baselines && cp ../shared/baselines/anchors.py ../shared/baselines/pipeline.py .carry/baselines/
# The call (device tool): carry [".carry"], timeout_s 600, command: bash tools/gpu_session.sh "$OUT"
# DRY=1 runs every step's --dry-run on the CPU (checks this script; the numbers mean nothing).
# What comes back: summary.md (every table), session.log, all.tgz (every file), nvidia-smi.txt.
# The kernels' own benchmark is tools/gpu_check.sh (a session of its own).
set -u
OUT="${1:?usage: gpu_session.sh OUT}"; mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
END=$(( $(date +%s) + ${TOTAL_S:-540} ))
left() { local l=$(( END - $(date +%s) - 15 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 0 ] && l=0; echo "$l"; }
LOG="$OUT/session.log"
say() { echo "[gpu_session $(date +%T)] $*" | tee -a "$LOG"; }
DRY_FLAG=(); [ -n "${DRY:-}" ] && DRY_FLAG=(--dry-run)

# ssl_nb as installed (kernels/ as ssl_nb.kernels), in a folder of its own, first on the path
PP="$(mktemp -d)"; mkdir -p "$PP/ssl_nb"; cp "$ROOT"/ssl_nb/*.py "$PP/ssl_nb/"; cp -r "$ROOT/kernels" "$PP/ssl_nb/kernels"
rm -rf "$PP/ssl_nb/kernels/__pycache__"
export PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[ -z "${DRY:-}" ] && unset TRITON_INTERPRET SSL_NB_KERNELS
(nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv) > "$OUT/nvidia-smi.txt" 2>&1
say "$($PY -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")' 2>&1)"
cd "$PP"

step() {  # step NAME LIMIT_S COMMAND...: run with a hard limit, log its exit status
  local name=$1 t; t=$(left "$2"); shift 2
  if [ "$t" -lt 20 ]; then say "$name: no time left, skipped"; return; fi
  say "$name (limit ${t}s)"; timeout "$t" "$@" >> "$LOG" 2>&1; say "$name exit $?"
}
step throughput "${THROUGHPUT_S:-260}" "$PY" "$ROOT/benchmarks/throughput.py" --out "$OUT/throughput" \
  --budget-s "$(( ${THROUGHPUT_S:-260} - 50 ))" "${DRY_FLAG[@]}"
step mim_step "${MIM_S:-70}" bash -c 'OUT="$1" "$2" "$3" "${@:4}" > "$1/mim_step.out"' _ "$OUT" "$PY" \
  "$ROOT/benchmarks/mim_step.py" "${DRY_FLAG[@]}"
step save_speed "${SAVE_S:-70}" "$PY" "$ROOT/benchmarks/save_speed.py" --out "$OUT/save_speed.md" "${DRY_FLAG[@]}"
if [ -z "${DRY:-}" ]; then
  step cuda_checks "${CHECKS_S:-110}" "$PY" -m pytest "$ROOT/tests/test_kernel_checks.py" "$ROOT/tests/test_train.py" \
    -m cuda -q -rfEs -p no:cacheprovider --continue-on-collection-errors --rootdir "$ROOT"
fi

# summary.md: every table, then the checks' last lines
{
  echo "# GPU session $(date -u +%F) on $(head -c 200 "$OUT/nvidia-smi.txt" | grep -o 'NVIDIA [A-Z0-9]*[^|]*' | head -n 1)"
  for f in "$OUT/throughput/throughput.md" "$OUT/save_speed.md"; do
    echo; if [ -f "$f" ]; then cat "$f"; else echo "($(basename "$f"): not written, see session.log)"; fi
  done
  echo; echo "## MIM steps (benchmarks/mim_step.py)"; grep -A30 -E '^\| step \|' "$OUT/mim_step.out" 2>/dev/null \
    || echo "(no table: see session.log)"
  echo; echo '## Log (last lines)'; echo; echo '```'; grep -E 'exit|passed|failed|error' "$LOG" | tail -n 20; echo '```'
} > "$OUT/summary.md"
cd "$OUT" && tar czf all.tgz --exclude=all.tgz . && find . -mindepth 1 -maxdepth 1 ! -name all.tgz ! -name summary.md \
  ! -name session.log ! -name nvidia-smi.txt -exec rm -rf {} +
rm -rf "$PP"
ls -la "$OUT"; tail -n 40 "$OUT/summary.md"
