#!/usr/bin/env bash
# Issue 4's evidence: SimMatch and CoMatch with one projector (baseline) and with EPASS's three, on Fashion-MNIST with
# 40 and 250 labels, 3 seeds each, at the budget of ssl_grid.sh. Reports top-1, ECE (15 bins) and the spread of the
# per-class accuracies. Writes runs/bench/epass/{runs.csv,table.md,plot.png,budget.md}.
cd "$(dirname "$0")/.." && exec .venv/bin/python benchmarks/grid.py --jobs 2 \
  --algorithms simmatch simmatch+epass comatch comatch+epass --labels 40 250 --seeds 0 1 2 \
  --out runs/bench/epass -- --num-iters 1000 --batch-size 16 --uratio 3 --eval-every 500 "$@"
