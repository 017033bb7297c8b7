"""The masked-image-modeling methods as engine tasks (`ssl_nb.mae`, `ssl_nb.simmim`, `ssl_nb.symmim`): MoCo v3's loss,
the momentum branch's EMA, each method training its weights (and SymMIM its momentum branch, as checkpointed task
state), a killed and resumed run equal to an uninterrupted one, the papermill runs of the three notebooks (the MAE
notebook's also runs the linear probe and the fine-tuning of the pre-trained encoder), the grid's tiny mode and the
step benchmark's dry run.

Tiny settings throughout: the micro ViT of the embedded default, batch 8, a k-NN bank of 20 images and 20 test images.
"""
import dataclasses, importlib.util, json, math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssl_nb.core import ALGORITHMS, load_checkpoint
from ssl_nb.train import fit, make_config
from ssl_nb.losses import moco_v3_loss
from ssl_nb.mae import initial_checkpoint
from ssl_nb.symmim import MomentumBranch, SymMIM
from test_notebooks import papermill
from test_train import Killed, assert_same, kill_at, metric_rows

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(batch_size=8, knn_labels=20, eval_limit=20, eval_batch_size=64, log_every=1, progress=False,
            tensorboard=False, device="cpu", warmup_iters=1)


def tiny(algorithm, run_dir, **kw):
    return make_config(algorithm, **{**TINY, **kw}, run_dir=str(run_dir))


# ------------------------------------------------------------------------------------------------ MoCo v3's loss, EMA
def test_moco_v3_loss_is_2tau_log_b_for_random_and_zero_for_an_orthogonal_batch():
    B, tau = 64, 0.2
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, 4096, generator=g), torch.randn(B, 4096, generator=g)
    assert abs(moco_v3_loss(q, k, tau) - 2 * tau * math.log(B)) < 0.02 * 2 * tau * math.log(B)
    eye = torch.eye(B)                                              # k = q, an orthogonal batch, small tau
    assert moco_v3_loss(eye * 3, eye, 0.02) < 1e-12
    q.requires_grad_(True); k.requires_grad_(True)
    moco_v3_loss(q, k, tau).backward()
    assert q.grad is not None and k.grad is None                    # k is a target


def _online():
    return SymMIM(make_config("symmim")).model


def test_momentum_branch_m1_keeps_m0_copies():
    online = _online()
    branch = MomentumBranch(online)
    with torch.no_grad():
        for p in online.parameters(): p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in branch.state_dict().items()}
    branch.update(online, 1.0)
    assert_same(branch.state_dict(), before, "m=1")
    branch.update(online, 0.0)
    for part in ("encoder", "projector"):
        src = dict(getattr(online, part).named_parameters())
        for n, p in getattr(branch, part).named_parameters(): assert torch.equal(p, src[n]), (part, n)
    assert not any(p.requires_grad for p in branch.parameters())


def test_checkpoint_loads_local_weights_into_each_method(tmp_path):
    "`checkpoint=` starts a method from local weights (here an MAE file in MAE's own key names: `model`, decoder_*)."
    from ssl_nb.mim import create_mae
    src = create_mae()
    def mae_name(k):                                                # ssl_nb's names -> models_mae.py's
        part, _, rest = k.partition(".")
        return rest if part == "encoder" else "mask_token" if rest == "mask_token" else "decoder_" + rest
    sd = {mae_name(k): v for k, v in src.state_dict().items()}
    torch.save({"model": sd}, tmp_path / "mae.pth")
    for algorithm in ("mae", "symmim"):
        task = ALGORITHMS.get(algorithm)(make_config(algorithm, checkpoint=str(tmp_path / "mae.pth")))
        enc = task.model.encoder
        assert all(torch.equal(v, src.encoder.state_dict()[k]) for k, v in enc.state_dict().items()), algorithm
    symmim = ALGORITHMS.get("symmim")(make_config("symmim", checkpoint=str(tmp_path / "mae.pth")))
    assert torch.equal(symmim.momentum_branch.encoder.cls_token, src.encoder.cls_token)   # copied after loading


# ------------------------------------------------------------------------------------------------ training
ALGORITHM_MODEL = {"mae": {"encoder", "decoder"}, "simmim": {"encoder", "head"}, "symmim": {"mim", "projector", "predictor"}}
_RUNS = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A 2-step run of an algorithm and the weights it started from (one per algorithm, shared by the tests below)."
    def get(algorithm):
        if algorithm not in _RUNS:
            d = tmp_path_factory.mktemp(algorithm)
            cfg = tiny(algorithm, d / "run", num_iters=2, eval_every=2)
            init = load_checkpoint(initial_checkpoint(cfg, d / "init.pt"))["model"]
            _RUNS[algorithm] = (fit(cfg), init)
        return _RUNS[algorithm]
    return get


@pytest.mark.parametrize("algorithm", ["mae", "simmim", "symmim"])
def test_each_method_trains_its_weights_and_checkpoints_its_state(algorithm, trained):
    res, init = trained(algorithm)
    ck = load_checkpoint(res.run_dir / "last.pt")
    fixed = {n for n in init if n.endswith("pos_embed")}            # MAE's fixed sin-cos positions
    assert fixed and all(torch.equal(ck["model"][n], init[n]) for n in fixed)
    moved = {n for n in init if n not in fixed and not torch.equal(ck["model"][n], init[n])}
    stayed = sorted(n for n in init if n not in fixed and n not in moved and init[n].is_floating_point())
    assert not stayed, f"{algorithm}: weights that did not train: {stayed[:5]}"
    assert {n.split(".")[0] for n in moved} == ALGORITHM_MODEL[algorithm]
    assert 0 <= res.last_knn_top1 <= 1 and res.metric == "knn_top1"
    if algorithm == "symmim":                                       # the momentum branch: task state, moved at step 1
        branch = ck["task"]["momentum_branch"]
        assert {n.split(".")[0] for n in branch} == {"encoder", "projector"}
        assert not torch.equal(branch["encoder.blocks.0.attn.qkv.weight"], init["mim.encoder.blocks.0.attn.qkv.weight"])
        rows = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["momentum"] for r in rows if r["kind"] == "train"] == [pytest.approx(0.99), pytest.approx(0.995)]
    else:
        assert ck["task"] == {}


def test_killed_and_resumed_symmim_equals_uninterrupted(tmp_path):
    "Momentum branch, per-sample (device) and per-batch (host) phase draws, two micro-batches a step, both key paths."
    N, kw = 2, dict(symmetrize=True, accum_steps=2)
    full = fit(tiny("symmim", tmp_path / "full", num_iters=2 * N, eval_every=N, **kw))
    cfg = tiny("symmim", tmp_path / "killed", num_iters=2 * N, eval_every=N, ckpt_every=N, **kw)
    with pytest.raises(Killed):
        fit(cfg, callbacks=[kill_at(N + 1)])
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] == N
    resumed = fit(dataclasses.replace(cfg, resume=True))
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["task"]["momentum_branch"]
    for k in ("model", "optimizer", "loader", "task", "aug_rng", "cpu_rng", "best", "history"):
        assert_same(a[k], b[k], k)
    assert_same(metric_rows(tmp_path / "full"), metric_rows(tmp_path / "killed"), "metrics.jsonl")
    assert (full.best, full.last_knn_top1) == (resumed.best, resumed.last_knn_top1)


# ------------------------------------------------------------------------------------------------ notebooks
NOTEBOOK_RUNS = {"mae.ipynb": ("mae", "probe", "probe_init", "finetune"), "simmim.ipynb": ("simmim", "probe", "probe_init"),
                 "symmim.ipynb": ("symmim", "probe", "probe_init")}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", NOTEBOOK_RUNS)
def test_method_notebook_runs_end_to_end(tmp_path, name):
    params = dict(num_iters=2, batch_size=8, eval_every=2, eval_limit=20, knn_labels=20, probe_iters=2,
                  probe_labels=20, run_dir=tmp_path / "run", progress=False)
    if name == "mae.ipynb": params["finetune_iters"] = 2
    r = papermill(name, tmp_path / name, timeout=540, **params)
    assert r.returncode == 0, r.stderr[-4000:]
    nb = json.loads((tmp_path / name).read_text())
    errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors
    for run in NOTEBOOK_RUNS[name]:
        res = json.loads((tmp_path / "run" / run / "results.json").read_text())
        assert res["steps"] == 2 and 0 <= res[f"best_{res['metric']}"] <= 1
    assert {p.name for p in (tmp_path / "run" / "plots").iterdir()} == {"curves.png", "reconstructions.png"}


# ------------------------------------------------------------------------------------------------ benchmarks
def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_mim_grid_tiny_mode_writes_the_table_plot_and_runs(tmp_path, capsys):
    out = tmp_path / "grid"
    _script("mim_grid").main(["--tiny", "--out", str(out), "--threads", "1", "--results", str(tmp_path / "res" / "mim")])
    table = (out / "table.md").read_text()
    for label in ("SymMIM", "MAE 0.5", "MAE 0.75", "MAE 0.9", "SimMIM 0.6", "random init", "SymMIM λ=0",
                  "SymMIM − MAE 0.75"):
        assert label in table, label
    runs = (out / "runs.csv").read_text().splitlines()
    assert len(runs) == 1 + 7 and "knn_top1" in runs[0] and "probe_top1" in runs[0]
    assert (out / "knn.png").stat().st_size > 0
    curves = (out / "knn_curves.csv").read_text().splitlines()
    assert len(curves) == 1 + 6 * 2                                  # 6 pre-training runs, evaluated at steps 1 and 2
    res = tmp_path / "res" / "mim.md"
    res.write_text(res.read_text() + "what the numbers show\n")      # the hand-written part survives a re-summary
    _script("mim_grid").main(["--tiny", "--out", str(out), "--threads", "1", "--results", str(tmp_path / "res" / "mim"),
                              "--summarize-only"])
    assert res.read_text().endswith("what the numbers show\n") and (tmp_path / "res" / "mim_runs.csv").exists()


def test_mim_step_dry_run(capsys):
    mim_step = _script("mim_step")
    if not mim_step.ANCHORS.is_file():      # the shared baselines are not part of the repository
        pytest.skip(f"anchors.py not found ({mim_step.ANCHORS}); set ANCHORS_PY to run this check")
    mim_step.main(["--dry-run"])
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert {row["impl"] for row in rows} == {"anchors.py MAE step", "ssl_nb MAE step", "ssl_nb SymMIM step"}
    assert [r["keep"] for r in rows if r["impl"] == "anchors.py MAE step"] == [0.25, 0.5]
    assert all(row["step_ms"] > 0 for row in rows)
