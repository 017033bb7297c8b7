#!/usr/bin/env bash
# Issue 3's evidence: supervised-only, FixMatch, FlexMatch, ReFixMatch and SequenceMatch on Fashion-MNIST with 40 and
# 250 labels, 3 seeds each, at one CPU budget (1,000 steps of 16 labeled + 48 unlabeled images, WRN-10-2).
# Writes runs/bench/ssl/{runs.csv,table.md,plot.png,budget.md}; re-running skips finished runs and resumes the others.
cd "$(dirname "$0")/.." && exec .venv/bin/python benchmarks/grid.py --jobs 2 \
  --algorithms supervised fixmatch flexmatch refixmatch sequencematch --labels 40 250 --seeds 0 1 2 \
  --out runs/bench/ssl -- --num-iters 1000 --batch-size 16 --uratio 3 --eval-every 500 "$@"
