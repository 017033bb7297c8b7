"""Tests of the trainer (`ssl_nb.train.fit`) on the classification tasks: every SSL algorithm updates its weights,
every registered net trains, every preset's model builds, a killed and resumed run equals an uninterrupted one bit
for bit, NaN losses, mismatched checkpoints, bad configs and missing data, the CLI, and DDP (2 gloo processes on the
CPU under torchrun). Faults and bad input have their own file, `test_faults.py`.

Everything runs on Fashion-MNIST with tiny settings (WRN-10-2, batch 8, uratio 2, a few steps) and evaluates on the
first 64 test images (`eval_limit`), so the file takes well under 3 minutes on 2 CPU cores.
"""
import dataclasses, hashlib, json, math, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

from ssl_nb.core import (ALGORITHMS, CheckpointError, ConfigError, DataError, NonFiniteLossError, atomic_save,
                         load_checkpoint, seed_everything)
from ssl_nb.train import TrainConfig, fit, make_config, presets_of, read_metrics
from ssl_nb.classify import PROTOCOL_PRESETS, Algorithm, Supervised, prepare_data
from ssl_nb.models import MODELS

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = dict(batch_size=8, uratio=2, net="wrn_10_2", eval_limit=64, log_every=1, progress=False, tensorboard=False,
            device="cpu")


def tiny(algorithm, run_dir, **kw):
    "The config of a tiny run of `algorithm` into `run_dir` (keys its config class lacks, such as uratio, are dropped)."
    names = {f.name for f in dataclasses.fields(ALGORITHMS.get(algorithm).config_cls)}
    return make_config(algorithm, **{k: v for k, v in {**TINY, **kw}.items() if k in names}, run_dir=str(run_dir))


SSL_ALGORITHMS = [n for n in ALGORITHMS.names() if issubclass(ALGORITHMS.get(n), Algorithm)]


def assert_same(a, b, where="state"):
    "Exact equality of nested checkpoint contents (tensors with torch.equal, NaN == NaN for floats)."
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max().item()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a: assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)): assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def metric_rows(run_dir):
    return [{k: v for k, v in r.items() if k != "ms_per_step"} for r in read_metrics(run_dir)]


# ---------------------------------------------------------------------------------------------------------------------
# 1. every algorithm trains: a 2-step fit changes every parameter that gets a gradient, and only those

def test_every_classification_algorithm_is_tested():
    assert {"supervised", "fixmatch", "flexmatch", "refixmatch", "sequencematch", "simmatch", "comatch"} <= set(SSL_ALGORITHMS)


@pytest.mark.parametrize("name", SSL_ALGORITHMS)
def test_fit_updates_every_weight_with_a_gradient(name, tmp_path):
    cls = ALGORITHMS.get(name)
    cfg = tiny(name, tmp_path, num_iters=2, eval_every=2)
    got_grad, no_grad, seen = {}, {}, {}        # a non-zero gradient at some step / never a gradient (None)

    def probe(step, state):
        model, ema = state["model"], state["ema"].module
        for n, p in model.named_parameters():
            got_grad[n] = got_grad.get(n, False) or (p.grad is not None and bool(p.grad.abs().sum() > 0))
            no_grad[n] = no_grad.get(n, True) and p.grad is None
        if step == 1: seen.update(p1={n: p.detach().clone() for n, p in model.named_parameters()},
                                  ema1={n: p.detach().clone() for n, p in ema.named_parameters()})
    res = fit(cfg, callbacks=[probe])

    # the initial weights, as fit builds them: seed, data, then the algorithm (which builds its model)
    seed_everything(cfg.seed)
    data = prepare_data(cfg)
    init = dict(cls(cfg, data.num_classes, len(data.lb), len(data.ulb), data.in_chans).model.named_parameters())
    # check that they are fit's: after one step the EMA is d init + (1 - d) p1, d the decay at step 0
    d = min(cfg.ema_decay, 0.1) if cfg.ema_warmup else cfg.ema_decay
    for n, p in init.items():
        torch.testing.assert_close(d * p.detach() + (1 - d) * seen["p1"][n], seen["ema1"][n], atol=1e-5, rtol=1e-4)

    final = load_checkpoint(tmp_path / "last.pt")["model"]
    assert set(got_grad) == set(init)
    # not every parameter needs a gradient (TorchSSL's WRN leaves some bn1 layers out of the graph, SimMatch's
    # projector waits for its instance warm-up), but the first layer and the classifier always get one
    head = [n for n in got_grad if n.endswith("classifier.weight")]
    assert got_grad[next(iter(got_grad))] and head and all(got_grad[n] for n in head), got_grad
    unchanged = [n for n, g in got_grad.items() if g and torch.equal(final[n], init[n])]
    assert not unchanged, f"{name}: parameters with a gradient did not change: {unchanged}"
    # (an all-zero gradient still lets weight decay shrink a weight; no gradient at all leaves it alone)
    moved = [n for n, none in no_grad.items() if none and not torch.equal(final[n], init[n])]
    assert not moved, f"{name}: parameters without a gradient changed: {moved}"
    rows = read_metrics(tmp_path, "train")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        losses = {k: v for k, v in r.items() if k.endswith("loss")}
        assert "loss" in losses and all(math.isfinite(v) for v in losses.values()), r
    assert res.history and res.history[-1]["step"] == 2 and 0 <= res.last_top1 <= 1


# ---------------------------------------------------------------------------------------------------------------------
# 2. resume equals uninterrupted

class Killed(Exception): pass


def kill_at(n):
    def cb(step, state):
        if step == n: raise Killed(step)
    return cb


@pytest.mark.parametrize("name", ["fixmatch", "flexmatch", "sequencematch"])
def test_killed_and_resumed_run_equals_uninterrupted(name, tmp_path):
    N = 2
    full = fit(tiny(name, tmp_path / "full", num_iters=2 * N, eval_every=N))              # checkpoint at the end only
    cfg = tiny(name, tmp_path / "killed", num_iters=2 * N, eval_every=N, ckpt_every=N)
    with pytest.raises(Killed):
        fit(cfg, callbacks=[kill_at(N + 1)])
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] == N
    resumed = fit(dataclasses.replace(cfg, resume=True))

    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["step"] == b["step"] == 2 * N
    for k in ("model", "ema", "optimizer", "loader", "task", "aug_rng", "cpu_rng", "best", "history"):
        assert_same(a[k], b[k], k)
    if name != "fixmatch":                      # stateful methods: their thresholds are in the checkpoint and equal
        assert a["task"], f"{name} keeps no state in its checkpoint"
    free = {"run_dir", "resume", "ckpt_every"}
    assert_same({k: v for k, v in a["config"].items() if k not in free},
                {k: v for k, v in b["config"].items() if k not in free}, "config")
    assert_same(full.history, resumed.history, "history")
    assert (full.best_top1, full.best_step, full.last_top1, full.last_ece) == \
           (resumed.best_top1, resumed.best_step, resumed.last_top1, resumed.last_ece)
    # the logs of the killed run were cut back to its checkpoint: same rows as the uninterrupted run
    assert_same(metric_rows(tmp_path / "full"), metric_rows(tmp_path / "killed"), "metrics.jsonl")
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("full", "killed"))
    ra.pop("run_dir"); rb.pop("run_dir")
    assert ra == rb


def test_resuming_a_finished_run_only_evaluates(tmp_path):
    cfg = tiny("supervised", tmp_path, num_iters=2, eval_every=2)
    first = fit(cfg)
    before = [sha(tmp_path / f) for f in ("last.pt", "best.pt", "metrics.jsonl")]
    again = fit(dataclasses.replace(cfg, resume=True))
    assert [sha(tmp_path / f) for f in ("last.pt", "best.pt", "metrics.jsonl")] == before
    # the final evaluation is recomputed from the weights (history and best come from the checkpoint)
    assert (again.last_top1, again.last_ece, again.per_class) == (first.last_top1, first.last_ece, first.per_class)


def test_best_checkpoint_never_runs_ahead_of_the_last(tmp_path, monkeypatch):
    """A new best found after the last checkpoint is written with the next checkpoint, not before it. The checkpoint
    of a step comes before its evaluation: last.pt at step 4 holds the best of step 3 and a pending evaluation, which
    the resumed run makes first."""
    import ssl_nb.classify as C
    seen = []
    def rising(*a, **k):                      # every evaluation is a new best
        seen.append(1); return {"top1": len(seen) / 100, "ece": 0.0, "per_class": [0.0] * 10}
    monkeypatch.setattr(C, "evaluate_classifier", rising)
    cfg = tiny("supervised", tmp_path, num_iters=6, eval_every=1, ckpt_every=4)
    with pytest.raises(Killed): fit(cfg, callbacks=[kill_at(5)])        # killed after the (best) evaluation at step 5
    last, best = load_checkpoint(tmp_path / "last.pt"), torch.load(tmp_path / "best.pt", weights_only=True)
    assert (last["step"], best["step"], last["best"], last["pending_eval"]) == (4, 3, {"value": 0.03, "step": 3}, True)
    res = fit(dataclasses.replace(cfg, resume=True))
    assert [h["step"] for h in res.history] == [1, 2, 3, 4, 5, 6]        # step 4 evaluated again on resume
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == res.best_step == 6


def test_restart_before_the_first_checkpoint_rewrites_the_log(tmp_path):
    full = tiny("supervised", tmp_path / "full", num_iters=4, eval_every=2)
    fit(full)
    cfg = tiny("supervised", tmp_path / "killed", num_iters=4, eval_every=2, ckpt_every=4)
    with pytest.raises(Killed): fit(cfg, callbacks=[kill_at(3)])
    assert not (tmp_path / "killed" / "last.pt").exists() and metric_rows(tmp_path / "killed")
    fit(dataclasses.replace(cfg, resume=True))                           # starts at step 0 again
    assert_same(metric_rows(tmp_path / "full"), metric_rows(tmp_path / "killed"), "metrics.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# 3. a NaN or infinite loss stops the run; the last good checkpoint stays as it was

@pytest.fixture
def nan_algorithm():
    @ALGORITHMS.register("nan_at_step_3")
    class NanAtStep3(Supervised):
        "Supervised, whose loss is NaN on its 3rd update."
        def train_step(self, batch):
            out = super().train_step(batch)
            if self.step == 2: out["loss"] = out["loss"] * float("nan")
            return out
    yield "nan_at_step_3"
    ALGORITHMS._items.pop("nan_at_step_3")


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(nan_algorithm, tmp_path):
    cfg = tiny(nan_algorithm, tmp_path, num_iters=6, eval_every=2, ckpt_every=2)
    good = {}

    def after_checkpoint(step, state):
        if step == 2: good.update(sha=sha(tmp_path / "last.pt"))
    with pytest.raises(NonFiniteLossError) as e:
        fit(cfg, callbacks=[after_checkpoint])
    msg = str(e.value)
    assert "at step 3" in msg and f"{tmp_path / 'last.pt'} (step 2)" in msg and "resume=True" in msg, msg
    assert sha(tmp_path / "last.pt") == good["sha"]
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 2
    assert all(torch.isfinite(t).all() for k in ("model", "ema") for t in ck[k].values() if t.is_floating_point())
    assert [r["step"] for r in read_metrics(tmp_path, "eval")] == [2]         # nothing evaluated after the NaN


def test_nonfinite_weights_are_never_saved(tmp_path):
    "A finite loss with an infinite gradient leaves NaN weights: caught before the checkpoint (none written)."
    def corrupt(step, state):
        if step == 1:
            with torch.no_grad(): next(state["ema"].module.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"weights .* became NaN or infinite by step 2.*none yet"):
        fit(tiny("supervised", tmp_path, num_iters=4, eval_every=2, ckpt_every=2), callbacks=[corrupt])
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 4. corrupt and mismatched checkpoints, and folders that already hold one

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("finished")
    cfg = tiny("supervised", d, num_iters=2, eval_every=2)
    fit(cfg)
    return cfg, d


def test_resume_refuses_a_different_config(finished_run):
    cfg, d = finished_run
    before = sha(d / "last.pt")
    with pytest.raises(CheckpointError, match=r"different config \(weight_decay: checkpoint 0\.0005 vs now 0\.1\)"):
        fit(dataclasses.replace(cfg, weight_decay=0.1, resume=True))
    with pytest.raises(CheckpointError, match=r"num_iters=1 would end the run before it"):
        fit(dataclasses.replace(cfg, num_iters=1, resume=True))
    with pytest.raises(CheckpointError, match="not a resumable ssl_nb checkpoint"):
        fit(dataclasses.replace(cfg, resume=str(d / "best.pt")))
    assert sha(d / "last.pt") == before


def test_resume_refuses_another_number_of_processes(finished_run, tmp_path):
    cfg, d = finished_run
    ck = load_checkpoint(d / "last.pt")
    ck["aug_rng"] = ck["aug_rng"] * 2
    atomic_save(ck, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\), this run has 1"):
        fit(dataclasses.replace(cfg, resume=str(tmp_path / "two.pt")))


def test_resume_refuses_another_kind_of_device(finished_run, tmp_path):
    cfg, d = finished_run
    ck = load_checkpoint(d / "last.pt")
    assert ck["device_type"] == "cpu"
    ck["device_type"] = "cuda"
    atomic_save(ck, tmp_path / "gpu.pt")
    with pytest.raises(CheckpointError, match="was written on cuda, this run is on cpu"):
        fit(dataclasses.replace(cfg, resume=str(tmp_path / "gpu.pt")))


def test_new_run_into_a_folder_with_a_checkpoint_is_refused(finished_run):
    cfg, d = finished_run
    before = sha(d / "last.pt")
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        fit(cfg)
    assert sha(d / "last.pt") == before


def test_corrupt_checkpoints_are_a_clear_error_and_are_kept(finished_run, tmp_path):
    cfg, d = finished_run
    run = tmp_path / "run"; shutil.copytree(d, run)
    for f in ("last.pt", "prev.pt"): (run / f).write_bytes(b"\x00" * 100)    # truncated or overwritten files
    with pytest.raises(CheckpointError, match="No checkpoint to resume from verifies") as e:
        fit(dataclasses.replace(cfg, run_dir=str(run), resume=True))
    assert str(run / "last.pt") in str(e.value) and str(run / "prev.pt") in str(e.value)
    assert (run / "last.pt").read_bytes() == (run / "prev.pt").read_bytes() == b"\x00" * 100


# ---------------------------------------------------------------------------------------------------------------------
# 5. bad configs and missing data fail early, with one clear error

@pytest.mark.parametrize("make, match", [
    (lambda: make_config("fixmatch", lrr=0.1), r"Unknown config key\(s\) for fixmatch: 'lrr' \(did you mean 'lr'\?\)"),
    (lambda: make_config("fixmatch", batch_size="8"), "batch_size must be int"),
    (lambda: make_config("fixmatch", p_cutoff=1.5), r"p_cutoff must be in \[0, 1\]"),
    (lambda: make_config("fixmatch", num_iters=0), "num_iters must be > 0"),
    (lambda: make_config("fixmatch", "cifar11-40"), "Unknown preset 'cifar11-40' for FixMatchConfig. Presets: .*cifar10-40"),
    (lambda: make_config("fixmatchh"), "Unknown algorithm 'fixmatchh'. Known algorithms: .*fixmatch"),
    (lambda: make_config("fixmatch", net="wrn_28_3"), "net 'wrn_28_3' is unknown .*wrn_28_2"),
    (lambda: make_config("fixmatch", dataset="cifar-10"), "dataset 'cifar-10' is unknown .*cifar10"),
    (lambda: fit(TrainConfig(algorithm="fixmatch")), "fixmatch needs a FixMatchConfig"),
])
def test_bad_config_is_one_clear_config_error(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_missing_dataset_is_one_data_error_before_training(tmp_path):
    empty = tmp_path / "data"; empty.mkdir()
    run = tmp_path / "run"
    with pytest.raises(DataError) as e:
        fit(tiny("fixmatch", run, dataset="cifar10", data_root=str(empty)))
    msg = str(e.value)
    assert "Dataset 'cifar10' not found" in msg and str(empty) in msg and "To get it" in msg, msg
    assert not run.exists()                                                  # nothing started


def test_every_preset_key_is_a_config_field():
    "Each preset key is a field of the config class that declares it (or of one of its subclasses)."
    classes = [ALGORITHMS.get(n).config_cls for n in ALGORITHMS.names()]
    stray = {}
    for c in classes:
        fields = {f.name for k in classes if issubclass(k, c) for f in dataclasses.fields(k)}
        for name, p in c.__dict__.get("presets", {}).items():
            if set(p) - fields: stray[f"{c.__name__}:{name}"] = sorted(set(p) - fields)
    assert not stray, f"preset keys no config class has: {stray}"


def test_presets_build_the_codebases_network():
    "USB's WRN for the USB/EPASS-derived methods' presets, TorchSSL's for the authors' TorchSSL fork; CPU default untouched."
    for algo, variant in [("fixmatch", "usb"), ("flexmatch", "usb"), ("simmatch", "usb"), ("comatch", "usb"),
                          ("refixmatch", "torchssl"), ("sequencematch", "torchssl")]:
        for preset in ("cifar10-40", "cifar100-2500", "stl10-40"):
            assert make_config(algo, preset).net_variant == variant, (algo, preset)
        assert make_config(algo).net_variant is None and make_config(algo, "fashion_mnist-40").net_variant is None
    assert make_config("sequencematch", "cifar100-2500").batch_size == 32
    n = lambda m: sum(p.numel() for p in m.parameters())
    seq, fix = (ALGORITHMS.get(a)(make_config(a, "cifar10-40"), 10, 40, 100) for a in ("sequencematch", "fixmatch"))
    assert (n(seq.model), n(fix.model)) == (1_469_642, 1_467_626)


NUM_CLASSES = {"cifar100": 100, "imagenet": 1000}


@pytest.mark.parametrize("name", SSL_ALGORITHMS)
def test_every_presets_model_builds(name):
    "The model of every (algorithm, preset) pair builds (on the meta device: shapes only, no memory, no time)."
    cls = ALGORITHMS.get(name)
    for preset in sorted(presets_of(cls.config_cls)):
        cfg = make_config(name, preset)
        with torch.device("meta"):
            model = cls(cfg, NUM_CLASSES.get(cfg.dataset, 10), 40, 100, in_chans=3).model
        assert model.classifier.out_features == NUM_CLASSES.get(cfg.dataset, 10), (name, preset)
        if cfg.bn_momentum is not None:
            assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} <= {cfg.bn_momentum}


@pytest.mark.parametrize("net", MODELS.names())
def test_two_step_fit_for_every_registered_net(net, tmp_path):
    "Every registered net trains on the embedded default (28x28 grayscale): ViTs take any input size."
    res = fit(tiny("fixmatch", tmp_path, net=net, batch_size=4, uratio=1, num_iters=2, eval_every=2, eval_limit=16))
    assert [h["step"] for h in res.history] == [2] and math.isfinite(read_metrics(tmp_path, "train")[-1]["loss"])


def test_cifar10_40_preset_is_the_fixmatch_protocol():
    c = make_config("fixmatch", "cifar10-40")
    assert (c.dataset, c.num_labels, c.net, c.batch_size, c.uratio, c.num_iters) == ("cifar10", 40, "wrn_28_2", 64, 7, 2**20)
    assert (c.bn_momentum, c.ema_decay, c.ema_warmup) == (0.001, 0.999, False)
    assert (c.lr, c.momentum, c.nesterov, c.weight_decay, c.p_cutoff, c.T, c.ulb_loss_ratio) == (0.03, 0.9, True, 5e-4, 0.95, 0.5, 1.0)
    assert make_config("fixmatch", "cifar10-40", seed=3, num_iters=10).num_iters == 10         # flags win over presets


# ---------------------------------------------------------------------------------------------------------------------
# 6.-7. the CLI and DDP, in subprocesses

def run(cmd, timeout=300, **env):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **env}
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


CLI_TINY = ["--batch-size", "8", "--uratio", "2", "--eval-limit", "64", "--eval-every", "2", "--log-every", "1",
            "--no-progress", "--no-tensorboard", "--device", "cpu"]


def test_cli_fit_prints_the_summary(tmp_path):
    r = run([sys.executable, "-m", "ssl_nb.cli", "fit", "supervised", "--num-iters", "2", *CLI_TINY,
             "--run-dir", tmp_path])
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary == json.loads((tmp_path / "results.json").read_text())
    assert (summary["algorithm"], summary["steps"], summary["eval_limit"], summary["eval_size"]) == ("supervised", 2, 64, 64)
    # config.json holds every setting as given (what the run records beside them has names of its own: SAVE's
    # `eval_size` setting once got overwritten by the number of evaluated samples)
    saved = json.loads((tmp_path / "config.json").read_text())
    cfg = make_config("supervised", num_iters=2, batch_size=8, uratio=2, eval_limit=64, eval_every=2, log_every=1,
                      progress=False, tensorboard=False, device="cpu", run_dir=str(tmp_path))
    assert {k: saved[k] for k in cfg.to_dict()} == json.loads(json.dumps(cfg.to_dict(), default=str))
    assert saved["eval_samples"] == 64 and saved["device_used"] == "cpu"


def test_cli_bad_flag_is_one_line_and_exit_2():
    r = run([sys.executable, "-m", "ssl_nb.cli", "fit", "fixmatch", "--lrr", "0.1"])
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--lrr" in r.stderr and "did you mean --lr?" in r.stderr
    r = run([sys.executable, "-m", "ssl_nb.cli", "fit", "fixmatch", "--p-cutoff", "2"])       # a bad value, too
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "p_cutoff must be in" in r.stderr, r.stderr


def test_console_script_lists_presets():
    assert (BIN / "ssl-nb").exists()
    r = run([BIN / "ssl-nb", "presets", "fixmatch"])
    assert r.returncode == 0, r.stderr
    presets = dict(l.split(": ", 1) for l in r.stdout.splitlines())
    assert json.loads(presets["cifar10-40"])["net"] == "wrn_28_2"


@pytest.mark.timeout(300)
def test_ddp_cli_run_writes_one_result(tmp_path):
    r = run([BIN / "torchrun", "--standalone", "--nproc_per_node=2", "-m", "ssl_nb.cli", "fit", "fixmatch",
             "--num-iters", "2", "--ckpt-every", "2", *CLI_TINY, "--run-dir", tmp_path], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"algorithm"') == 1, r.stdout                        # rank 0 prints the summary
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("results.json")] == [Path("results.json")]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["best.pt", "last.pt", "prev.pt"]
    assert json.loads((tmp_path / "config.json").read_text())["world_size"] == 2
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["step"] == 2 and len(ck["aug_rng"]) == 2 and len(ck["cpu_rng"]) == 2
    assert not torch.equal(ck["aug_rng"][0], ck["aug_rng"][1])                 # each rank its own augmentations
    assert json.loads((tmp_path / "results.json").read_text())["best_step"] == 2


@pytest.mark.timeout(300)
def test_ddp_ranks_split_the_global_batch_stay_in_sync_and_resume_exactly(tmp_path):
    r = run([BIN / "torchrun", "--standalone", "--nproc_per_node=2", ROOT / "tests" / "_ddp_fit.py", tmp_path],
            timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "probe" / f"rank{i}.pt") for i in range(2))
    # the ranks saw disjoint unlabeled samples at every step, and together the single-process global batch
    import _ddp_fit                                                                 # registers fixmatch_probe here
    single = {}
    fit(tiny("fixmatch_probe", tmp_path / "single", num_iters=2, eval_every=2),
        callbacks=[lambda s, st: single.update(idx=st["algorithm"].seen)])
    assert len(r0["idx"]) == len(r1["idx"]) == 2
    for a, b, g in zip(r0["idx"], r1["idx"], single["idx"]):
        assert len(a) == len(b) == 8 and len(g) == 16
        assert not set(a.tolist()) & set(b.tolist())
        assert sorted(a.tolist() + b.tolist()) == sorted(g.tolist())
    # DDP keeps the replicas identical: the same parameters on both ranks after the steps. (They do not equal a
    # single-process run: BatchNorm statistics are per process and each rank has its own augmentation stream.)
    assert_same(r0["params"], r1["params"], "params")
    # killed and resumed under DDP equals uninterrupted under DDP
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["step"] == b["step"] == 4 and len(b["aug_rng"]) == 2
    for k in ("model", "ema", "optimizer", "loader", "task", "aug_rng", "cpu_rng", "best", "history"):
        assert_same(a[k], b[k], k)
    assert_same(metric_rows(tmp_path / "full"), metric_rows(tmp_path / "killed"), "metrics.jsonl")


@pytest.fixture(autouse=True, scope="module")
def _import_path():
    sys.path.insert(0, str(ROOT / "tests"))
    yield
    sys.path.remove(str(ROOT / "tests"))
    ALGORITHMS._items.pop("fixmatch_probe", None)


def test_evaluate_file_backed_equals_in_memory(tmp_path):
    "evaluate() gives the same metrics on an ImageFolder dataset (DataLoader path) and on the same images in memory."
    import numpy as np
    from PIL import Image
    from ssl_nb.augment import make_views
    from ssl_nb.data import ImageDataset, load_dataset
    from ssl_nb.models import create
    from ssl_nb.classify import evaluate_classifier as evaluate
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    lazy = load_dataset("imagenet", "test", tmp_path, image_size=32)
    assert lazy.is_lazy and len(lazy) == 9
    mem = ImageDataset(torch.stack([lazy.images[i] for i in range(len(lazy))]), lazy.targets, lazy.classes,
                       lazy.mean, lazy.std, "mem")
    view = make_views(lazy.mean, lazy.std, 32)["eval"]
    torch.manual_seed(0)
    model = create("wrn_10_2", 3)
    a = evaluate(model, lazy, view, 3, batch_size=4, num_workers=0)
    b = evaluate(model, mem, view, 3, batch_size=4)
    assert a["top1"] == b["top1"] and a["ece"] == b["ece"]
    torch.testing.assert_close(a["probs"], b["probs"])
    assert a["per_class"] == b["per_class"]


def test_views_follow_the_codebase_of_ra_position(tmp_path):
    """CIFAR-10 is normalised with ImageNet's statistics in USB's pipeline (ra_position="after": FixMatch, SimMatch,
    CoMatch) and with TorchSSL's in TorchSSL's ("before": SequenceMatch, ReFixMatch, FlexMatch); other datasets agree."""
    from test_data import make_cifar10
    from ssl_nb.data import NORM_STATS
    make_cifar10(tmp_path, per_batch=40)          # random labels: 200 images hold every class
    for algo, stats in [("fixmatch", NORM_STATS["imagenet"]), ("simmatch", NORM_STATS["imagenet"]),
                        ("sequencematch", NORM_STATS["cifar10"]), ("refixmatch", NORM_STATS["cifar10"])]:
        d = prepare_data(make_config(algo, dataset="cifar10", data_root=str(tmp_path), num_labels=10,
                                     run_dir=str(tmp_path / algo)))
        assert (d.mean, d.std) == stats, algo
    fm = dict(dataset="fashion_mnist", num_labels=40, run_dir=str(tmp_path / "fm"))
    assert prepare_data(make_config("fixmatch", **fm)).mean == prepare_data(make_config("sequencematch", **fm)).mean


def test_frozen_trunk_is_shared_by_the_ema_and_out_of_every_checkpoint(tmp_path):
    "A linear probe that runs its frozen trunk every step, with an EMA: the trunk never trains and is never written."
    fit(tiny("supervised", tmp_path / "src", num_iters=2, eval_every=2))
    trunk_before = {}
    def grab(step, state):
        model, ema = state["model"], state["ema"].module
        assert ema[0] is model[0]                                  # the EMA uses the online trunk, not a copy
        if step == 1: trunk_before.update({k: v.clone() for k, v in model[0].state_dict().items()})
    cfg = make_config("linear_probe", source=str(tmp_path / "src" / "last.pt"), cache_features=False, ema_decay=0.9,
                      num_labels=40, batch_size=8, num_iters=3, eval_every=3, ckpt_every=3, eval_limit=32,
                      run_dir=str(tmp_path / "probe"), progress=False, tensorboard=False, device="cpu")
    fit(cfg, callbacks=[grab])
    ck = load_checkpoint(tmp_path / "probe" / "last.pt")
    assert sorted(ck["model"]) == sorted(ck["ema"]) == ["1.fc.bias", "1.fc.weight", "1.norm.num_batches_tracked",
                                                        "1.norm.running_mean", "1.norm.running_var"]
    src = load_checkpoint(tmp_path / "src" / "last.pt")["ema"]
    assert all(torch.equal(trunk_before[f"model.{k}"], v) for k, v in src.items())   # the probed weights, unchanged
    aug = fit(dataclasses.replace(cfg, augment=True, run_dir=str(tmp_path / "aug")))      # trains on the weak view
    assert aug.history and aug.history[-1]["step"] == 3
    with pytest.raises(ConfigError, match="augment=True needs cache_features=False"):
        make_config("linear_probe", source=cfg.source, augment=True)


@pytest.mark.parametrize("name", ["fixmatch", "sequencematch"])
def test_static_step_equals_the_default_step_and_resumes_exactly(name, tmp_path):
    """graph_step=True runs the step on static buffers (captured as a CUDA graph on a GPU; eagerly here): the same
    weights, EMA and history as the default step, bit for bit, and a kill/resume on that path equals no kill."""
    default = fit(tiny(name, tmp_path / "default", num_iters=4, eval_every=2))
    static = fit(tiny(name, tmp_path / "static", num_iters=4, eval_every=2, graph_step=True))
    a, b = (load_checkpoint(tmp_path / r / "last.pt") for r in ("default", "static"))
    for k in ("model", "ema", "task"): assert_same(a[k], b[k], k)
    assert_same(default.history, static.history, "history")
    cfg = tiny(name, tmp_path / "killed", num_iters=4, eval_every=2, ckpt_every=2, graph_step=True)
    with pytest.raises(Killed): fit(cfg, callbacks=[kill_at(3)])
    fit(dataclasses.replace(cfg, resume=True))
    c = load_checkpoint(tmp_path / "killed" / "last.pt")
    for k in ("model", "ema", "optimizer", "task", "loader", "aug_rng"): assert_same(b[k], c[k], k)


def test_compiled_step_follows_the_eager_step_and_resumes_exactly(tmp_path):
    """compile=True (inductor: C++ on the CPU here) trains like the eager step: after a few steps its losses and weights
    are as close to the eager run's as another valid fp32 arithmetic of the same step is (the eager step in NCHW
    instead of channels_last), and a kill/resume on the compiled path equals the uninterrupted compiled run bit for
    bit."""
    kw = dict(num_iters=4, eval_every=2, ckpt_every=2)
    fit(tiny("sequencematch", tmp_path / "eager", **kw))
    fit(tiny("sequencematch", tmp_path / "nchw", channels_last=False, **kw))
    fit(tiny("sequencematch", tmp_path / "compiled", compile=True, **kw))
    runs = ("eager", "nchw", "compiled")
    ck = {r: load_checkpoint(tmp_path / r / "last.pt") for r in runs}
    assert set(ck["compiled"]["model"]) == set(ck["eager"]["model"])  # the compiled wrapper adds no prefix to the keys

    def distance(r):      # relative L2 distance of run r's weights and losses from the eager run's
        a, b = ck["eager"]["model"], ck[r]["model"]
        keys = [k for k in a if a[k].is_floating_point()]
        w = (sum(((a[k] - b[k]).double() ** 2).sum() for k in keys) / sum((a[k].double() ** 2).sum() for k in keys)) ** 0.5
        la, lb = (torch.tensor([row["loss"] for row in read_metrics(tmp_path / x, "train")]) for x in ("eager", r))
        return w.item(), ((la - lb).norm() / la.norm()).item()

    noise, got = distance("nchw"), distance("compiled")
    assert 0 < noise[0] < 1e-2 and 0 < got[0] <= 3 * noise[0] and got[1] <= 3 * noise[1], (noise, got)
    cfg = tiny("sequencematch", tmp_path / "killed", compile=True, **kw)
    with pytest.raises(Killed): fit(cfg, callbacks=[kill_at(3)])
    fit(dataclasses.replace(cfg, resume=True))
    c = load_checkpoint(tmp_path / "killed" / "last.pt")
    for k in ("model", "ema", "optimizer", "task", "loader", "aug_rng"): assert_same(ck["compiled"][k], c[k], k)


def test_static_step_refuses_what_cannot_be_captured(tmp_path):
    with pytest.raises(ConfigError, match="SimMatch is not graph-safe"):
        fit(tiny("simmatch", tmp_path / "a", num_iters=2, graph_step=True))
    with pytest.raises(ConfigError, match="accum_steps > 1"):
        fit(tiny("fixmatch", tmp_path / "b", num_iters=2, graph_step=True, accum_steps=2))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["fixmatch", "sequencematch"])
def test_graph_step_on_cuda_follows_the_eager_step(name, tmp_path):
    """On a GPU: the step captured as a CUDA graph (after 3 eager warm-up steps) trains like the eager step. Not bit for
    bit (cuDNN and atomics are not deterministic), so: the same evaluations within a point, weights within bf16 noise."""
    kw = dict(num_iters=12, eval_every=6, ckpt_every=6, batch_size=16, uratio=2, eval_limit=512, device="cuda")
    eager = fit(tiny(name, tmp_path / "eager", graph_step=False, **kw))
    graph = fit(tiny(name, tmp_path / "graph", **kw))                 # graph_step="auto": the graph on CUDA
    used = {r: json.loads((tmp_path / r / "config.json").read_text())["graph_step_used"] for r in ("eager", "graph")}
    assert used == {"eager": False, "graph": True}
    a, b = (load_checkpoint(tmp_path / r / "last.pt")["model"] for r in ("eager", "graph"))
    for k in a:
        if a[k].is_floating_point():
            assert (a[k] - b[k]).abs().max() <= 0.05 * a[k].abs().max() + 1e-3, k
    assert [h["step"] for h in graph.history] == [6, 12]
    assert all(abs(x["top1"] - y["top1"]) <= 0.02 for x, y in zip(eager.history, graph.history))
    rows = read_metrics(tmp_path / "graph", "train")
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["ms_per_step"] < rows[0]["ms_per_step"]
