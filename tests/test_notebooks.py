"""End-to-end: a method notebook executed by papermill with tiny parameters, as `make demo` and users run it."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def papermill(nb, out, timeout, **params):
    flags = [a for k, v in params.items() for a in ("-p", k, str(v))]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "2"}
    return subprocess.run([BIN / "papermill", ROOT / "nbs" / nb, out, "-k", "python3", "--cwd", ROOT / "nbs", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


NOTEBOOKS = {"fixmatch.ipynb": ("supervised", "fixmatch"), "flexmatch.ipynb": ("fixmatch", "flexmatch"),
             "refixmatch.ipynb": ("refixmatch", "supervised"), "sequencematch.ipynb": ("sequencematch", "supervised"),
             "simmatch.ipynb": ("simmatch",), "comatch.ipynb": ("comatch",), "epass.ipynb": ("simmatch", "simmatch+epass")}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_method_notebook_runs_end_to_end(tmp_path, name):
    run_dir = tmp_path / "run"
    params = dict(num_iters=4, eval_every=2, batch_size=8, uratio=2, eval_limit=256, run_dir=run_dir, progress=False)
    r = papermill(name, tmp_path / name, timeout=540, **params)
    assert r.returncode == 0, r.stderr[-4000:]
    nb = json.loads((tmp_path / name).read_text())
    errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
    assert sum("parameters" in t for t in tags) == 1, "the parameters cell lost its tag"
    injected = [c for c, t in zip(nb["cells"], tags) if "injected-parameters" in t]
    assert len(injected) == 1 and tags.index(["injected-parameters"]) == tags.index(["parameters"]) + 1
    src = "".join(injected[0]["source"])
    for k, v in params.items():
        assert f"{k} = {v!r}" in src or f'{k} = "{v}"' in src, (k, src)
    for algo in NOTEBOOKS[name]:
        res = json.loads((run_dir / algo / "results.json").read_text())
        assert (res["algorithm"], res["steps"]) == (algo.split("+")[0], 4)
        assert 0 <= res["last_top1"] <= 1 and res["best_step"] in (2, 4)
        assert [r["step"] for r in map(json.loads, (run_dir / algo / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "eval"] == [2, 4]
    assert any(p.name.startswith("curves") for p in (run_dir / "plots").iterdir())
