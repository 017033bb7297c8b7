"Tests for ssl_nb.data on small fixtures written in each dataset's real on-disk format."
import gzip, pickle, struct

import numpy as np
import pytest
import torch
from PIL import Image

import ssl_nb.data as D
from ssl_nb.core import ConfigError, DataError
from ssl_nb.data import ImageDataset, InfiniteSampler, SSLLoader, load_dataset, read_idx, split_labeled

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- fixtures in the real formats
def write_idx(path, arr, magic, gz=True):
    data = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + np.asarray(arr, np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def make_fashion(folder, n_train=20, n_test=10, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for stem, n in [("train", n_train), ("t10k", n_test)]:
        x, y = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10
        sfx = ".gz" if gz else ""
        write_idx(folder / f"{stem}-images-idx3-ubyte{sfx}", x, 0x803, gz)
        write_idx(folder / f"{stem}-labels-idx1-ubyte{sfx}", y, 0x801, gz)
        out[stem] = (x, y)
    return out


def make_cifar10(root, per_batch=2, n_test=3):
    d = root / "cifar-10-batches-py"; d.mkdir(parents=True)
    names = [f"c{i}" for i in range(10)]
    pickle.dump({b"label_names": [n.encode() for n in names], b"num_cases_per_batch": per_batch}, open(d / "batches.meta", "wb"))
    xs, ys = [], []
    for i in range(1, 6):
        x = RNG.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8); y = list(RNG.integers(0, 10, per_batch))
        pickle.dump({b"data": x.reshape(per_batch, 3072), b"labels": [int(v) for v in y], b"batch_label": b"x"},
                    open(d / f"data_batch_{i}", "wb"))
        xs.append(x); ys += y
    xt = RNG.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    pickle.dump({b"data": xt.reshape(n_test, 3072), b"labels": [1] * n_test}, open(d / "test_batch", "wb"))
    return np.concatenate(xs), np.array(ys), xt, names


def make_cifar100(root, n=4):
    d = root / "cifar-100-python"; d.mkdir(parents=True)
    names = [f"f{i}" for i in range(100)]
    pickle.dump({"fine_label_names": names, "coarse_label_names": [f"k{i}" for i in range(20)]}, open(d / "meta", "wb"))
    x = RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    for split in ["train", "test"]:  # str keys this time (how a Python-2 pickle loads with latin1)
        pickle.dump({"data": x.reshape(n, 3072), "fine_labels": [99, 0, 5, 42][:n], "coarse_labels": [0] * n},
                    open(d / split, "wb"))
    return x, names


def make_svhn(root, split="train", n=5):
    from scipy.io import savemat
    x = RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)            # what we expect back, [N, C, H, W]
    y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)            # 1..10, 10 is the digit 0
    savemat(root / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": y})  # stored [H, W, C, N]
    return x, y.reshape(-1) % 10


def make_stl10(root, n_train=3, n_unlabeled=2):
    d = root / "stl10_binary"; d.mkdir(parents=True)
    (d / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]) + "\n")
    out = {}
    for split, n in [("train", n_train), ("test", n_train), ("unlabeled", n_unlabeled)]:
        x = RNG.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        x[0, 0] = np.arange(96, dtype=np.uint8)[:, None]                 # channel 0 of image 0: value = row index
        (d / f"{split}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())   # column-major, as in the archive
        y = None
        if split != "unlabeled":
            y = np.arange(1, n + 1, dtype=np.uint8); (d / f"{split}_y.bin").write_bytes(y.tobytes())
        out[split] = (x, y)
    return out


def make_image_folder(root, sub="train"):
    d = root / sub
    for c in ["dog", "cat"]: (d / c).mkdir(parents=True)
    half = np.zeros((12, 20, 3), np.uint8); half[:, :10] = (255, 0, 0); half[:, 10:] = (0, 0, 255)   # left red, right blue
    Image.fromarray(half).save(d / "cat" / "a.png")
    Image.fromarray(np.full((30, 16, 3), (0, 200, 0), np.uint8)).save(d / "cat" / "b.jpg", quality=95)
    Image.fromarray(np.full((9, 9), 77, np.uint8), mode="L").save(d / "dog" / "c.png")   # grayscale
    (d / "dog" / "notes.txt").write_text("not an image")
    (d / "dog" / "sub").mkdir(); Image.fromarray(half).save(d / "dog" / "sub" / "d.PNG")
    return d


# ---------------------------------------------------------------- ImageDataset
def test_image_dataset_basics():
    x = torch.arange(4 * 3 * 2 * 5, dtype=torch.uint8).reshape(4, 3, 2, 5)
    ds = ImageDataset(x, np.array([2, 0, -1, 1]), ["a", "b", "c"], (0.1, 0.2, 0.3), (1, 1, 1), "toy")
    assert (len(ds), ds.num_classes, ds.in_chans, ds.image_size, ds.targets.dtype) == (4, 3, 3, (2, 5), torch.int64)
    sub = ds.subset(torch.tensor([3, 0]))
    assert torch.equal(sub.images, x[[3, 0]]) and sub.targets.tolist() == [1, 2] and sub.classes == ds.classes
    assert ds.class_counts().tolist() == [1, 1, 1]
    assert "toy" in repr(ds) and "4 × 3×2×5" in repr(ds)
    with pytest.raises(DataError, match="mean/std"):
        ImageDataset(x, [0] * 4, ["a"], (0.5,), (0.5,))
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(x.float(), [0] * 4, ["a"], (0.5,) * 3, (0.5,) * 3)


def test_concat_and_lazy_concat_refused(tmp_path):
    a = ImageDataset(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), [0, 1], ["a", "b"], (0.5,), (0.5,), "a")
    b = ImageDataset(torch.ones(3, 1, 3, 3, dtype=torch.uint8), [-1] * 3, ["a", "b"], (0.5,), (0.5,), "b")
    c = a.concat(b)
    assert len(c) == 5 and c.targets.tolist() == [0, 1, -1, -1, -1] and c.images[2:].eq(1).all()
    lazy = load_dataset("imagenet", data_root=make_image_folder(tmp_path).parent, image_size=3)
    with pytest.raises(ConfigError, match="in-memory"):
        a.concat(lazy)


# ---------------------------------------------------------------- Fashion-MNIST / IDX
def test_fashion_mnist_from_data_root(tmp_path):
    want = make_fashion(tmp_path / "fashion-mnist")
    tr = load_dataset("fashion_mnist", "train", data_root=tmp_path, download=False)
    te = load_dataset("fashion_mnist", "test", data_root=tmp_path, download=False)
    assert tr.images.shape == (20, 1, 28, 28) and tr.images.dtype == torch.uint8 and te.images.shape == (10, 1, 28, 28)
    assert np.array_equal(tr.images[:, 0].numpy(), want["train"][0]) and tr.targets.tolist() == want["train"][1].tolist()
    assert tr.classes[0] == "T-shirt/top" and tr.classes[9] == "Ankle boot" and tr.mean == (0.2860,)
    assert load_dataset("fashion_mnist", data_root=tmp_path, download=False).images is tr.images   # cached


def test_fashion_mnist_torchvision_raw_layout_uncompressed(tmp_path):
    want = make_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    te = load_dataset("fashion_mnist", "test", data_root=tmp_path, download=False)
    assert np.array_equal(te.images[:, 0].numpy(), want["t10k"][0])


def test_fashion_cache_rereads_changed_files(tmp_path):
    make_fashion(tmp_path, n_train=20)
    a = load_dataset("fashion_mnist", data_root=tmp_path, download=False)
    make_fashion(tmp_path, n_train=30)
    b = load_dataset("fashion_mnist", data_root=tmp_path, download=False)
    assert len(a) == 20 and len(b) == 30


def test_fashion_missing_names_every_place(tmp_path, monkeypatch):
    deb = tmp_path / "deb"; deb.mkdir()
    monkeypatch.setattr(D, "_debian_fashion_dirs", lambda: (str(deb),))
    monkeypatch.setattr(D, "DEFAULT_DATA_ROOT", str(tmp_path / "cache"))
    with pytest.raises(DataError) as e:                     # no data_root: the cache, then the Debian package's folder
        load_dataset("fashion_mnist", download=False)
    msg = str(e.value)
    cache = tmp_path / "cache"
    for p in [cache, cache / "fashion-mnist", cache / "FashionMNIST" / "raw"]: assert f"{p} (no such folder)" in msg
    assert f"{deb} (missing train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz)" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    root = tmp_path / "root"; root.mkdir()                  # a data_root the user gives: only it is searched
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", data_root=root, download=False)
    assert f"{root} (missing" in str(e.value) and str(deb) not in str(e.value)
    monkeypatch.setattr(D, "_download_fashion", lambda r: "URLError: no network")
    with pytest.raises(DataError, match=r"download into .*root failed \(URLError: no network\)"):
        load_dataset("fashion_mnist", data_root=root)
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        load_dataset("fashion_mnist", data_root=tmp_path / "typo")


def test_fashion_download_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_debian_fashion_dirs", lambda: ())
    calls = []
    def fake_download(root):
        calls.append(root); make_fashion(root / "FashionMNIST" / "raw", n_train=10, gz=False)
    monkeypatch.setattr(D, "_download_fashion", fake_download)
    (tmp_path / "dl").mkdir()
    ds = load_dataset("fashion_mnist", data_root=tmp_path / "dl")
    assert calls == [tmp_path / "dl"] and len(ds) == 10


def test_read_idx_checks(tmp_path):
    x = RNG.integers(0, 256, (2, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / "ok", x, 0x803, gz=False)
    assert np.array_equal(read_idx(tmp_path / "ok", 0x803), x)
    with pytest.raises(DataError, match="expected 0x00000801"):
        read_idx(tmp_path / "ok", 0x801)
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    with pytest.raises(DataError, match="need 40 bytes but the file has 37"):
        read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(struct.pack(">I", 0x0D01) + struct.pack(">I", 1) + b"\0\0\0\0")
    with pytest.raises(DataError, match="magic 0x00000d01"):
        read_idx(tmp_path / "float")


def test_fashion_corrupt_is_one_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_debian_fashion_dirs", lambda: ())
    make_fashion(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:500])                                   # truncated gzip stream
    with pytest.raises(DataError, match="corrupt, truncated") as e:
        load_dataset("fashion_mnist", data_root=tmp_path, download=False)
    assert e.value.__cause__ is not None and "apt-get install" in str(e.value)
    write_idx(p, RNG.integers(0, 256, (20, 28, 28), dtype=np.uint8), 0x801)   # wrong magic
    with pytest.raises(DataError, match="expected 0x00000803"):
        load_dataset("fashion_mnist", data_root=tmp_path, download=False)


# ---------------------------------------------------------------- CIFAR
def test_cifar10(tmp_path):
    x, y, xt, names = make_cifar10(tmp_path)
    tr, te = load_dataset("cifar10", data_root=tmp_path), load_dataset("cifar10", "test", data_root=tmp_path)
    assert tr.images.shape == (10, 3, 32, 32) and tr.images.dtype == torch.uint8 and te.images.shape == (3, 3, 32, 32)
    assert np.array_equal(tr.images.numpy(), x) and tr.targets.tolist() == y.tolist() and tr.classes == names
    flat = x.reshape(10, 3072)                                           # rows: 1024 R, then G, then B, row-major
    assert tr.images[4, 0, 0, 1] == flat[4, 1] and tr.images[4, 1, 0, 0] == flat[4, 1024] and tr.images[4, 0, 1, 0] == flat[4, 32]
    assert np.array_equal(te.images.numpy(), xt) and te.targets.tolist() == [1, 1, 1]
    assert tr.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    # data_root may also be the extracted folder itself
    assert len(load_dataset("cifar10", data_root=tmp_path / "cifar-10-batches-py")) == 10


def test_cifar100(tmp_path):
    x, names = make_cifar100(tmp_path)
    ds = load_dataset("cifar100", "test", data_root=tmp_path)
    assert np.array_equal(ds.images.numpy(), x) and ds.targets.tolist() == [99, 0, 5, 42]
    assert ds.num_classes == 100 and ds.classes[99] == "f99" and ds.std == pytest.approx((68.2 / 255, 65.4 / 255, 70.4 / 255))


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_root=tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / 'cifar-10-batches-py'} (no such folder)" in msg and f"{tmp_path} (missing" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="corrupt") as e:
        load_dataset("cifar10", data_root=tmp_path)
    assert isinstance(e.value.__cause__, Exception) and not isinstance(e.value.__cause__, DataError)
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb"))
    with pytest.raises(DataError, match=r"data_batch_3: data \(2, 100\)"):
        load_dataset("cifar10", data_root=tmp_path)


# ---------------------------------------------------------------- SVHN
def test_svhn(tmp_path):
    x, y = make_svhn(tmp_path, "train", 12)
    ds = load_dataset("svhn", data_root=tmp_path)
    assert ds.images.shape == (12, 3, 32, 32) and ds.images.is_contiguous()
    assert np.array_equal(ds.images.numpy(), x)                         # [H, W, C, N] -> [N, C, H, W]
    assert ds.targets.tolist() == y.tolist() and ds.targets[9] == 0 and ds.classes[0] == "0"
    with pytest.raises(DataError, match="extra_32x32.mat"):
        load_dataset("svhn", data_root=tmp_path, extra=True)
    xe, _ = make_svhn(tmp_path, "extra", 3)
    both = load_dataset("svhn", data_root=tmp_path, extra=True)
    assert len(both) == 15 and np.array_equal(both.images[12:].numpy(), xe)
    with pytest.raises(DataError, match="ufldl.stanford.edu"):
        load_dataset("svhn", "test", data_root=tmp_path)


# ---------------------------------------------------------------- STL-10
def test_stl10_orientation_labels_unlabeled(tmp_path):
    want = make_stl10(tmp_path)
    tr = load_dataset("stl10", data_root=tmp_path)
    assert tr.images.shape == (3, 3, 96, 96) and tr.images.dtype == torch.uint8
    assert tr.images[0, 0, 5, 0] == 5 and tr.images[0, 0, 0, 5] == 0   # rows vary along H: not transposed
    assert np.array_equal(tr.images.numpy(), want["train"][0])
    assert tr.targets.tolist() == [0, 1, 2] and tr.classes[1] == "bird" and tr.num_classes == 10
    ul = load_dataset("stl10", "unlabeled", data_root=tmp_path)
    assert len(ul) == 2 and ul.targets.tolist() == [-1, -1] and np.array_equal(ul.images.numpy(), want["unlabeled"][0])
    both = ul.concat(tr)                                                 # TorchSSL's STL-10 unlabeled set
    assert len(both) == 5 and both.targets.tolist() == [-1, -1, 0, 1, 2]


def test_stl10_corrupt(tmp_path):
    make_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "train_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(DataError, match="not a multiple of 3·96·96"):
        load_dataset("stl10", data_root=tmp_path)
    (tmp_path / "stl10_binary" / "test_y.bin").write_bytes(bytes([1, 11, 2]))
    with pytest.raises(DataError, match="labels in 1..11"):
        load_dataset("stl10", "test", data_root=tmp_path)


def test_unlabeled_split_only_for_stl10(tmp_path):
    make_cifar10(tmp_path)
    with pytest.raises(ConfigError, match="no split 'unlabeled'.*split_labeled"):
        load_dataset("cifar10", "unlabeled", data_root=tmp_path)
    with pytest.raises(ConfigError, match="unknown options"):
        load_dataset("cifar10", data_root=tmp_path, image_size=32)
    with pytest.raises(ConfigError, match="Known datasets: cifar10, cifar100, digits, fashion_mnist, imagenet, stl10, svhn"):
        load_dataset("mnist")


# ---------------------------------------------------------------- ImageFolder (ImageNet)
def test_image_folder_lazy(tmp_path):
    make_image_folder(tmp_path, "train")
    ds = load_dataset("imagenet", data_root=tmp_path, image_size=8)
    assert ds.is_lazy and ds.classes == ["cat", "dog"] and ds.targets.tolist() == [0, 0, 1, 1]
    assert (len(ds), ds.in_chans, ds.image_size) == (4, 3, (8, 8))
    a = ds.images[0]
    assert a.shape == (3, 8, 8) and a.dtype == torch.uint8
    assert a[:, 3, 0].tolist() == [255, 0, 0] and a[:, 3, 7].tolist() == [0, 0, 255]   # left red, right blue
    gray = ds.images[2]
    assert torch.equal(gray[0], gray[1]) and int(gray[0, 4, 4]) == 77                 # L -> RGB
    assert str(ds.images.path(3)).endswith("dog/sub/d.PNG")
    sub = ds.subset([3, 1])
    assert sub.targets.tolist() == [1, 0] and torch.equal(sub.images[0], ds.images[3])
    with pytest.raises(DataError, match="val"):
        load_dataset("imagenet", "test", data_root=tmp_path)


def test_image_folder_corrupt_and_empty(tmp_path):
    d = make_image_folder(tmp_path, "val")
    (d / "cat" / "a.png").write_bytes(b"not a png")
    ds = load_dataset("imagenet", "test", data_root=tmp_path, image_size=8)
    with pytest.raises(DataError, match="Cannot decode image .*a.png"):
        ds.images[0]
    (tmp_path / "e" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in class sub-folders"):
        load_dataset("imagenet", data_root=tmp_path / "e")


# ---------------------------------------------------------------- digits
def test_digits_split_is_fixed_and_disjoint():
    tr, te = load_dataset("digits"), load_dataset("digits", "test")
    assert (len(tr), len(te), tr.images.shape[1:], tr.in_chans) == (1438, 359, (1, 8, 8), 1)
    assert int(tr.images.max()) == 255 and tr.images.dtype == torch.uint8
    from sklearn.datasets import load_digits
    full = torch.from_numpy(np.rint(load_digits().images * 255 / 16).astype(np.uint8))
    key = lambda x: {bytes(r) for r in x.reshape(len(x), -1).numpy()}
    assert len(key(tr.images) | key(te.images)) == len(key(full))       # together they are the whole set
    counts = te.class_counts().float() / (tr.class_counts() + te.class_counts()).float()
    assert counts.min() > 0.19 and counts.max() < 0.21                  # stratified 20%


# ---------------------------------------------------------------- split_labeled
def test_split_labeled_balanced_deterministic():
    t = torch.from_numpy(np.repeat(np.arange(10), 50))
    t[::7] = -1                                                           # unknown labels are never drawn
    lb, ulb = split_labeled(t, 40, seed=0)
    assert lb.dtype == ulb.dtype == torch.int64 and torch.equal(lb, lb.sort().values)
    assert t[lb].bincount(minlength=10).tolist() == [4] * 10
    assert torch.equal(ulb, torch.arange(500))
    assert torch.equal(split_labeled(t, 40, seed=0)[0], lb)
    assert not torch.equal(split_labeled(t, 40, seed=1)[0], lb)
    _, ulb2 = split_labeled(t, 40, seed=0, include_labeled=False)
    assert len(ulb2) == 460 and not set(ulb2.tolist()) & set(lb.tolist())


def test_split_labeled_errors():
    t = torch.tensor([0] * 5 + [1] * 3 + [-1] * 4)
    with pytest.raises(ConfigError, match="num_labels=3 is not a positive multiple of the 2 classes"):
        split_labeled(t, 3, 0)
    with pytest.raises(ConfigError, match="class 1 has only 3 samples; use at most 6"):
        split_labeled(t, 8, 0)
    with pytest.raises(ValueError):                                       # ConfigError is a ValueError
        split_labeled(torch.full((5,), -1), 2, 0)


# ---------------------------------------------------------------- InfiniteSampler
def test_sampler_resume_equals_uninterrupted(tmp_path):
    s = InfiniteSampler(23, 5, seed=7)
    [next(s) for _ in range(3)]
    state = s.state_dict()
    torch.save(state, tmp_path / "s.pt")
    rest = [next(s) for _ in range(9)]                                    # crosses several permutations
    r = InfiniteSampler(23, 5, seed=7)
    r.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert all(torch.equal(a, next(r)) for a in rest)
    assert state == {"epoch": 0, "pos": 15} and all(type(v) is int for v in state.values())


def test_sampler_small_n_and_seeds():
    s = InfiniteSampler(40, 64, seed=0)
    b = [next(s) for _ in range(5)]                                       # 320 = 8 permutations of 40
    assert all(len(x) == 64 and x.dtype == torch.int64 for x in b)
    flat = torch.cat(b)
    for e in range(8): assert torch.equal(flat[40 * e:40 * (e + 1)].sort().values, torch.arange(40))
    assert not torch.equal(flat[:40], flat[40:80])                        # a new permutation each epoch
    assert not torch.equal(next(InfiniteSampler(40, 64, seed=1)), b[0])
    assert not torch.equal(next(InfiniteSampler(40, 64, seed=0, stream=1)), b[0])
    with pytest.raises(ConfigError):
        InfiniteSampler(0, 4, 0)
    with pytest.raises(ConfigError, match="another dataset"):
        s.load_state_dict({"epoch": 0, "pos": 40})


def test_sampler_ddp_slices():
    ranks = [InfiniteSampler(50, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    single = InfiniteSampler(50, 16, seed=3)
    for _ in range(10):
        a, b, g = next(ranks[0]), next(ranks[1]), next(single)
        assert len(a) == len(b) == 8 and torch.equal(torch.cat([a, b]), g)
    # within one permutation the two ranks' slices are disjoint
    a, b = next(InfiniteSampler(50, 8, seed=3, rank=0, world_size=2)), next(InfiniteSampler(50, 8, seed=3, rank=1, world_size=2))
    assert not set(a.tolist()) & set(b.tolist())
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


# ---------------------------------------------------------------- SSLLoader
def toy(n, classes=4, size=6, unknown=False):
    x = torch.from_numpy(RNG.integers(0, 256, (n, 3, size, size), dtype=np.uint8))
    y = torch.full((n,), -1) if unknown else torch.arange(n) % classes
    return ImageDataset(x, y, [str(i) for i in range(classes)], (0.5,) * 3, (0.5,) * 3, "toy")


def test_loader_batches_in_memory():
    lb, ulb = toy(8), toy(30, unknown=True)
    loader = SSLLoader(lb, ulb, batch_size=16, uratio=3, seed=0, device="cpu")
    b = next(loader)
    assert set(b) == {"x_lb", "y_lb", "idx_lb", "x_ulb", "y_ulb", "idx_ulb"}
    assert b["x_lb"].shape == (16, 3, 6, 6) and b["x_ulb"].shape == (48, 3, 6, 6)
    assert b["x_lb"].dtype == b["x_ulb"].dtype == torch.uint8
    assert all(b[k].dtype == torch.int64 for k in ["y_lb", "idx_lb", "y_ulb", "idx_ulb"])
    assert torch.equal(b["x_lb"], lb.images[b["idx_lb"]]) and torch.equal(b["y_lb"], lb.targets[b["idx_lb"]])
    assert torch.equal(b["x_ulb"], ulb.images[b["idx_ulb"]]) and b["y_ulb"].eq(-1).all()
    assert b["idx_lb"].bincount(minlength=8).min() >= 1                   # 8 labels, batch 16: all used
    only = next(SSLLoader(lb, None, batch_size=4, seed=0))
    assert set(only) == {"x_lb", "y_lb", "idx_lb"}


def test_loader_resume_and_ddp(tmp_path):
    lb, ulb = toy(10), toy(37)
    a = SSLLoader(lb, ulb, batch_size=4, uratio=2, seed=5)
    [next(a) for _ in range(4)]
    torch.save(a.state_dict(), tmp_path / "l.pt")
    want = [next(a) for _ in range(6)]
    b = SSLLoader(lb, ulb, batch_size=4, uratio=2, seed=5)
    b.load_state_dict(torch.load(tmp_path / "l.pt", weights_only=True))
    for w in want:
        got = next(b)
        assert all(torch.equal(w[k], got[k]) for k in w)
    r0, r1 = (SSLLoader(lb, ulb, batch_size=2, uratio=2, seed=5, rank=r, world_size=2) for r in range(2))
    g = SSLLoader(lb, ulb, batch_size=4, uratio=2, seed=5)
    for _ in range(3):
        x0, x1, xg = next(r0), next(r1), next(g)
        assert torch.equal(torch.cat([x0["idx_lb"], x1["idx_lb"]]), xg["idx_lb"])
        assert torch.equal(torch.cat([x0["idx_ulb"], x1["idx_ulb"]]), xg["idx_ulb"])
    with pytest.raises(ConfigError, match="different unlabeled set"):
        SSLLoader(lb, None, batch_size=4).load_state_dict(a.state_dict())


def test_loader_validates():
    with pytest.raises(ConfigError, match="unknown"):
        SSLLoader(toy(4, unknown=True), toy(4), batch_size=2)
    with pytest.raises(ConfigError, match="must match"):
        SSLLoader(toy(4), toy(4, size=8), batch_size=2)
    with pytest.raises(ConfigError, match="uratio"):
        SSLLoader(toy(4), toy(4), batch_size=2, uratio=0)


def test_loader_lazy_with_workers_state_is_callers(tmp_path):
    d = make_image_folder(tmp_path, "train")
    for i in range(6): Image.fromarray(np.full((5, 5, 3), 10 * i, np.uint8)).save(d / "dog" / f"x{i}.png")
    ds = load_dataset("imagenet", data_root=tmp_path, image_size=4)       # 10 images, 2 classes
    lb = ds.subset(split_labeled(ds.targets, 4, seed=0)[0])
    a = SSLLoader(lb, ds, batch_size=2, uratio=2, seed=1, num_workers=2)
    first = [next(a) for _ in range(3)]                                   # workers have prefetched further
    state = a.state_dict()
    assert state == {"lb": {"epoch": 1, "pos": 2}, "ulb": {"epoch": 1, "pos": 2}}
    assert a._streams["lb"].sampler.state_dict() != state["lb"]                      # the sampler itself ran ahead
    nxt = next(a)
    b = SSLLoader(lb, ds, batch_size=2, uratio=2, seed=1, num_workers=0)
    b.load_state_dict(state)
    got = next(b)
    assert all(torch.equal(nxt[k], got[k]) for k in nxt)
    a.close()                                                             # workers stop; iterating again resumes
    assert all(s._it is None for s in a._streams.values())
    with a:
        again = next(a)
    assert all(torch.equal(again[k], v) for k, v in next(b).items())
    x = first[0]
    assert x["x_ulb"].shape == (4, 3, 4, 4) and x["x_ulb"].dtype == torch.uint8
    assert torch.equal(x["x_ulb"][0], ds.images[int(x["idx_ulb"][0])]) and torch.equal(x["y_ulb"], ds.targets[x["idx_ulb"]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loader_on_cuda():
    lb, ulb = toy(8), toy(20)
    b = next(SSLLoader(lb, ulb, batch_size=4, uratio=2, device="cuda"))
    assert all(v.device.type == "cuda" for v in b.values())
    assert torch.equal(b["x_ulb"].cpu(), ulb.images[b["idx_ulb"].cpu()])
