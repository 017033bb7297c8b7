"""The `mocov2`, `disco`, `retro` (and `seed`) methods on the training engine (issue 15, spec §C.10 through `fit`): what trains
and what stays frozen, the mean student's EMA of the backbone only, the teacher and the shared head left out of the
checkpoints and rebuilt on resume, resume equal to an uninterrupted run, queue/batch errors before training, teachers
from workbook runs and MoCo-v2 files, linear evaluation with exactly two trainable tensors, both notebooks under
papermill and the benchmark's tiny mode.

Everything runs on scikit-learn's 8×8 digits (1,437 training images) with batch 16 and K = 64, except the notebooks
(Fashion-MNIST, a few steps, 64 test images).
"""
import dataclasses, importlib.util, json, math, os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from ssl_nb.core import ALGORITHMS, CheckpointError, ConfigError, load_checkpoint, seed_everything, unwrap
from ssl_nb.train import fit, make_config, read_metrics
from ssl_nb.mocov2 import lincls_config
from ssl_nb.retro import RetroStudent, load_teacher

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dataset="digits", batch_size=16, K=64, knn_bank=None, eval_limit=64, log_every=1, device="cpu",
            progress=False, tensorboard=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    "A workbook teacher: one step of `mocov2` with the CPU teacher trunk on digits."
    d = tmp_path_factory.mktemp("teacher")
    fit(make_config("mocov2", **TINY, net="cifar_resnet18_w32", num_iters=1, eval_every=1, run_dir=str(d)))
    return str(d / "last.pt")


def same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def moved(a: nn.Module, b: nn.Module) -> set:
    "Names of the weights of `a` that differ from `b`'s."
    return {k for (k, x), y in zip(a.state_dict().items(), b.state_dict().values())
            if k.endswith("weight") and not torch.equal(x, y)}


def start(cfg):
    "The task `fit` starts from (same seed, same construction)."
    seed_everything(cfg.seed)
    return ALGORITHMS.get(cfg.algorithm).from_config(cfg)


def fit_keep(cfg, at=None):
    "fit, returning the result and the task (and, at step `at`, copies of the model and key encoder)."
    seen = {}
    def cb(step, state):
        seen["task"] = state["task"]
        if step == at:
            seen["model"] = {k: v.clone() for k, v in unwrap(state["model"]).state_dict().items()}
    return fit(cfg, callbacks=[cb]), seen


def test_retro_two_steps_train_backbone_and_adapter_only_and_the_ema_follows_the_backbone(teacher, tmp_path):
    cfg = make_config("retro", **TINY, teacher=teacher, num_iters=2, eval_every=2, m=0.9, run_dir=str(tmp_path))
    ref = start(cfg)
    res, seen = fit_keep(cfg, at=1)
    task = seen["task"]
    # the head is one module: the teacher's, the student's and the mean student's, and it never trained
    assert task.model.head is task.teacher.head is task.key_encoder.head and task.key_encoder.adapter is task.model.adapter
    assert same(task.teacher, ref.teacher) and same(task.model.head, ref.model.head)
    assert not any(p.requires_grad for p in task.teacher.parameters()) and not task.teacher.encoder.training
    assert moved(task.model.adapter, ref.model.adapter) == {k for k in ref.model.adapter.state_dict() if k.endswith("weight")}
    assert moved(task.model.backbone, ref.model.backbone)
    # mean student: step 1 averaged equal weights (no change), step 2: θ̄ = m·θ0 + (1 − m)·θ1, on the backbone only
    b0 = ref.model.backbone.state_dict()
    b1 = {k[len("backbone."):]: v for k, v in seen["model"].items() if k.startswith("backbone.")}
    for k, p in task.key_encoder.backbone.named_parameters():
        torch.testing.assert_close(p.detach(), 0.9 * b0[k] + 0.1 * b1[k], rtol=1e-5, atol=1e-6)
    # neither the teacher nor the head it shares is in last.pt
    ck = load_checkpoint(tmp_path / "last.pt")
    assert set(ck["task"]) == {"key_encoder", "queue"} and int(ck["task"]["queue"]["ptr"]) == 32
    assert {k.split(".")[0] for k in ck["model"]} == {"backbone", "adapter"}
    assert {k.split(".")[0] for k in ck["task"]["key_encoder"]} == {"backbone", "adapter"}
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    assert cfg_json["params"]["adapter"] == sum(p.numel() for p in task.model.adapter.parameters())
    loaded = cfg_json["teacher_loaded"]
    assert cfg_json["teacher"] == teacher and loaded["format"] == "workbook" and loaded["arch"] == "cifar_resnet18_w32"
    assert 0 <= res.best_knn_top1 <= 1 and -1 <= res.last_cos_teacher <= 1
    assert {"l_con", "l_cons", "cos_t"} <= set(read_metrics(tmp_path, "train")[-1])


@pytest.mark.parametrize("algo", ["mocov2", "disco", "seed"])
def test_each_method_changes_its_weights_and_not_the_teacher(algo, teacher, tmp_path):
    extra = {"net": "cifar_resnet10_w16"} if algo == "mocov2" else {"teacher": teacher}
    cfg = make_config(algo, **TINY, **extra, num_iters=1, eval_every=1, run_dir=str(tmp_path))
    ref = start(cfg)
    _, seen = fit_keep(cfg)
    task = seen["task"]
    assert moved(task.model.head, ref.model.head) and moved(task.model.backbone, ref.model.backbone)
    if algo == "disco":
        assert task.model.head is not task.teacher.head and same(task.teacher, ref.teacher)
        assert task.key_encoder.head is not task.model.head               # DisCo's mean student averages its head too
        # DisCo's head: Linear(s_n, t_n)-ReLU-Linear(t_n, dim) with the teacher's widths (256 and 128 here)
        assert [tuple(m.weight.shape) for m in task.model.head if isinstance(m, nn.Linear)] == [(256, 128), (128, 256)]
    if algo == "seed":         # no mean student; the queue holds the teacher's embeddings of the step's view
        assert task.key_encoder is None and same(task.teacher, ref.teacher)
        x = ref.view(ref.train_set.images[:16], torch.Generator().manual_seed(1))
        ref.train_step({"x_q": x})
        torch.testing.assert_close(ref.queue.queue[:16], ref.teacher(x))
    ck = load_checkpoint(tmp_path / "last.pt")
    assert not any(k.startswith(("teacher", "encoder.")) for k in [*ck["model"], *ck["task"]])
    assert set(ck["task"]) == ({"queue"} if algo == "seed" else {"key_encoder", "queue"})


@pytest.mark.parametrize("algo,extra", [("retro", {"faithful_to_code": True}), ("disco", {})])
def test_resume_after_a_kill_equals_an_uninterrupted_run(algo, extra, teacher, tmp_path):
    kw = dict(**TINY, **extra, teacher=teacher, num_iters=4, eval_every=2, ckpt_every=2)
    full, _ = fit_keep(make_config(algo, **kw, run_dir=str(tmp_path / "full")))

    class Killed(Exception): pass
    def kill(step, state):
        if step == 3: raise Killed
    cfg = make_config(algo, **kw, run_dir=str(tmp_path / "killed"))
    with pytest.raises(Killed): fit(cfg, callbacks=[kill])
    res, seen = fit_keep(dataclasses.replace(cfg, resume=True))
    task = seen["task"]
    assert task.model.head is task.teacher.head if algo == "retro" else task.model.head is not task.teacher.head
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "killed" / "last.pt")
    for k in ("model", "optimizer", "task", "loader", "aug_rng", "cpu_rng", "best", "history"):
        assert _equal(a[k], b[k]), k
    assert res.last == full.last and res.history == full.history


def _equal(a, b) -> bool:
    if torch.is_tensor(a): return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def test_faithful_to_code_runs_the_teacher_bn_in_train_mode_and_keeps_its_statistics(teacher, tmp_path):
    cfg = make_config("retro", **TINY, teacher=teacher, faithful_to_code=True, num_iters=1, eval_every=1,
                      run_dir=str(tmp_path))
    ref = start(cfg)
    _, seen = fit_keep(cfg)
    t = seen["task"].teacher
    assert t.encoder.training and seen["task"].switches == {"retro_cross_view": True, "teacher_bn_train": True}
    assert same(t.encoder.head, ref.teacher.encoder.head)
    assert not torch.equal(t.encoder.backbone.bn1.running_mean, ref.teacher.encoder.backbone.bn1.running_mean)
    ck = load_checkpoint(tmp_path / "last.pt")
    assert set(ck["task"]) == {"key_encoder", "queue", "teacher_bn"}                    # statistics, not weights
    assert all("running" in k or "num_batches" in k for k in ck["task"]["teacher_bn"])


def test_queue_and_batch_errors_come_before_training(teacher, tmp_path):
    with pytest.raises(ConfigError, match="K=64 must be a multiple of the global batch of a step, batch_size / accum_steps = 24"):
        make_config("retro", **{**TINY, "batch_size": 24}, teacher=teacher)
    make_config("retro", **{**TINY, "batch_size": 32, "accum_steps": 2}, teacher=teacher)       # pushes of 16 divide 64
    with pytest.raises(ConfigError, match="multiple of shuffle_groups=3"):
        make_config("mocov2", **TINY, shuffle_groups=3)
    with pytest.raises(ConfigError, match="teacher must name"):
        make_config("disco", **TINY)
    with pytest.raises(ConfigError, match="net 'wrn_28_2' is not a student"):
        make_config("retro", **TINY, teacher=teacher, net="wrn_28_2")
    with pytest.raises(CheckpointError, match="is a 'retro' run"):                  # a student is not a teacher
        fit(make_config("retro", **TINY, teacher=teacher, num_iters=1, eval_every=1, run_dir=str(tmp_path / "s")))
        load_teacher(tmp_path / "s" / "last.pt", in_chans=1)


def test_teacher_from_an_official_moco_v2_checkpoint(tmp_path):
    "DisCo's teachers are `main_moco.py` checkpoints: module.encoder_q.* of a torchvision ResNet with the MLP head."
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=128)
    tv.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), tv.fc)
    sd = {f"module.encoder_q.{k}": v for k, v in tv.state_dict().items()}
    sd |= {f"module.encoder_k.{k}": v.clone() for k, v in tv.state_dict().items()}
    sd |= {"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, tmp_path / "moco.pth.tar")
    t = load_teacher(tmp_path / "moco.pth.tar")
    assert (t.arch, t.encoder.load_report.source) == ("resnet18", "moco")
    assert t.encoder.load_report.dropped["encoder_k"] == len(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(t(x), nn.functional.normalize(tv.eval()(x), dim=1), rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointError, match="use teacher_arch='resnet18'"):
        load_teacher(tmp_path / "moco.pth.tar", "resnet34")
    with pytest.raises(CheckpointError, match="reads 3-channel images and the dataset has 1"):
        load_teacher(tmp_path / "moco.pth.tar", in_chans=1)


@pytest.mark.parametrize("algo,width", [("retro", 256), ("disco", 128)])
def test_linear_eval_reads_backbone_and_adapter_with_exactly_two_trainable_tensors(algo, width, teacher, tmp_path):
    fit(make_config(algo, **TINY, teacher=teacher, num_iters=1, eval_every=1, run_dir=str(tmp_path / "pre")))
    probe = lincls_config(tmp_path / "pre" / "last.pt", num_iters=2, eval_every=2, eval_limit=64, device="cpu",
                          progress=False, tensorboard=False, run_dir=str(tmp_path / "probe"))
    res, seen = fit_keep(probe)
    task = seen["task"]
    assert [n for n, p in task.model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert task.trunk.num_features == width and 0 <= res.best_top1 <= 1 and "last_top1" in res.summary()
    src = load_checkpoint(tmp_path / "pre" / "last.pt")["model"]
    student = task.trunk.model
    if algo == "retro":        # backbone + adapter, pooled: the pre-trained weights, 256-d
        assert isinstance(student, RetroStudent) and torch.equal(student.adapter.conv_pw.weight, src["adapter.conv_pw.weight"])
    x = task.view(task.test_set.images[:4], None)
    torch.testing.assert_close(task.trunk(x), student.features(x))
    assert list(load_checkpoint(tmp_path / "probe" / "last.pt")["model"]) == ["fc.weight", "fc.bias"]


def test_the_benchmark_tiny_mode(tmp_path):
    spec = importlib.util.spec_from_file_location("retro_grid", ROOT / "benchmarks" / "retro_grid.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    out = tmp_path / "grid"
    mod.main(["--tiny", "--out", str(out), "--results", str(tmp_path / "results.md")])
    rows = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"teacher", "mocov2", "disco", "retro", "init"}
    assert [r["seed"] for r in rows if r["method"] == "retro"] == [0]
    for r in rows:
        assert 0 <= r["knn_best"] <= 1 and r["cpu_s"] > 0
        if r["method"] != "init": assert 0 <= r["probe_last"] <= 1 and r["trainable_params"] <= r["total_params"]
    assert all(r["adapter_params"] > 0 for r in rows if r["method"] == "retro")
    md = (tmp_path / "results.md").read_text()
    assert "| retro |" in md.lower() or "Retro" in md
    assert (out / "runs.csv").exists() and (out / "plot.png").exists()


def papermill(nb, out, timeout, **params):
    """`test_notebooks.papermill` with one OpenMP thread: these notebooks' tiny runs spend three times the CPU time with
    two threads on this 2-core machine (threads spinning on tiny tensors), for the same results."""
    import subprocess, sys
    from test_notebooks import BIN, ROOT as NB_ROOT
    flags = [a for k, v in params.items() for a in ("-p", k, str(v))]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([BIN / "papermill", NB_ROOT / "nbs" / nb, out, "-k", "python3", "--cwd", NB_ROOT / "nbs", *flags],
                          cwd=NB_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _notebook_ok(r, out):
    assert r.returncode == 0, r.stderr[-4000:]
    nb = json.loads(Path(out).read_text())
    errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, errors
    tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
    assert sum("parameters" in t for t in tags) == 1 and tags.index(["injected-parameters"]) == tags.index(["parameters"]) + 1


TINY_NB = dict(batch_size=16, K=64, eval_limit=64, knn_bank=100, probe_iters=2, probe_labels=100, progress=False)


@pytest.mark.timeout(600)
def test_mocov2_notebook_runs_with_tiny_parameters(tmp_path):
    r = papermill("mocov2.ipynb", tmp_path / "mocov2.ipynb", timeout=540, **TINY_NB, num_iters=4, eval_every=2,
                  run_dir=tmp_path / "run")
    _notebook_ok(r, tmp_path / "mocov2.ipynb")
    res = json.loads((tmp_path / "run" / "mocov2" / "results.json").read_text())
    assert (res["algorithm"], res["steps"], res["best_step"] in (2, 4)) == ("mocov2", 4, True)
    assert json.loads((tmp_path / "run" / "lincls" / "results.json").read_text())["steps"] == 2
    assert (tmp_path / "run" / "plots" / "curves.png").exists()


@pytest.mark.timeout(600)
def test_retro_notebook_runs_with_tiny_parameters(tmp_path):
    r = papermill("retro.ipynb", tmp_path / "retro.ipynb", timeout=540, **TINY_NB, teacher_iters=2, num_iters=4,
                  eval_every=2, run_dir=tmp_path / "run")
    _notebook_ok(r, tmp_path / "retro.ipynb")
    for name, algo in (("teacher", "mocov2"), ("alone", "mocov2"), ("disco", "disco"), ("retro", "retro")):
        res = json.loads((tmp_path / "run" / name / "results.json").read_text())
        assert res["algorithm"] == algo and 0 <= res["last_knn_top1"] <= 1
        assert json.loads((tmp_path / "run" / name / "lincls" / "results.json").read_text())["steps"] == 2
    assert (tmp_path / "run" / "plots" / "curves.png").exists()


@pytest.mark.timeout(300)
def test_retro_under_ddp_keeps_the_replicas_and_queues_in_sync(tmp_path):
    "2 gloo processes: ShuffleBN across processes, both views in one DDP forward, the frozen shared head inside DDP."
    import subprocess, sys
    bin_ = Path(sys.executable).parent
    r = subprocess.run([bin_ / "torchrun", "--standalone", "--nproc_per_node=2", ROOT / "tests" / "_ddp_retro.py", tmp_path],
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    assert _equal(a["params"], b["params"]) and torch.equal(a["queue"], b["queue"])     # keys gathered from both
    # the mean students' weights follow the (synchronised) students; their BN statistics are per process, as MoCo's
    assert _equal({k: v for k, v in a["mean"].items() if "running" not in k and "num_batches" not in k},
                  {k: v for k, v in b["mean"].items() if "running" not in k and "num_batches" not in k})
