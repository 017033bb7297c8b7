#!/usr/bin/env bash
# The one command of a borrowed-GPU session: kernel correctness checks and benchmark (tools/gpu_check.sh), the
# host-time profile of the small fused loss (tools/cudaprof.py), then end-to-end training steps. Needs
# Fashion-MNIST's four IDX files in .carry/fashion-mnist (an ignored folder):
#   mkdir -p .carry/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .carry/fashion-mnist/
#   device run: carry [".carry"], command: bash tools/gpu_session.sh "$OUT"
set -u
OUT="${1:?usage: gpu_session.sh OUT}"; mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the device tool stops a command at 600 s: every step gets at most what is left of TOTAL_S (default 570 s), so that
# the archive at the end is always written
END=$(( $(date +%s) + ${TOTAL_S:-570} ))
left() { local l=$(( END - $(date +%s) - 15 )); [ "$l" -gt "$1" ] && l=$1; echo "$l"; }
CHECKS_TIMEOUT_S="$(left "${CHECKS_TIMEOUT_S:-240}")" BENCH_BUDGET_S="${BENCH_BUDGET_S:-120}" \
  timeout "$(left 520)" bash "$ROOT/tools/gpu_check.sh" "$OUT"
PP="$(mktemp -d)"; mkdir -p "$PP/ssl_nb"; cp "$ROOT"/ssl_nb/*.py "$PP/ssl_nb/"; cp -r "$ROOT/kernels" "$PP/ssl_nb/kernels"
if [ "$(left 90)" -ge 30 ]; then
  (cd "$PP" && PYTHONPATH="$PP" timeout "$(left 90)" python3 "$ROOT/tools/cudaprof.py" --out "$OUT" > "$OUT/cudaprof.log" 2>&1)
  head -n 24 "$OUT/cudaprof.log"    # (not `| head`: its early exit would kill cudaprof before it writes cudaprof.txt)
else echo "gpu_session: no time left for cudaprof"; fi
if [ "$(left "${SMOKE_TIMEOUT_S:-150}")" -ge 60 ]; then
  (cd "$PP" && PYTHONPATH="$PP" PYTHONUNBUFFERED=1 timeout "$(left "${SMOKE_TIMEOUT_S:-150}")" python3 \
    "$ROOT/tools/gpu_train_smoke.py" "$OUT" "$ROOT/.carry/fashion-mnist" "${SMOKE_STEPS:-300}" 2>&1 | tail -n 20)
else echo "gpu_session: no time left for the training smoke test"; fi
# the device tool returns at most 8 files: keep the two summaries, pack everything into one archive
cd "$OUT" && tar czf all.tgz --exclude=all.tgz . && find . -maxdepth 1 -type f ! -name all.tgz ! -name bench.md ! -name train_smoke.json ! -name cudaprof.txt -delete
ls -la "$OUT"
