"Tests for ssl_nb.avs: AVSBench's metrics, the S4/MS3/AVSS loaders on fixture folders, the synthetic generator, the evaluator."
import csv, hashlib, json, os, pickle, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ssl_nb.audio import SAMPLE_RATE, log_mel_examples, read_wav, write_wav
from ssl_nb.avs import (NEGATIVE_SPLITS, SYNTH_CLASSES, AVSFileFrames, AVSFrames, avss_palette, evaluate_avs,
                        f_curves, f_measure, frame_iou, load_avs_synthetic, load_avsbench, load_avss, make_synthetic,
                        mask_iou, synthesize, write_avsbench_fixture)
from ssl_nb.core import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- AVSBench's metrics, transcribed literally
def avsbench_mask_iou(pred, target, eps=1e-7):
    N = pred.size(0); num_pixels = pred.size(-1) * pred.size(-2)
    no_obj_flag = (target.sum(2).sum(1) == 0)
    pred = (torch.sigmoid(pred) > 0.5).int()
    inter = (pred * target).sum(2).sum(1)
    union = torch.max(pred, target).sum(2).sum(1)
    inter_no_obj = ((1 - target) * (1 - pred)).sum(2).sum(1)
    inter[no_obj_flag] = inter_no_obj[no_obj_flag]
    union[no_obj_flag] = num_pixels
    return torch.sum(inter / (union + eps)) / N


def avsbench_fmeasure(pred, gt, pr_num=255):
    pred = torch.sigmoid(pred); N = pred.size(0); beta2 = 0.3
    avg_f, img_num, score = 0.0, 0, torch.zeros(pr_num)
    for i in range(N):
        if torch.mean(gt[i]) == 0.0: continue
        prec, recall = torch.zeros(pr_num), torch.zeros(pr_num)
        thlist = torch.linspace(0, 1 - 1e-10, pr_num)
        for j in range(pr_num):
            y_temp = (pred[i] >= thlist[j]).float(); tp = (y_temp * gt[i]).sum()
            prec[j], recall[j] = tp / (y_temp.sum() + 1e-20), tp / (gt[i].sum() + 1e-20)
        f_score = (1 + beta2) * prec * recall / (beta2 * prec + recall)
        f_score[f_score != f_score] = 0
        avg_f += f_score; img_num += 1; score = avg_f / img_num
    return score.max().item()


def random_batch(seed, n=5, h=16, w=20, empty=(1,)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, h, w, generator=g) * 4
    logits[0, 0, 0] = 0.0                                          # sigmoid(0) = 0.5: not foreground
    gt = (torch.rand(n, h, w, generator=g) > 0.7).float()
    for i in empty: gt[i] = 0
    return logits, gt


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_avsbench_code(seed):
    logits, gt = random_batch(seed)
    assert torch.equal(mask_iou(logits, gt), avsbench_mask_iou(logits, gt))            # bit for bit
    assert f_measure(logits, gt).item() == avsbench_fmeasure(logits, gt)                # the same float32 number
    f, nonempty = f_curves(logits, gt)
    assert f.shape == (5, 255) and nonempty.tolist() == [True, False, True, True, True]


def test_f_measure_ties_at_the_thresholds():
    th = torch.linspace(0, 1 - 1e-10, 255)
    g = torch.Generator().manual_seed(7)
    p = th[torch.randint(0, 255, (4, 9, 11), generator=g)]                      # probabilities exactly on thresholds
    logits = torch.logit(p.double()).float()
    gt = (torch.rand(4, 9, 11, generator=g) > 0.5).float()
    assert f_measure(logits, gt).item() == avsbench_fmeasure(logits, gt)


def test_metrics_edge_cases():
    logits, gt = random_batch(0, empty=range(5))
    assert f_measure(logits, gt).item() == 0.0 == avsbench_fmeasure(logits, gt)        # all GTs empty: 0
    torch.testing.assert_close(frame_iou(logits, gt), ((torch.sigmoid(logits) <= 0.5).float().mean((1, 2))))
    gt8 = random_batch(1)[1].to(torch.uint8)
    assert torch.equal(mask_iou(random_batch(1)[0], gt8), mask_iou(random_batch(1)[0], gt8.float()))  # uint8 GT
    bf = random_batch(2)[0].bfloat16()
    assert torch.equal(mask_iou(bf, random_batch(2)[1]), mask_iou(bf.float(), random_batch(2)[1]))
    with pytest.raises(ConfigError, match=r"\[N, H, W\]"): f_measure(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))


def test_f_depends_on_the_batch():
    a, ga = random_batch(3, n=2, empty=()); b, gb = -a.abs() * 3, ga               # b's curve peaks at low thresholds
    sep = (f_measure(a, ga) + f_measure(b, gb)) / 2
    joint = f_measure(torch.cat([a, b]), torch.cat([ga, gb]))
    assert joint < sep - 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_on_cuda():
    logits, gt = random_batch(5, h=64, w=64)
    assert torch.equal(mask_iou(logits.cuda(), gt.cuda()).cpu(), mask_iou(logits, gt))
    torch.testing.assert_close(f_measure(logits.cuda(), gt.cuda()).cpu(), f_measure(logits, gt))


# ---------------------------------------------------------------- AVSBench-object layout
@pytest.fixture
def avsbench(tmp_path):
    return write_avsbench_fixture(tmp_path / "avsbench_data", size=32)


def test_s4_and_ms3_rows_and_pairing(avsbench):
    tr, va = load_avsbench(avsbench, "s4", "train"), load_avsbench(avsbench, "s4", "val")
    assert (len(tr), len(va)) == (2, 5) and tr.rows["frame"].tolist() == [0, 0]
    assert tr.videos == ["s4train0", "s4train1"] and tr.info["categories"] == ["dog_barking", "playing_piano"]
    ms = load_avsbench(avsbench, "ms3", "test")
    tone = 0.3 * np.sin(2 * np.pi * 300 * np.arange(5 * SAMPLE_RATE) / SAMPLE_RATE)
    lm = log_mel_examples(torch.from_numpy(tone).float())
    for k in range(5):                                              # frame k+1 <-> example k
        r = ms[k]
        assert int(r["frame"]) == k and torch.equal(r["audio"], lm[k])
        assert r["x"].dtype == torch.uint8 and r["x"].shape == (3, 32, 32)
        assert r["mask"].dtype == torch.uint8 and set(r["mask"].unique().tolist()) <= {0, 1}
    assert ms[1]["mask"].sum() == 0 and ms[0]["mask"].sum() > 0     # the fixture's empty GT
    frame = np.array(Image.open(avsbench / "Multi-sources/ms3_data/visual_frames/ms3test0/ms3test0.mp4_3.png"))
    assert torch.equal(ms[2]["x"], torch.from_numpy(frame).permute(2, 0, 1))
    wav = load_avsbench(avsbench, "ms3", "test", audio="wav")
    from_wav = log_mel_examples(read_wav(avsbench / "Multi-sources/ms3_data/audio_wav/test/ms3test0.wav")[0])
    assert wav.rows["audio_kind"][0] == "wav" and torch.equal(wav[2]["audio"], from_wav[2])


def test_frames_policy_and_resizing(avsbench):
    for name in ("s4train0", "s4train1"):                           # give one S4 train video all 5 masks
        d = avsbench / "Single-source/s4_data/gt_masks/train" / ("dog_barking" if name.endswith("0") else "playing_piano") / name
        for k in range(2, 6): Image.open(d / f"{name}_1.png").save(d / f"{name}_{k}.png")
        break
    assert len(load_avsbench(avsbench, "s4", "train")) == 2                           # protocol: frame 1
    assert len(load_avsbench(avsbench, "s4", "train", frames="annotated")) == 6
    small = load_avsbench(avsbench, "s4", "val", image_size=16)[0]
    assert small["x"].shape == (3, 16, 16) and small["mask"].shape == (16, 16)
    with pytest.raises(ConfigError, match="frames"): load_avsbench(avsbench, "s4", "val", frames="all")


def test_in_memory_cache_and_streaming_agree(avsbench):
    files = load_avsbench(avsbench, "s4", "test")
    mem = load_avsbench(avsbench, "s4", "test", in_memory=True)
    assert isinstance(mem, AVSFrames) and len(mem) == len(files) == 5
    cache = next((avsbench / "Single-source/.ssl_nb_cache").glob("test-*.pt"))
    streamed = list(torch.utils.data.DataLoader(files, batch_size=2, num_workers=2))
    for k in ("x", "audio", "mask", "video", "frame"):
        assert torch.equal(torch.cat([b[k] for b in streamed]), mem.fields[k]), k
    t = cache.stat().st_mtime_ns
    again = load_avsbench(avsbench, "s4", "test", in_memory=True)                   # read from the cache
    assert cache.stat().st_mtime_ns == t and torch.equal(again.fields["x"], mem.fields["x"])
    f = avsbench / "Single-source/s4_data/visual_frames/test/dog_barking/s4test0/s4test0_2.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)                          # a changed file: rebuilt
    os.utime(f, ns=(t + 10**9, t + 10**9))
    changed = load_avsbench(avsbench, "s4", "test", in_memory=True)
    assert changed.fields["x"][1].sum() == 0 and cache.stat().st_mtime_ns != t
    sub = mem.subset([4, 0])
    assert sub.fields["frame"].tolist() == [4, 0] and sub.videos == mem.videos
    fsub = files.subset([4, 0])
    assert torch.equal(fsub[0]["x"], mem[4]["x"]) and len(fsub) == 2


def test_missing_things_are_named(avsbench, tmp_path):
    with pytest.raises(DataError, match="nowhere"): load_avsbench(tmp_path / "nowhere", "s4", "train")
    os.remove(avsbench / "Multi-sources/ms3_meta_data.csv")
    with pytest.raises(DataError, match="ms3_meta_data.csv"): load_avsbench(avsbench, "ms3", "train")
    os.remove(avsbench / "Single-source/s4_data/gt_masks/val/dog_barking/s4val0/s4val0_4.png")
    with pytest.raises(DataError, match="s4val0_4.png"): load_avsbench(avsbench, "s4", "val")
    for p in (avsbench / "Single-source/s4_data/audio_log_mel/test/dog_barking/s4test0.pkl",
              avsbench / "Single-source/s4_data/audio_wav/test/dog_barking/s4test0.wav"): os.remove(p)
    with pytest.raises(DataError, match="s4test0.wav"): load_avsbench(avsbench, "s4", "test")
    with pytest.raises(ConfigError, match="no split 'dev'"): load_avsbench(avsbench, "s4", "dev")
    with pytest.raises(ConfigError, match="load_avss"): load_avsbench(avsbench, "v1s", "train")


def test_corrupt_files_raise_data_errors(avsbench):
    pkl = avsbench / "Single-source/s4_data/audio_log_mel/val/dog_barking/s4val0.pkl"
    pkl.write_bytes(b"garbage")
    with pytest.raises(DataError, match="s4val0.pkl"): load_avsbench(avsbench, "s4", "val")[0]
    png = avsbench / "Single-source/s4_data/visual_frames/test/dog_barking/s4test0/s4test0_1.png"
    png.write_bytes(b"garbage")
    with pytest.raises(DataError, match="s4test0_1.png"): load_avsbench(avsbench, "s4", "test")[0]


# ---------------------------------------------------------------- AVSS layout
def write_avss(root, size=24):
    pal = avss_palette(); root.mkdir(parents=True)
    (root / "label2idx.json").write_text(json.dumps({"background": 0, **{f"c{i}": i for i in range(1, 71)}}))
    rows = [["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"]]
    t = np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE
    for uid, subset, split, n in [("s1", "v1s", "train", 5), ("m1", "v1m", "val", 5), ("w1", "v2", "test", 10)]:
        rows.append(["x", uid, "0", "0", "a", split, subset]); vd = root / subset / uid
        (vd / "frames").mkdir(parents=True); (vd / "labels_rgb").mkdir()
        write_wav(vd / "audio.wav", torch.from_numpy(0.2 * np.sin(2 * np.pi * 400 * t[: n * SAMPLE_RATE])))
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), 20 * i, np.uint8)).save(vd / "frames" / f"{i}.jpg")
            if subset == "v1s" and i > 0: continue
            lab = np.zeros((size, size), np.int64); lab[:4, :5] = 12; lab[-3:, -2:] = 70
            Image.fromarray(pal[lab]).save(vd / "labels_rgb" / f"{i}.png")
    with open(root / "metadata.csv", "w", newline="") as f: csv.writer(f).writerows(rows)
    return root


def test_avss_loader(tmp_path):
    root = write_avss(tmp_path / "avs_released")
    s = load_avss(root, "v1s", "train")
    assert len(s) == 1 and s[0]["semantic"][0, 0] == 12 and s[0]["semantic"][-1, -1] == 70
    assert s[0]["mask"].sum() == 4 * 5 + 3 * 2
    v2 = load_avss(root, "v2", "test", in_memory=True)
    assert len(v2) == 10 and v2.fields["audio"].shape == (10, 1, 96, 64)
    lm = log_mel_examples(read_wav(root / "v2/w1/audio.wav")[0])
    assert torch.equal(v2.fields["audio"][7], lm[7])                                 # frame i <-> example i
    with pytest.raises(DataError, match="label2idx.json"):
        os.remove(root / "label2idx.json"); load_avss(root, "v1m", "val")


# ---------------------------------------------------------------- the synthetic dataset
TINY = {"s4": (3, 1, 2, 1), "ms3": (3, 1, 2, 1)}


def digest(root: Path) -> dict:
    "File -> content hash; pickled log-mels by their values (torch's pickles carry a random serialisation id)."
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or ".ssl_nb_cache" in p.parts: continue
        data = p.read_bytes()
        if p.suffix == ".pkl": data = pickle.loads(data).numpy().tobytes()
        out[str(p.relative_to(root))] = hashlib.sha1(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "a"
    make_synthetic(root, size=TINY, image_size=32, seed=3)
    return root


def test_generator_is_deterministic(synthetic, tmp_path):
    make_synthetic(tmp_path / "b", size=TINY, image_size=32, seed=3)
    a, b = digest(synthetic), digest(tmp_path / "b")
    assert a == b and len(a) > 100
    same = next(synthesize("s4", "train", 3, image_size=32, seed=3))[2]
    other = next(synthesize("s4", "train", 3, image_size=32, seed=4))[2]
    assert not torch.equal(same["frames"], other["frames"]) and not torch.equal(same["waves"], other["waves"])


def test_layout_and_meta(synthetic):
    s4 = synthetic / "Single-source"
    with open(s4 / "s4_meta_data.csv") as f: rows = list(csv.reader(f))
    assert rows[0] == ["name", "start_time", "category", "split"]
    splits = [r[3] for r in rows[1:]]
    assert {s: splits.count(s) for s in set(splits)} == {"train": 3, "val": 1, "test": 2, **{n: 1 for n in NEGATIVE_SPLITS}}
    name, _, cat, split = rows[1]
    assert (s4 / "s4_data/visual_frames" / split / cat / name / f"{name}_5.png").is_file()
    assert Image.open(s4 / "s4_data/gt_masks" / split / cat / name / f"{name}_1.png").mode == "1"
    ms = synthetic / "Multi-sources"
    vid = next(r[0] for r in csv.reader(open(ms / "ms3_meta_data.csv")) if r[1] == "train")
    assert (ms / "ms3_data/visual_frames" / vid / f"{vid}.mp4_1.png").is_file()
    assert Image.open(ms / "ms3_data/gt_masks/train" / vid / f"{vid}_1.png").mode == "P"
    assert read_wav(ms / "ms3_data/audio_wav/train" / f"{vid}.wav")[1] == 16000
    meta = json.loads((ms / "synthetic_meta.json").read_text())["videos"]
    v = meta[vid]
    assert 2 <= len(v["classes"]) <= 3 and 1 <= len(v["sounding"]) < len(v["classes"])
    assert all(set(h) <= set(v["sounding"]) and h for h in v["heard_per_frame"])
    offs = [m["audio"] for m in meta.values() if m["split"] == "test_offscreen"]
    assert all(a.startswith("offscreen:") for a in offs)
    assert all(a.split(":")[1] not in m["classes"] for m in meta.values() if m["audio"].startswith("offscreen:")
               for a in [m["audio"]])


@pytest.mark.parametrize("subset", ["s4", "ms3"])
def test_masks_cover_exactly_the_sounding_objects(synthetic, subset):
    plan, sl, ch = next(synthesize(subset, "train", 3, image_size=32, seed=3))
    ds = load_avs_synthetic(synthetic, subset, "train")
    assert torch.equal(ds.fields["x"].view(3, 5, 3, 32, 32), ch["frames"])            # files = what was rendered
    assert torch.equal(ds.fields["mask"].view(3, 5, 32, 32), ch["masks"])
    for v in range(3):
        for k in range(5):
            inst = ch["instances"][v, k]
            heard = torch.tensor([j + 1 for j in range(3) if plan["active"][v, k, j]])
            assert torch.equal(ch["masks"][v, k].bool(), torch.isin(inst, heard))
            for j in range(3):
                if plan["cls"][v, j] >= 0 and not plan["sounding"][v, j]:             # silent objects: never in the mask
                    assert not (ch["masks"][v, k].bool() & (inst == j + 1)).any()
    if subset == "s4": assert (ch["masks"].sum((2, 3)) > 0).all()


def test_sound_of_second_k_fills_example_k_minus_1():
    "The gates switch objects on and off on VGGish's example grid (15,360-sample blocks, 10-ms ramps)."
    from ssl_nb.avs import _gates
    active = np.array([[1, 0, 1, 1, 0]], bool)
    g = _gates(active)[0]
    for k in range(5):
        inner = g[15360 * k + 200: 15360 * (k + 1) - 200] if k < 4 else g[15360 * 4 + 200:]
        assert np.allclose(inner, float(active[0, k]))
    ex = [(15360 * k, 15360 * k + 15600) for k in range(5)]       # the samples VGGish example k reads
    for k, (a, b) in enumerate(ex):                   # differs only in the 240-sample overlap and the half ramps (80 + 80)
        wrong = np.abs(g[a:b] - active[0, k]) > 1e-9
        assert wrong.sum() <= 240 + 160
    plan, sl, ch = next(synthesize("ms3", "train", 8, image_size=32, seed=0))
    v = next(v for v in range(8) if plan["sounding"][v].sum() == 2 and not plan["active"][v].all(1).all())
    assert ch["waves"][v].abs().max() > 0.01


def test_negative_splits(synthetic):
    test = load_avs_synthetic(synthetic, "ms3", "test")
    for split in NEGATIVE_SPLITS:
        neg = load_avs_synthetic(synthetic, "ms3", split)
        assert len(neg) == 5 and neg.fields["mask"].sum() == 0
        assert torch.equal(neg.fields["x"], test.fields["x"][:5])                      # the same pictures
        if split == "test_silence": assert torch.equal(neg.fields["audio"], torch.full_like(neg.fields["audio"], np.log(0.01)))


def test_cli_writes_a_loadable_dataset(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "ssl_nb.avs", "make-synthetic", "--out", str(tmp_path / "d"),
                        "--size", "tiny", "--image-size", "32", "--seed", "1"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote 180 frames of 36 videos" in r.stdout
    assert len(load_avs_synthetic(tmp_path / "d", "s4", "train")) == 30
    again = subprocess.run([sys.executable, "-m", "ssl_nb.avs", "make-synthetic", "--out", str(tmp_path / "d")],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr


# ---------------------------------------------------------------- the evaluator
def test_evaluate_avs_scores_one_video_at_a_time(synthetic):
    ds = load_avs_synthetic(synthetic, "ms3", "test")
    model = lambda x, a: torch.sin(x.float().mean(1) / 9.0) * 4 + a.mean((1, 2, 3))[:, None, None]
    results = [evaluate_avs(model, ds, batch_size=b) for b in (1, 4, 10)]
    for r in results[1:]:
        assert abs(r["miou"] - results[0]["miou"]) < 1e-6 and abs(r["fscore"] - results[0]["fscore"]) < 1e-6
    per_video = []
    for v in range(len(ds.videos)):                                  # AVSBench: batch = one video, then the mean
        idx = (ds.video == v).nonzero()[:, 0]
        x, a, m = ds.fields["x"][idx], ds.fields["audio"][idx], ds.fields["mask"][idx]
        per_video.append((avsbench_mask_iou(model(x, a), m.float()).item(), avsbench_fmeasure(model(x, a), m.float())))
    assert abs(results[0]["miou"] - np.mean([p[0] for p in per_video])) < 1e-6
    assert abs(results[0]["fscore"] - np.mean([p[1] for p in per_video])) < 1e-6
    assert [p["video"] for p in results[0]["per_video"]] == ds.videos and results[0]["num_frames"] == 10
    streamed = evaluate_avs(model, load_avsbench(synthetic, "ms3", "test"), batch_size=4, num_workers=0)
    assert abs(streamed["miou"] - results[0]["miou"]) < 1e-6


def test_evaluate_avs_on_negative_audio(synthetic):
    neg = load_avs_synthetic(synthetic, "s4", "test_noise")
    ignores_audio = lambda x, a: torch.where(x.float().mean(1) > 100, 5.0, -5.0)
    r = evaluate_avs(ignores_audio, neg, batch_size=4)
    assert r["empty_gt_frames"] == 5 and r["fscore"] == 0.0
    assert 0 < r["empty_gt_mask_rate"] <= 1 and 0 < r["empty_gt_fg_fraction"] < 1
    silent = evaluate_avs(lambda x, a: torch.full(x.shape[:1] + x.shape[2:], -5.0), neg, batch_size=4)
    assert silent["miou"] == pytest.approx(1.0) and silent["empty_gt_mask_rate"] == 0.0
    with pytest.raises(ConfigError, match="eval_size"): evaluate_avs(ignores_audio, neg, eval_size="native")
