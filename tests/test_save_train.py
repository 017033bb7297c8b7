"""SAVE on the training engine (`ssl_nb.save`: `sam_stage1`, `save`): frozen parts bit-identical and out of the
checkpoints, resume equals uninterrupted, clear errors for missing or mismatched SAM/VGGish weights, warm starts,
the ablation switches, the notebook under papermill, and the benchmark commands in their tiny/dry modes."""
import dataclasses, importlib.util, json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from ssl_nb.audio import create_audio_encoder
from ssl_nb.avs import make_synthetic, torch_threads
from ssl_nb.core import CheckpointError, ConfigError, load_checkpoint, seed_everything
from ssl_nb.save import SAVETask, AVSegmenter, build_sam, frozen_parts, load_sam_source
from ssl_nb.train import fit, make_config, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = {"s4": (4, 1, 1, 1), "ms3": (4, 1, 1, 1)}     # videos per split: train, val, test, each negative split
AUDIO = dict(audio_width=32, audio_hidden=32)


@pytest.fixture(autouse=True)
def one_thread():
    "One torch thread: on the shared 2-core machine two threads are several times slower than one."
    with torch_threads(1): yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("avs") / "syn"
    with torch_threads(1): make_synthetic(root, TINY_DATA, image_size=64)
    return root


def common(data, **kw):
    return {**dict(data_root=str(data), net="tiny", img_size=64, batch_size=4, num_iters=4, eval_every=2, ckpt_every=2,
                   log_every=1, progress=False, tensorboard=False, device="cpu", warmup_iters=0, eval_batch_size=16), **kw}


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    "A finished 4-step stage-1 run of the tiny SAM (its folder)."
    run = tmp_path_factory.mktemp("stage1")
    with torch_threads(1): fit(make_config("sam_stage1", **common(data), run_dir=str(run)))
    return run


def save_cfg(data, stage1, run_dir, **kw):
    return make_config("save", **common(data, **{"subset": "ms3", "sam_checkpoint": str(stage1), "run_dir": str(run_dir),
                                                  **AUDIO, **kw}))


def test_stage1_trains_every_parameter_it_uses_and_scores_prompted_masks(stage1):
    res = json.loads((stage1 / "results.json").read_text())
    assert res["algorithm"] == "sam_stage1" and res["steps"] == 4 and 0 <= res["best_miou"] <= 1
    assert {"last_miou_point", "last_miou_box"} <= set(res)
    ck = load_checkpoint(stage1 / "last.pt")
    model = build_sam("tiny", 64)
    assert set(ck["model"]) == set(model.state_dict())       # stage 1 freezes nothing: the whole SAM is saved
    sd, info = load_sam_source(stage1, "tiny")                # a run folder resolves to its best.pt
    assert info["sam_source"] == "sam_stage1 run" and info["sam_path"].endswith("best.pt")


@pytest.mark.parametrize("variant", [{}, dict(audio_mode="sama"), dict(image_adapter=False, zero_audio=True)])
def test_frozen_parameters_bit_identical_after_fit_steps_and_absent_from_checkpoints(data, stage1, tmp_path, variant):
    cfg = save_cfg(data, stage1, tmp_path / "run", **variant)
    seed_everything(cfg.seed)
    task = SAVETask(cfg)                                      # the weights fit starts from (it seeds the same way)
    frozen0 = {n: p.detach().clone() for n, p in task.model.named_parameters() if not p.requires_grad}
    trained0 = {n: p.detach().clone() for n, p in task.model.named_parameters() if p.requires_grad}
    assert frozen0 and trained0
    seen = {}

    def snapshot(step, state):
        seen[step] = {n: p.detach().clone() for n, p in state["model"].named_parameters()}
        assert not any(m.training for m in state["task"].frozen_modules().values() if isinstance(m, torch.nn.Module))
    fit(cfg, callbacks=[snapshot])
    for step in (1, 4):
        changed = [n for n, v in frozen0.items() if not torch.equal(seen[step][n], v)]
        assert not changed, f"frozen parameters changed by step {step}: {changed[:5]}"
    # the parts that train moved: adapters, the audio path, the decoder's transformer, the audio encoder
    moved = {n for n, v in trained0.items() if not torch.equal(seen[4][n], v)}
    for part in ("save.audio.", "save.mask_decoder.transformer.", "save.image_encoder.blocks.0.adapter.",
                 "audio_encoder.features."):
        expected = [n for n in trained0 if n.startswith(part)]
        assert set(expected) <= moved, (part, sorted(set(expected) - moved)[:5])
    for name in ("last.pt", "best.pt", "prev.pt"):
        model = load_checkpoint(tmp_path / "run" / name)["model"]
        assert not set(model) & set(frozen0), name
        assert set(trained0) <= set(model), name
    assert not any(k.startswith("save.image_encoder.blocks.0.attn.") or k == "save.image_encoder.pos_embed"
                   or k.startswith("save.prompt_encoder.") for k in model)
    if variant.get("zero_audio"): assert not any(k.startswith("audio_encoder.") for k in trained0)
    if variant.get("audio_mode") == "sama": assert not any(k.startswith("save.sparse_head.") for k in trained0)
    if variant.get("image_adapter") is False: assert not any(".adapter." in k for k in trained0)


class Killed(Exception): pass


def kill_at(n):
    def cb(step, state):
        if step == n: raise Killed(step)
    return cb


def assert_same(a, b, what):
    if isinstance(a, dict):
        assert set(a) == set(b), (what, set(a) ^ set(b))
        for k in a: assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)): assert_same(x, y, f"{what}[{i}]")
    elif torch.is_tensor(a): assert torch.equal(a, b), what
    else: assert a == b or (a != a and b != b), (what, a, b)


@pytest.mark.parametrize("algorithm", ["save", "sam_stage1"])
def test_killed_and_resumed_run_equals_uninterrupted(data, stage1, tmp_path, algorithm):
    make = (lambda d, **kw: save_cfg(data, stage1, d, **kw)) if algorithm == "save" else \
           (lambda d, **kw: make_config("sam_stage1", **common(data, **kw), run_dir=str(d)))
    full = fit(make(tmp_path / "full", ckpt_every=4))
    cfg = make(tmp_path / "killed")
    with pytest.raises(Killed): fit(cfg, callbacks=[kill_at(3)])
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] == 2
    resumed = fit(dataclasses.replace(cfg, resume=True))
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("full", "killed"))
    for k in ("model", "optimizer", "loader", "aug_rng", "cpu_rng", "best", "history"):
        assert_same(a[k], b[k], k)
    assert_same(full.history, resumed.history, "history")
    rows = lambda d: [{k: v for k, v in r.items() if k != "ms_per_step"} for r in read_metrics(tmp_path / d)]
    assert_same(rows("full"), rows("killed"), "metrics.jsonl")


def test_missing_checkpoint_files_are_one_config_error(data, stage1, tmp_path):
    with pytest.raises(ConfigError, match="sam_checkpoint is not set"): make_config("save", **common(data))
    with pytest.raises(ConfigError, match=r"sam_checkpoint='/nowhere/sam_vit_b_01ec64.pth' does not exist"):
        make_config("save", **common(data), sam_checkpoint="/nowhere/sam_vit_b_01ec64.pth")
    with pytest.raises(ConfigError, match=r"audio_checkpoint='/nowhere/vggish-10086976.pth' does not exist"):
        save_cfg(data, stage1, tmp_path, audio_encoder="vggish", audio_checkpoint="/nowhere/vggish-10086976.pth")
    with pytest.raises(ConfigError, match="randomly initialised VGGish"):
        save_cfg(data, stage1, tmp_path, audio_encoder="vggish")
    with pytest.raises(ConfigError, match="checkpoint='/nowhere/best.pt' does not exist"):
        save_cfg(data, stage1, tmp_path, checkpoint="/nowhere/best.pt")
    with pytest.raises(ConfigError) as e:                     # every problem in one message
        make_config("save", **common(data), sam_checkpoint="/a.pth", audio_checkpoint="/b.pth")
    assert "sam_checkpoint='/a.pth'" in str(e.value) and "audio_checkpoint='/b.pth'" in str(e.value)


def test_mismatched_checkpoints_are_one_checkpoint_error_when_the_task_is_built(data, stage1, tmp_path):
    # a SAM file of another architecture
    other = tmp_path / "small128.pth"
    torch.save(build_sam("small", 128).state_dict(), other)
    with pytest.raises(CheckpointError, match="width 128 and depth 4 .'small'.*width 32, depth 2"):
        SAVETask(save_cfg(data, stage1, tmp_path / "a", sam_checkpoint=str(other)))
    # a stage-1 run of another net
    with pytest.raises(CheckpointError, match="holds a 'tiny' SAM.*net='small'"):
        SAVETask(make_config("save", **common(data, net="small", img_size=128, sam_checkpoint=str(stage1))))
    # a file that is no checkpoint at all
    bad = tmp_path / "sam_vit_b_01ec64.pth"; bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read the SAM checkpoint"):
        SAVETask(save_cfg(data, stage1, tmp_path / "b", sam_checkpoint=str(bad)))
    # a VGGish file that holds another network
    vgg = tmp_path / "vggish-10086976.pth"
    torch.save(create_audio_encoder("audio_cnn").state_dict(), vgg)
    with pytest.raises(CheckpointError, match="not a torchvggish VGGish state dict"):
        SAVETask(save_cfg(data, stage1, tmp_path / "c", audio_encoder="vggish", audio_checkpoint=str(vgg)))


def test_warm_start_loads_the_trained_parts_and_refuses_other_switches(data, stage1, tmp_path):
    first = fit(save_cfg(data, stage1, tmp_path / "syn", num_iters=2))
    seed_everything(1)
    warm = SAVETask(save_cfg(data, stage1, tmp_path / "s4", subset="s4", checkpoint=str(first.run_dir)))
    best = load_checkpoint(first.run_dir / "best.pt")["model"]
    state = warm.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in best.items())
    with pytest.raises(CheckpointError, match="image_adapter"):
        SAVETask(save_cfg(data, stage1, tmp_path / "x", image_adapter=False, checkpoint=str(first.run_dir)))
    with pytest.raises(CheckpointError, match="not a save run's checkpoint"):
        SAVETask(save_cfg(data, stage1, tmp_path / "y", checkpoint=str(stage1 / "best.pt")))
    with pytest.raises(CheckpointError, match="a 'save' run, not SAM weights"):
        SAVETask(save_cfg(data, stage1, tmp_path / "z", sam_checkpoint=str(first.run_dir / "best.pt")))


def test_zeroed_audio_ignores_the_sound_and_frozen_vggish_runs_without_gradient(data, stage1, tmp_path):
    task = SAVETask(save_cfg(data, stage1, tmp_path / "z", zero_audio=True))
    m = task.model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert m.audio_encoder is None and torch.equal(m(x, torch.randn(2, 1, 96, 64)), m(x, torch.randn(2, 1, 96, 64)))
    vgg = tmp_path / "vggish_tiny.pth"                        # a frozen encoder loaded from a file (VGGish's path)
    torch.save(create_audio_encoder("audio_cnn").state_dict(), vgg)
    task = SAVETask(save_cfg(data, stage1, tmp_path / "v", audio_checkpoint=str(vgg)))
    assert task.model.audio_frozen and "audio_encoder" in frozen_parts(task.model)
    feats = task.model.audio_features(torch.randn(2, 1, 96, 64))
    assert not feats.requires_grad
    task.train(); assert not task.model.audio_encoder.training and task.model.save.image_encoder.blocks[0].adapter.training


def test_notebook_runs_under_papermill_with_tiny_parameters(tmp_path):
    from test_notebooks import papermill
    params = dict(data_root=tmp_path / "data", synthetic_size="tiny", net="tiny", img_size=64, stage1_iters=2,
                  num_iters=2, batch_size=4, eval_every=1, run_dir=tmp_path / "run", progress=False)
    r = papermill("save.ipynb", tmp_path / "save.ipynb", timeout=500, **params)
    assert r.returncode == 0, r.stderr[-4000:]
    for name in ("stage1", "save", "save_zero_audio"):
        res = json.loads((tmp_path / "run" / name / "results.json").read_text())
        assert res["steps"] == 2 and 0 <= res["best_miou"] <= 1, (name, res)
    assert (tmp_path / "run" / "plots" / "predictions.png").is_file()
    nb = json.loads((tmp_path / "save.ipynb").read_text())
    tags = [c.get("metadata", {}).get("tags", []) for c in nb["cells"]]
    assert sum("parameters" in t for t in tags) == 1 and sum("injected-parameters" in t for t in tags) == 1


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_grid_tiny_mode_writes_its_table(tmp_path):
    out = tmp_path / "grid"
    r = subprocess.run([sys.executable, ROOT / "benchmarks" / "save_grid.py", "--tiny", "--out", out,
                        "--results", tmp_path / "res" / "save_tiny"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import pandas as pd
    runs = pd.read_csv(tmp_path / "res" / "save_tiny_runs.csv")
    assert set(runs["variant"]) == {"SAVE", "SAVE, zeroed audio", "SAMA-style audio", "SAVE, no image adapters"}
    assert set(runs["subset"]) == {"s4", "ms3"} and len(runs) == 8
    for c in ("test_miou", "test_fscore", "test_silence_mask_rate", "test_noise_mask_rate", "test_offscreen_mask_rate"):
        assert runs[c].between(0, 1).all(), c
    md = (tmp_path / "res" / "save_tiny.md").read_text()
    assert "save_grid.py --tiny" in md and "| ms3 | SAVE |" in md
    assert (tmp_path / "res" / "save_tiny.png").is_file()


def test_speed_script_dry_run_on_the_cpu(tmp_path):
    r = subprocess.run([sys.executable, ROOT / "benchmarks" / "save_speed.py", "--dry-run", "--out", tmp_path / "speed.md"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (tmp_path / "speed.md").read_text()
    assert "dry run" in md and "train step" in md and "frames/s" in md
