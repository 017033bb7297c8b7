#!/usr/bin/env bash
# Issue 18's device check in ONE call: the end-to-end throughput table (benchmarks/throughput.py: ssl_nb's whole
# training iteration against the USB-style pipeline, WRN-28-2 / WRN-28-8 / MAE), then the reference scripts of the
# shared baselines on the same card (pipeline.py: USB-style DataLoader + WRN-28-2 step; anchors.py: bandwidth,
# losses, WRN and MAE steps). Synthetic data only: no dataset is needed on the device machine.
#
# Before the call (here, once): the baselines travel in an ignored folder of the repository:
#   mkdir -p .carry/baselines && cp ../shared/baselines/anchors.py ../shared/baselines/pipeline.py .carry/baselines/
# The call (device tool): carry [".carry"], timeout_s 600, command:
#   bash tools/gpu_session_e2e.sh "$OUT"
#
# Time: every step gets at most what is left of TOTAL_S (default 560 s; the tool stops a command at 600 s) so that the
# results file is always written. Shares (seconds, each capped by what is left): throughput THROUGHPUT_S (330; its rows
# past --budget-s are skipped and named in the table), pipeline.py PIPELINE_S (90), anchors.py the rest (up to
# ANCHORS_S, 120). THROUGHPUT_ARGS adds options (e.g. "--no-compile" or "--groups wrn_28_2").
# What comes back (8 files at most): e2e.md (the throughput table, then pipeline.py's and anchors.py's rows as
# tables), throughput.jsonl, pipeline.jsonl, anchors.jsonl, session.log, nvidia-smi.txt.
set -u
OUT="${1:?usage: gpu_session_e2e.sh OUT}"; mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
END=$(( $(date +%s) + ${TOTAL_S:-560} ))
left() { local l=$(( END - $(date +%s) - 10 )); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 0 ] && l=0; echo "$l"; }
LOG="$OUT/session.log"
say() { echo "[e2e $(date +%T)] $*" | tee -a "$LOG"; }

# ssl_nb as a package with kernels/ as ssl_nb.kernels (as setup.py installs it), outside the repository root
PP="$(mktemp -d)"; mkdir -p "$PP/ssl_nb"; cp "$ROOT"/ssl_nb/*.py "$PP/ssl_nb/"; cp -r "$ROOT/kernels" "$PP/ssl_nb/kernels"
rm -rf "$PP/ssl_nb/kernels/__pycache__"
export PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET SSL_NB_KERNELS
(nvidia-smi; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv) > "$OUT/nvidia-smi.txt" 2>&1
say "python $($PY -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())' 2>&1)"

# 1. the throughput table (the issue's command)
T=$(left "${THROUGHPUT_S:-330}")
say "throughput.py (hard limit ${T}s, rows skipped after $(( T - 60 ))s)"
(cd "$PP" && timeout "$T" "$PY" "$ROOT/benchmarks/throughput.py" --out "$OUT/tp" --budget-s "$(( T - 60 ))" \
  ${THROUGHPUT_ARGS:-} >> "$LOG" 2>&1); say "throughput.py exit $?"
cp "$OUT/tp/throughput.jsonl" "$OUT/" 2>/dev/null

# 2. pipeline.py and 3. anchors.py (they write pipeline.jsonl / anchors.jsonl into $OUT themselves)
B="$ROOT/.carry/baselines"
if [ -f "$B/pipeline.py" ]; then
  T=$(left "${PIPELINE_S:-90}"); say "pipeline.py (limit ${T}s)"
  (cd "$B" && OUT="$OUT" timeout "$T" "$PY" pipeline.py >> "$LOG" 2>&1); say "pipeline.py exit $?"
else say "no .carry/baselines/pipeline.py (see the header of this script): skipped"; fi
if [ -f "$B/anchors.py" ]; then
  T=$(left "${ANCHORS_S:-120}"); say "anchors.py (limit ${T}s)"
  if [ "$T" -ge 20 ]; then (cd "$B" && OUT="$OUT" timeout "$T" "$PY" anchors.py >> "$LOG" 2>&1); say "anchors.py exit $?"
  else say "no time left for anchors.py"; fi
else say "no .carry/baselines/anchors.py: skipped"; fi

# the results file: the throughput table, then the reference scripts' rows
"$PY" - "$OUT" <<'EOF' >> "$LOG" 2>&1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(name):
    p = out / name
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
md = [(out / "tp" / "throughput.md").read_text() if (out / "tp" / "throughput.md").exists()
      else "throughput.py wrote no table (see session.log).\n"]
pl = [r for r in rows("pipeline.jsonl") if "algo" in r]
if pl:
    md += ["\n## pipeline.py on this card (USB-style DataLoader + WRN-28-2 step; ms per iteration)\n",
           "| method | mode | workers | with CPU augmentation | inputs on the GPU | h per 2^20 (CPU aug) |", "|---|---|---|---|---|---|"]
    md += [f"| {r['algo']} | {r['mode']} | {r['workers']} | {r['ms_per_iter_with_cpu_aug']:.2f} | "
           f"{r['ms_per_iter_gpu_resident']:.2f} | {r['hours_2pow20_with_cpu_aug']:.1f} |" for r in pl]
an = [r for r in rows("anchors.jsonl") if r.get("section") in ("wrn_step", "mae_vit_step", "bandwidth") and "wall_s" not in r]
if an:
    md += ["\n## anchors.py on this card (no data loading, EMA or SSL loss)\n", "| section | what | ms | images/s |", "|---|---|---|---|"]
    for r in an:
        if r["section"] == "bandwidth": md.append(f"| bandwidth | {r['what']} | {r['ms']:.3f} | {r['TBps']:.2f} TB/s |")
        elif r["section"] == "wrn_step": md.append(f"| wrn_step | {r['net']} {r['algo']} {r['mode']} ({r['images']} images) | {r['step_ms']:.2f} | {r['img_per_s']:,.0f} |")
        else: md.append(f"| mae_vit_step | {r['model']}, batch {r['batch']}, keep {r['keep']} | {r['step_ms']:.2f} | {r['img_per_s']:,.0f} |")
errs = [r for name in ("pipeline.jsonl", "anchors.jsonl") for r in rows(name) if "error" in r]
if errs: md += ["\nErrors: " + "; ".join(f"{r.get('section', '?')}: {r['error']}" for r in errs)]
(out / "e2e.md").write_text("\n".join(md) + "\n")
print((out / "e2e.md").read_text())
EOF
rm -rf "$OUT/tp" "$PP"
ls -la "$OUT" | tee -a "$LOG"
tail -n 60 "$OUT/e2e.md"
