"benchmarks/throughput.py end to end on the CPU (--dry-run): ssl_nb's real step, the USB-style pipeline, the table."
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--dry-run", "--out", str(out),
                        "--groups", "wrn_28_2", "mae"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(l) for l in (out / "throughput.jsonl").read_text().splitlines()]
    return (out / "throughput.md").read_text(), lines[0]["meta"], lines[1:]


def _row(rows, algo, pipeline, variant):
    found = [r for r in rows if (r["algo"], r["pipeline"], r["variant"]) == (algo, pipeline, variant)]
    assert len(found) == 1, (algo, pipeline, variant, [(r["algo"], r["pipeline"], r["variant"]) for r in rows])
    return found[0]


def test_every_row_ran_the_real_step(dry_run):
    md, meta, rows = dry_run
    assert meta["dry_run"] and meta["batch"] == 4 and meta["uratio"] == 2
    for algo, views in (("fixmatch", 2), ("sequencematch", 3)):
        for pipeline, variant in (("ssl_nb", "default"), ("ssl_nb", "eager step"), ("ssl_nb", "torch losses"), ("ssl_nb", "fp32"),
                                  ("usb", "fp32"), ("usb", "bf16+cl")):
            r = _row(rows, algo, pipeline, variant)
            assert r["ms"] > 0 and r["cpu_ms"] > 0
            assert r["images"] == 4 + 4 * 2 * views                   # B labeled + mu * B per unlabeled view
            if pipeline == "ssl_nb":
                assert math.isfinite(r["loss"]) and r["loss"] > 0     # a logged loss: the task's train_step ran
                assert r["net"] == "wrn_10_2" and r["precision"] == "fp32"
        assert _row(rows, algo, "ssl_nb", "fp32")["channels_last"] is False
        # graph_step="auto" takes the eager step on the CPU (the static step has its own tests in test_train.py)
        assert _row(rows, algo, "ssl_nb", "default")["graph"] is False and _row(rows, algo, "ssl_nb", "eager step")["graph"] is False
        assert _row(rows, algo, "ssl_nb", "default")["channels_last"] is True


def test_table_ratios_and_marking(dry_run):
    md, meta, rows = dry_run
    assert md.startswith("**CPU DRY RUN")
    assert "| row | network | method | pipeline | variant |" in md and "h per 2^20 iters" in md
    ours, usb = _row(rows, "sequencematch", "ssl_nb", "default"), _row(rows, "sequencematch", "usb", "fp32")
    # the ratio column is the USB-style row's ms over ours, hours are ms * 2^20 / 3.6e6
    line = next(l for l in md.splitlines() if "| sequencematch | ssl_nb | default |" in l)
    cells = [c.strip() for c in line.split("|")]
    assert cells[8] == f"{ours['ms']:.2f}" and cells[11] == f"{usb['ms'] / ours['ms']:.2f}"
    assert cells[13] == f"{ours['ms'] * 2**20 / 3.6e6:.1f}"
    assert "Issue 18's targets:" in md and "compile rows skipped" in md


def test_mae_rows_or_a_note(dry_run):
    md, meta, rows = dry_run
    if importlib.util.find_spec("ssl_nb.mae") is None:
        assert "ssl_nb.mae is not available" in md
        return
    ours, anchor = _row(rows, "mae", "ssl_nb", "default"), _row(rows, "mae", "anchor", "anchors.py")
    assert ours["images"] == anchor["images"] == 4 and math.isfinite(ours["loss"])
    assert f"MAE: ssl_nb's step is {anchor['ms'] / ours['ms']:.2f}× anchors.py's" in md
