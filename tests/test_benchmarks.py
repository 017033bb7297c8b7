"The grid's summaries (benchmarks/grid.py): paired differences of a variant from its baseline."
import importlib.util
from pathlib import Path

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("grid", Path(__file__).parents[1] / "benchmarks" / "grid.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def _row(spec, n, seed, top1, ece=0.1, std=0.2):
    return dict(spec=spec, num_labels=n, seed=seed, last_top1=top1, last_ece=ece, class_std=std)


def test_paired_differences_by_seed(grid):
    df = pd.DataFrame([_row("simmatch", 40, 0, 0.60), _row("simmatch+epass", 40, 0, 0.62, ece=0.08),
                       _row("simmatch", 40, 1, 0.70), _row("simmatch+epass", 40, 1, 0.69, ece=0.11),
                       _row("simmatch", 40, 2, 0.50),                          # no variant for seed 2: not paired
                       _row("comatch", 40, 0, 0.55)])                          # no variant in the grid: no row
    t = grid.paired(df, ["simmatch", "simmatch+epass", "comatch"])
    assert list(t.index) == [(40, "simmatch+epass − simmatch")]
    r = t.iloc[0]
    # top-1: +2 and -1 points -> mean +0.50, std (ddof=1) sqrt(4.5) = 2.12, one of two positive
    assert r["Δ top-1"] == "+0.50 ± 2.12 (1/2 > 0)"
    assert r["Δ ECE"] == "-0.50 ± 2.12 (1/2 > 0)"
    assert r["Δ per-class std"] == "+0.00 ± 0.00 (0/2 > 0)"


def test_no_pairs_without_variants(grid):
    df = pd.DataFrame([_row("fixmatch", 40, 0, 0.6), _row("supervised", 40, 0, 0.5)])
    assert grid.paired(df, ["supervised", "fixmatch"]) is None


def test_a_finished_run_with_other_flags_is_not_reused(grid, tmp_path):
    "Re-running a grid with another budget into the same --out stops instead of tabulating the old runs."
    run_dir = tmp_path / "fixmatch-40-s0"
    run_dir.mkdir()
    (run_dir / "grid_cmd.json").write_text('["ssl_nb.cli", "fit", "fixmatch", "--num-iters", "1000"]')
    (run_dir / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="was trained with other flags"):
        grid.run_one("fixmatch", 40, 0, tmp_path, ["--num-iters", "500"], threads=1)
