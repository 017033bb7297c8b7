"""Tests of ssl_nb.augment: op counts and ranges, identities, parity with PIL (USB's RandAugment definitions),
Cutout, views, determinism and errors. CPU only and fast; the CUDA checks run only where a GPU is present."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

import ssl_nb.augment as A
from ssl_nb.augment import (CUTOUT_FILL, OP_NAMES, RA_OPS, View, apply_op, center_crop, cutout, flip_crop,
                            make_views, normalize, rand_augment)
from ssl_nb.core import ConfigError

RANGES = {o.name: (o.low, o.high) for o in RA_OPS}
GEOM = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
CUDA = torch.cuda.is_available()


def gen(seed=0, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def images(b, c, h, w, seed=0):
    "Random uint8 images, a quarter of them low-contrast and a quarter skewed dark (exercises AutoContrast/Equalize)."
    x = torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=gen(seed))
    x[: b // 4] = x[: b // 4] // 4 + 60
    x[b // 4: b // 2] = (x[b // 4: b // 2].float() ** 2 / 255).to(torch.uint8)
    return x


def to_pil(im):
    a = im.permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[2] == 1 else a), "L" if a.shape[2] == 1 else "RGB")


def from_pil(im, c):
    a = np.array(im)
    return torch.from_numpy(a.reshape(a.shape[0], a.shape[1], c)).permute(2, 0, 1)


# USB's op definitions (semilearn/datasets/augmentation/randaugment.py), on PIL images
USB = {
    "AutoContrast": lambda im, v: ImageOps.autocontrast(im),
    "Brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "Color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "Contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "Equalize": lambda im, v: ImageOps.equalize(im),
    "Identity": lambda im, v: im,
    "Posterize": lambda im, v: ImageOps.posterize(im, max(1, int(v))),
    "Rotate": lambda im, v: im.rotate(v),
    "Sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "ShearX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda im, v: ImageOps.solarize(im, v),
    "TranslateX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "TranslateY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}


def pil_affine(op, v, w, h):
    "PIL's AFFINE data (a, b, c, d, e, f) for USB's warps: source = (a·x + b·y + c, d·x + e·y + f) at pixel centres."
    if op == "Rotate":  # Image.rotate(v): counter-clockwise about (w/2, h/2)
        t = -math.radians(v)
        a, b, d, e = math.cos(t), math.sin(t), -math.sin(t), math.cos(t)
        return a, b, a * -w / 2 + b * -h / 2 + w / 2, d, e, d * -w / 2 + e * -h / 2 + h / 2
    return {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0)}[op]


def pil_op(x, op, mags):
    return torch.stack([from_pil(USB[op](to_pil(im), float(m)), x.shape[1]) for im, m in zip(x, mags)])


@pytest.fixture(params=["cpu_subsets", "batched"])
def path(request, monkeypatch):
    "Run a test through both code paths: per-op sub-batches (CPU) and the whole-batch `where` path (the GPU's)."
    monkeypatch.setattr(A, "CPU_SUBSETS", request.param == "cpu_subsets")
    return request.param


# ---------------------------------------------------------------- RandAugment: op counts and ranges
@pytest.mark.parametrize("n_ops", [1, 3])
def test_rand_augment_params(n_ops):
    B = 3000
    x = torch.randint(0, 256, (B, 3, 4, 4), dtype=torch.uint8, generator=gen(1))
    y, idx, mag = rand_augment(x, n_ops, gen(0), return_params=True)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert idx.shape == (B, n_ops) and mag.shape == (B, n_ops) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < len(RA_OPS)
    counts = torch.bincount(idx.flatten(), minlength=14)
    expected = B * n_ops / 14
    assert (counts > 0.75 * expected).all() and (counts < 1.25 * expected).all(), counts  # all 14, ~uniform
    lo, hi = torch.tensor([o.low for o in RA_OPS]), torch.tensor([o.high for o in RA_OPS])
    assert ((mag >= lo[idx]) & (mag <= hi[idx])).all()
    for k, o in enumerate(RA_OPS):  # uniform over the whole range: min/max near the ends, mean near the middle
        m = mag[idx == k].double()
        span = o.high - o.low
        assert m.min() < o.low + 0.05 * span and m.max() > o.high - 0.05 * span, o
        assert abs(m.mean() - (o.low + o.high) / 2) < 0.06 * span, o
    if n_ops == 3:  # with replacement: P(some repeat among 3 of 14) = 1 - 13·12/14² ≈ 0.204
        rep = (idx[:, 0] == idx[:, 1]) | (idx[:, 0] == idx[:, 2]) | (idx[:, 1] == idx[:, 2])
        assert 0.17 < rep.float().mean() < 0.24


def test_rand_augment_zero_ops_and_subset():
    x = images(16, 3, 8, 8)
    y, idx, mag = rand_augment(x, 0, gen(), return_params=True)
    assert torch.equal(y, x) and idx.shape == (16, 0)
    ops = ("Solarize", "Posterize")
    y, idx, mag = rand_augment(x, 2, gen(), ops=ops, return_params=True)
    assert set(idx.unique().tolist()) == {0, 1}
    assert (mag[idx == 0] <= 256).all() and (mag[idx == 1] >= 4).all() and (mag[idx == 1] <= 8).all()


def test_rand_augment_matches_pil_replay(path):
    "Replay each sample's recorded ops through USB's PIL definitions: exact for every non-geometric op."
    ops = [o for o in RA_OPS if o.name not in GEOM]
    for c in (3, 1):
        x = images(150, c, 20, 24, seed=c)
        y, idx, mag = rand_augment(x, 3, gen(c), ops=ops, return_params=True)
        ref = []
        for b in range(len(x)):
            im = to_pil(x[b])
            for k in range(3): im = USB[ops[idx[b, k]].name](im, float(mag[b, k]))
            ref.append(from_pil(im, c))
        assert torch.equal(y, torch.stack(ref))


def test_rand_augment_with_warps_close_to_pil_replay(path):
    x = images(150, 3, 32, 32, seed=5)
    y, idx, mag = rand_augment(x, 3, gen(5), return_params=True)
    ref = []
    for b in range(len(x)):
        im = to_pil(x[b])
        for k in range(3): im = USB[RA_OPS[idx[b, k]].name](im, float(mag[b, k]))
        ref.append(from_pil(im, 3))
    diff = (y != torch.stack(ref)).any(1).float().mean()
    # PIL rotates/shears in 16.16 fixed point: near-ties flip, and later ops can spread a flipped pixel (e.g. through
    # AutoContrast/Equalize). Measured ~1e-3; 1% would mean a real convention error (those change ~10-50% of pixels).
    assert diff < 0.01, diff


def test_paths_agree():
    "The CPU sub-batch path and the whole-batch `where` path (the one CUDA runs) give identical images."
    for c in (1, 3):
        x = images(300, c, 16, 16, seed=c)
        A.CPU_SUBSETS = True
        try:
            y1 = rand_augment(x, 3, gen(7))
            A.CPU_SUBSETS = False
            y2 = rand_augment(x, 3, gen(7))
        finally:
            A.CPU_SUBSETS = True
        assert torch.equal(y1, y2)
        assert not torch.equal(y1, x)


# ---------------------------------------------------------------- single ops: identities and PIL parity
IDENTITIES = [("Brightness", 1.0), ("Color", 1.0), ("Contrast", 1.0), ("Sharpness", 1.0), ("Rotate", 0.0),
              ("ShearX", 0.0), ("ShearY", 0.0), ("TranslateX", 0.0), ("TranslateY", 0.0), ("Posterize", 8.0),
              ("Solarize", 256.0), ("Identity", None)]


@pytest.mark.parametrize("op,m", IDENTITIES)
@pytest.mark.parametrize("c", [1, 3])
def test_identities(op, m, c, path):
    x = images(12, c, 17, 23)
    assert torch.equal(apply_op(x, op, m), x)
    assert not torch.equal(apply_op(x, "Solarize", 128.0), x)  # the op is live: not everything is an identity


def test_non_identities():
    x = images(12, 3, 16, 16)
    assert torch.equal(apply_op(x, "Solarize", 0.0), 255 - x)
    assert torch.equal(apply_op(x, "Brightness", 0.0), torch.zeros_like(x))
    assert torch.equal(apply_op(x, "Posterize", 4.9), x & 0xF0)  # int(4.9) = 4 bits, as USB's int(v)
    assert torch.equal(apply_op(x[:, :1], "Color", 0.3), x[:, :1])  # Color is the identity on one channel
    g = apply_op(x, "Color", 0.0)  # fully desaturated: three equal channels
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])


EXACT = ["AutoContrast", "Equalize", "Posterize", "Solarize", "Brightness", "Color", "Contrast", "Sharpness",
         "TranslateX", "TranslateY"]


@pytest.mark.parametrize("op", EXACT)
@pytest.mark.parametrize("c,h,w", [(3, 32, 32), (1, 28, 28), (3, 17, 23), (1, 40, 40)])
def test_exact_vs_pil(op, c, h, w, path):
    x = images(60, c, h, w, seed=h + c)
    lo, hi = RANGES[op]
    if op in ("Brightness", "Color", "Contrast", "Sharpness"): lo, hi = 0.0, 2.0  # also PIL's extrapolation branch
    mag = lo + (hi - lo) * torch.rand(60, generator=gen(h))
    mag[:2] = torch.tensor([lo, hi])
    x[2] = 77                                              # a constant image
    x[3, :, :, : w // 2] = 3; x[3, :, :, w // 2:] = 200    # two grey levels
    assert torch.equal(apply_op(x, op, mag), pil_op(x, op, mag))


@pytest.mark.parametrize("op", ["Rotate", "ShearX", "ShearY"])
@pytest.mark.parametrize("c,h,w", [(3, 32, 32), (1, 28, 28), (3, 17, 23), (1, 96, 96)])
def test_warps_vs_pil(op, c, h, w, path):
    "PIL rotates and shears in 16.16 fixed point; we sample in floating point: only near-ties may differ."
    x = images(60, c, h, w, seed=w)
    lo, hi = RANGES[op]
    mag = lo + (hi - lo) * torch.rand(60, generator=gen(w + 1))
    ours, ref = apply_op(x, op, mag), pil_op(x, op, mag)
    diff = (ours != ref).any(1)
    assert diff.float().mean() < 1.5e-3, diff.float().mean()  # measured <= 6e-4
    # every differing pixel is a near-tie: its exact (float64) source coordinate lies within PIL's fixed-point error,
    # (H + W) coefficient steps of 2^-17 px, of a pixel edge
    py, px = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                            indexing="ij")
    for bi in diff.flatten(1).any(1).nonzero().flatten().tolist():
        a, b_, c, d, e, f = pil_affine(op, float(mag[bi]), w, h)
        u, v = a * px + b_ * py + c, d * px + e * py + f
        edge = torch.minimum((u - u.round()).abs(), (v - v.round()).abs())
        assert edge[diff[bi]].max() < (h + w + 2) * 2.0 ** -17, (op, bi, edge[diff[bi]].max())


def test_warp_direction_and_zero_fill():
    x = torch.zeros(1, 1, 9, 9, dtype=torch.uint8); x[0, 0, 4, 8] = 255   # a dot on the right of the centre row
    y = apply_op(x, "Rotate", 90.0)                                       # PIL: counter-clockwise -> the dot goes up
    assert y[0, 0, 0, 4] == 255 and y.sum() == 255
    y = apply_op(torch.full((1, 1, 8, 8), 9, dtype=torch.uint8), "TranslateX", 0.25)  # content moves left by 2 px
    assert (y[0, 0, :, -2:] == 0).all() and (y[0, 0, :, :-2] == 9).all()


def test_apply_op_errors():
    x = images(4, 3, 8, 8)
    with pytest.raises(ConfigError, match="Unknown op"): apply_op(x, "Invert", 1.0)
    with pytest.raises(ConfigError, match="tensor \\[B=4\\]"): apply_op(x, "Rotate", torch.zeros(3))


# ---------------------------------------------------------------- Cutout
def test_cutout_matches_usb_geometry():
    "Replay the uniforms through USB's CutoutAbs arithmetic and PIL's ImageDraw.rectangle."
    B, H, W = 400, 32, 32
    x = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=gen(2))
    y = cutout(x, gen(3))
    u = torch.rand(B, 3, 1, generator=gen(3)).double()
    ref = []
    for b in range(B):
        v = float(u[b, 0]) * 0.5 * W
        x0c, y0c = W + (1 - W) * float(u[b, 1]), H + (1 - H) * float(u[b, 2])  # np.random.uniform(w) = U(1, w)
        x0, y0 = int(max(0, x0c - v / 2.0)), int(max(0, y0c - v / 2.0))
        im = to_pil(x[b]).copy()
        ImageDraw.Draw(im).rectangle((x0, y0, min(W, x0 + v), min(H, y0 + v)), CUTOUT_FILL)
        ref.append(from_pil(im, 3))
    assert (y != torch.stack(ref)).any(1).flatten(1).any(1).sum() <= 2  # float32 vs float64 at exact pixel edges


@pytest.mark.parametrize("c,fill", [(3, CUTOUT_FILL), (1, (123,))])
def test_cutout_fill_and_area(c, fill):
    B, S = 1000, 32
    x = torch.randint(0, 256, (B, c, S, S), dtype=torch.uint8, generator=gen(4))
    fillv = torch.tensor(fill, dtype=torch.uint8).view(1, c, 1, 1)
    x[(x == fillv).all(1, keepdim=True).expand_as(x)] = 0   # so that only cut pixels carry the fill colour
    y = cutout(x, gen(5))
    filled = (y == fillv).all(1)
    assert torch.equal(y[~filled[:, None].expand_as(y)], x[~filled[:, None].expand_as(x)])  # nothing else changed
    rows, cols = filled.any(2), filled.any(1)
    h, w = rows.sum(1), cols.sum(1)
    assert torch.equal(filled.sum((1, 2)), h * w)                                     # one filled rectangle
    assert h.min() >= 1 and h.max() <= S // 2 + 1 and w.max() <= S // 2 + 1           # side int(v) + 1 <= 17
    inner = (rows[:, 0] == 0) & (rows[:, -1] == 0) & (cols[:, 0] == 0) & (cols[:, -1] == 0)
    assert torch.equal(h[inner], w[inner])                                            # a square when not clipped
    area = (h * w).float() / S ** 2
    assert 0.04 < area.mean() < 0.12                                                  # E[(0.5·U·32 + 1)²]/1024 ≈ 0.096
    assert torch.equal(cutout(x, gen(5), max_frac=0.0), x)


def test_cutout_gray_fill_value():
    assert A._fill_values(CUTOUT_FILL, 1) == (123,)   # PIL's convert("L") of (125, 123, 114); 0.299/0.587/0.114 too
    assert round(0.299 * 125 + 0.587 * 123 + 0.114 * 114) == 123
    with pytest.raises(ConfigError, match="give 3 value"): cutout(images(2, 3, 8, 8), gen(), fill=(1, 2))


# ---------------------------------------------------------------- flip / crop
def test_flip_crop_outputs_are_crops_of_the_padded_image():
    B, S, P = 24, 12, 3
    x = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=gen(6))
    p = F.pad(x.float(), (P,) * 4, mode="reflect").to(torch.uint8)
    for order in ("crop_flip", "flip_crop"):
        y = flip_crop(x, gen(7), P, order=order)
        n_flip = 0
        for b in range(B):
            cands = [(i, j, fl) for i in range(2 * P + 1) for j in range(2 * P + 1) for fl in (0, 1)
                     if torch.equal(y[b], (p[b, :, i:i + S, j:j + S].flip(2) if fl else p[b, :, i:i + S, j:j + S]))]
            assert cands, (order, b)
            n_flip += all(c[2] for c in cands)
        assert 3 < n_flip < B - 3


def test_flip_crop_matches_torchvision_offsets():
    B, P = 32, 4
    x = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=gen(8))
    y = flip_crop(x, gen(9), P, crop_size=28, flip=False)
    g = gen(9)
    i, j = torch.randint(0, 40 - 28 + 1, (B, 1), generator=g), torch.randint(0, 40 - 28 + 1, (B, 1), generator=g)
    p = F.pad(x.float(), (P,) * 4, mode="reflect").to(torch.uint8)
    assert torch.equal(y, torch.stack([p[b, :, i[b]:i[b] + 28, j[b]:j[b] + 28] for b in range(B)]))


def test_flip_crop_orders_differ_per_draw_not_in_distribution():
    x = torch.randint(0, 256, (200, 1, 8, 8), dtype=torch.uint8, generator=gen(10))
    a, b = flip_crop(x, gen(11), 2, order="crop_flip"), flip_crop(x, gen(11), 2, order="flip_crop")
    assert not torch.equal(a, b)
    assert torch.equal(flip_crop(x, gen(11), 2, flip=False, order="crop_flip"),
                       flip_crop(x, gen(11), 2, flip=False, order="flip_crop"))


def test_center_crop():
    x = torch.arange(2 * 10 * 10, dtype=torch.uint8).view(2, 1, 10, 10)
    assert torch.equal(center_crop(x, 6), x[:, :, 2:8, 2:8])
    with pytest.raises(ConfigError, match="larger than"): center_crop(x, 12)


# ---------------------------------------------------------------- views
@pytest.mark.parametrize("c", [1, 3])
def test_weak_view_no_cutout_preserves_pixels(c):
    mean, std = (0.5,) * c, (0.25,) * c
    x = torch.randint(0, 256, (64, c, 28, 28), dtype=torch.uint8, generator=gen(12))
    weak = make_views(mean, std, 28, pad=0)["weak"]
    assert weak.describe()["cutout"] is False and weak.describe()["n_ops"] == 0
    y = weak.augment(x, gen(13))
    assert torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # same multiset (only flips)
    weak = make_views(mean, std, 28)["weak"]                                          # 3 px reflect padding
    y = weak.augment(x, gen(13))
    for b in range(64):                                       # every value comes from the image (no fill, no blend)
        assert torch.isin(y[b].unique(), x[b].unique()).all()
    assert torch.allclose(weak(x, gen(13)), (y.float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize("position", ["after", "before"])
def test_view_composition_order(position):
    "`after`: flip/crop, then RandAugment, then Cutout; `before`: RandAugment, Cutout, then flip/crop."
    x = images(64, 3, 32, 32, seed=14)
    v = make_views((0.5,) * 3, (0.25,) * 3, 32, ra_position=position)["strong"]
    y = v.augment(x, gen(15))
    g, order = gen(15), v.order
    if position == "after":
        r = cutout(rand_augment(flip_crop(x, g, 4, order=order), 3, g), g)
    else:
        r = flip_crop(cutout(rand_augment(x, 3, g), g), g, 4, order=order)
    assert torch.equal(y, r)


def test_before_and_after_differ():
    x = images(64, 3, 32, 32, seed=16)
    after = make_views((0.5,) * 3, (0.25,) * 3, 32, ra_position="after", order="crop_flip")["strong"]
    before = make_views((0.5,) * 3, (0.25,) * 3, 32, ra_position="before", order="crop_flip")["strong"]
    ya, yb = after.augment(x, gen(17)), before.augment(x, gen(17))
    assert (ya != yb).flatten(1).any(1).float().mean() > 0.5
    # "before": the cutout square goes through the crop, so reflect padding can mirror part of it; "after" never does
    fill = torch.tensor(CUTOUT_FILL, dtype=torch.uint8).view(1, 3, 1, 1)
    def span(a):  # extent from the first to the last True, per row of `a`
        n = a.shape[1]
        return torch.where(a.any(1), n - a.int().flip(1).argmax(1) - a.int().argmax(1), 0)
    def not_one_rectangle(y):  # samples whose fill pixels do not fill their bounding box
        m = (y == fill).all(1)
        return (m.sum((1, 2)) != span(m.any(1)) * span(m.any(2))).sum()
    bigger = images(400, 3, 32, 32, seed=18); bigger[(bigger == fill).all(1, keepdim=True).expand_as(bigger)] = 0
    v_after = View((0.5,) * 3, (0.25,) * 3, n_ops=0, cutout=True, pad=8, ra_position="after")
    v_before = View((0.5,) * 3, (0.25,) * 3, n_ops=0, cutout=True, pad=8, ra_position="before")
    assert not_one_rectangle(v_after.augment(bigger, gen(19))) == 0
    assert not_one_rectangle(v_before.augment(bigger, gen(19))) > 0


def test_views_determinism_shapes_and_describe():
    for c in (1, 3):
        views = make_views((0.5,) * c, (0.25,) * c, 32)
        x = images(16, c, 32, 32, seed=c)
        for name, v in views.items():
            a, b, d = v(x, gen(1)), v(x, gen(1)), v(x, gen(2))
            assert a.shape == (16, c, 32, 32) and a.dtype == torch.float32
            assert torch.equal(a, b)
            assert torch.equal(a, d) == (name == "eval")
            desc = v.describe()
            json.dumps(desc)
            assert desc["name"] == name and desc["mean"] == [0.5] * c
    d = {k: v.describe() for k, v in make_views((0.5,) * 3, (0.25,) * 3, 96, ra_position="before").items()}
    assert (d["weak"]["n_ops"], d["medium"]["n_ops"], d["strong"]["n_ops"]) == (0, 1, 3)
    assert (d["weak"]["cutout"], d["medium"]["cutout"], d["strong"]["cutout"]) == (False, True, True)
    # TorchSSL ("before") pads 4 px at every size; USB ("after") int(s / 8): 12 px at 96
    assert d["strong"]["pad"] == 4 and d["strong"]["ra_position"] == "before" and d["strong"]["order"] == "flip_crop"
    assert make_views((0.5,) * 3, (0.25,) * 3, 96)["strong"].describe()["pad"] == 12
    assert d["strong"]["ops"]["Solarize"] == [0, 256] and len(d["strong"]["ops"]) == 14
    assert d["eval"]["train"] is False
    assert make_views((0.5,), (0.25,), 28)["weak"].pad == 3
    assert make_views((0.5,), (0.25,), 28, ra_position="before")["weak"].pad == 4
    # ImageNet: a 224 crop of 256 px images; USB takes it without padding, TorchSSL with 4 px
    assert make_views((0.5,) * 3, (0.25,) * 3, 256, crop_size=224)["weak"].pad == 0
    assert make_views((0.5,) * 3, (0.25,) * 3, 256, ra_position="before", crop_size=224)["weak"].pad == 4
    assert make_views((0.5,), (0.25,), 32, pad=2)["weak"].pad == 2


def test_eval_view_and_channels_last():
    x = images(8, 3, 36, 36)
    views = make_views((0.4, 0.5, 0.6), (0.2, 0.25, 0.3), 36, crop_size=32, channels_last=True)
    e = views["eval"](x)
    assert torch.equal(e, normalize(x[:, :, 2:34, 2:34], (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)))
    assert e.is_contiguous(memory_format=torch.channels_last)
    s = views["strong"](x, gen())
    assert s.shape == (8, 3, 32, 32) and s.is_contiguous(memory_format=torch.channels_last)


def test_normalize_matches_torchvision():
    import torchvision.transforms.functional as TF
    x = images(4, 3, 8, 8)
    m, s = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert torch.equal(normalize(x, m, s), TF.normalize(x.float() / 255, m, s))
    assert torch.equal(normalize(x, torch.tensor(m), torch.tensor(s)), TF.normalize(x.float() / 255, m, s))


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("n", [-1, 1.5, True, "3"])
def test_bad_n_ops(n):
    with pytest.raises(ConfigError, match="n_ops"): rand_augment(images(2, 3, 8, 8), n, gen())
    with pytest.raises(ConfigError, match="n_ops"): View((0.5,) * 3, (0.5,) * 3, n_ops=n)


def test_input_errors():
    x = images(2, 3, 8, 8)
    for fn in (lambda t: rand_augment(t, 1, gen()), lambda t: cutout(t, gen()), lambda t: flip_crop(t, gen(), 2),
               lambda t: make_views((0.5,) * 3, (0.5,) * 3, 8)["strong"](t, gen())):
        with pytest.raises(ConfigError, match="uint8"): fn(x.float())
        with pytest.raises(ConfigError, match=r"x\[None\]"): fn(x[0])
    with pytest.raises(ConfigError, match="channels first"): rand_augment(x.permute(0, 2, 3, 1), 1, gen())
    with pytest.raises(ConfigError, match="one value per channel"): make_views((0.5,), (0.5,), 8)["weak"](x, gen())
    with pytest.raises(ConfigError, match="Generator"): rand_augment(x, 1, None)
    with pytest.raises(ConfigError, match="ra_position"): make_views((0.5,) * 3, (0.5,) * 3, 8, ra_position="mid")
    with pytest.raises(ConfigError, match="Unknown RandAugment ops"): rand_augment(x, 1, gen(), ops=("Invert",))
    with pytest.raises(ConfigError, match="pad"): flip_crop(x, gen(), 8)
    with pytest.raises(ConfigError, match="order"): flip_crop(x, gen(), 2, order="crop")


def test_generator_on_another_device():
    x = torch.empty(2, 3, 8, 8, dtype=torch.uint8, device="meta")
    for fn in (lambda: rand_augment(x, 1, gen()), lambda: cutout(x, gen()), lambda: flip_crop(x, gen(), 1)):
        with pytest.raises(ConfigError, match="generator is on cpu but the images are on meta"): fn()


# ---------------------------------------------------------------- CUDA (skipped without a GPU)
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_ops_equal_cpu_and_views_run_without_sync():
    x = images(256, 3, 32, 32)
    xc = x.cuda()
    for op in OP_NAMES:
        lo, hi = RANGES[op]
        m = lo + (hi - lo) * torch.rand(256, generator=gen(1))
        same = (apply_op(xc, op, m.cuda()).cpu() == apply_op(x, op, m)).all(1).float().mean()
        assert same >= (0.9995 if op in ("Rotate", "ShearX", "ShearY") else 1.0), (op, same)
    y, idx, mag = rand_augment(xc, 3, gen(0, "cuda"), return_params=True)
    r = x
    for k in range(3): r = A._apply_slot(r, idx[:, k].cpu(), mag[:, k].cpu(), tuple(o.name for o in RA_OPS))
    assert (y.cpu() == r).all(1).float().mean() > 0.999
    with pytest.raises(ConfigError, match="generator is on cpu"): rand_augment(xc, 1, gen())
    views, g = make_views((0.5,) * 3, (0.25,) * 3, 32), gen(0, "cuda")
    for v in views.values(): v(xc, g)                 # warm up (caches the constants on the device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = [v(xc, g) for v in views.values()]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(o.is_cuda and o.dtype == torch.float32 for o in outs)


# ---------------------------------------------------------------- SSL views: resized crop, jitter, grayscale, blur
from PIL import ImageFilter  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
import torchvision.transforms.v2.functional as TF2  # noqa: E402
from ssl_nb.augment import (ResizedCropView, adjust_hue, box_blur_pil, color_jitter, gaussian_blur, grayscale,  # noqa: E402
                            hflip, lincls_view, mae_view, mocov2_view, random_grayscale, random_resized_crop,
                            resized_crop, rrc_boxes)


def pil_each(x, fn):
    "`fn(pil_image, i)` on every image of a uint8 batch, through PIL."
    return torch.stack([from_pil(fn(to_pil(x[i]), i), x.shape[1]) for i in range(x.shape[0])])


def test_rrc_boxes_follow_torchvision_get_params_on_the_same_uniforms():
    "The batched sampler equals torchvision's loop (Python floats, round half to even) fed the same random numbers."
    B, H, W, scale, ratio = 300, 20, 33, (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = rrc_boxes(B, H, W, gen(5), scale, ratio)
    g = gen(5)
    u = torch.rand(B, 10, 2, generator=g, dtype=torch.float64)
    v = torch.rand(B, 2, generator=g, dtype=torch.float64)
    for b in range(B):
        for t in range(10):
            area = H * W * (scale[0] + (scale[1] - scale[0]) * u[b, t, 0].item())
            ar = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[b, t, 1].item())
            w, h = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if 0 < w <= W and 0 < h <= H:
                i, j = int(v[b, 0].item() * (H - h + 1)), int(v[b, 1].item() * (W - w + 1))
                break
        else:
            h, w = H, int(round(H * ratio[1]))
            i, j = 0, (W - w) // 2
        assert boxes[b].tolist() == [i, j, h, w], b


def test_rrc_fallback_for_tall_images_and_area_statistics():
    boxes = rrc_boxes(50, 40, 6, gen(), scale=(1.0, 1.0))          # W/H = 0.15 < 3/4: never fits, central crop
    assert (boxes == torch.tensor([[(40 - 8) // 2, 0, 8, 6]])).all()
    b = rrc_boxes(20000, 64, 64, gen(1), scale=(0.2, 1.0))
    area = (b[:, 2] * b[:, 3]).double() / 64 ** 2
    assert area.min() >= 0.18 and area.max() <= 1.0
    # below U(0.2, 1)'s mean 0.6: a large area with an aspect ratio far from 1 does not fit and is drawn again
    assert 0.5 < area.mean().item() < 0.6


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("c", [1, 3])
def test_resized_crop_matches_torchvision_and_pil(mode, c):
    x = images(12, c, 26, 21, seed=3)
    boxes = rrc_boxes(12, 26, 21, gen(2), scale=(0.05, 1.0))
    im = getattr(TF2.InterpolationMode, mode.upper())
    pil_mode = Image.BILINEAR if mode == "bilinear" else Image.BICUBIC
    for size in [(28, 28), (32, 24), (9, 9)]:
        out = resized_crop(x, boxes, size, mode)
        ref = torch.stack([TF2.resized_crop(x[i], *boxes[i].tolist(), list(size), interpolation=im, antialias=True)
                           for i in range(12)])
        d = (out.int() - ref.int()).abs()
        assert d.max() <= 2 and (d > 0).float().mean() < 0.02, (size, d.max(), (d > 0).float().mean())
        for i in range(3):                                           # PIL itself: crop, then resize (on small crops,
            t, l, h, w = boxes[i].tolist()                           # which pass Pillow 13 runs first may vary)
            p = from_pil(to_pil(x[i]).crop((l, t, l + w, t + h)).resize(size[::-1], pil_mode), c)
            assert (out[i].int() - p.int()).abs().float().mean() < 0.5
        ref = torch.stack([TF2.resized_crop(x[i].float(), *boxes[i].tolist(), list(size), interpolation=im,
                                            antialias=False) for i in range(12)]).round().clamp(0, 255)
        d = (resized_crop(x, boxes, size, mode, antialias=False).float() - ref).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 0.02    # ties at .5, summed in another order


def test_random_resized_crop_deterministic_and_checks():
    x = images(8, 3, 32, 32)
    a, ba = random_resized_crop(x, gen(4), 24, return_params=True)
    b, bb = random_resized_crop(x, gen(4), 24, return_params=True)
    assert torch.equal(a, b) and torch.equal(ba, bb) and a.shape == (8, 3, 24, 24)
    assert not torch.equal(ba, random_resized_crop(x, gen(5), 24, return_params=True)[1])
    with pytest.raises(ConfigError, match="interpolation"):
        random_resized_crop(x, gen(), 24, interpolation="nearest")
    with pytest.raises(ConfigError, match="ratio"):
        random_resized_crop(x, gen(), 24, ratio=(2.0, 1.0))
    with pytest.raises(ConfigError, match="torch.Generator"):
        random_resized_crop(x, None, 24)


def test_grayscale_and_hue_match_pil():
    x = images(48, 3, 7, 9, seed=1)
    x[:6, 2] = x[:6, 0]
    assert torch.equal(grayscale(x), pil_each(x, lambda im, i: TF.rgb_to_grayscale(im, 3)))
    for hf in (-0.5, -0.23, 0.0, 0.004, 0.1, 0.37, 0.5):
        assert torch.equal(adjust_hue(x, hf), pil_each(x, lambda im, i: TF.adjust_hue(im, hf))), hf
    p = torch.rand(48, generator=gen(2)) - 0.5
    assert torch.equal(adjust_hue(x, p), pil_each(x, lambda im, i: TF.adjust_hue(im, float(p[i]))))


@pytest.mark.parametrize("random_order", [True, False])
def test_color_jitter_matches_torchvision_on_pil(random_order):
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for c in (3, 1):
        x = images(96, c, 10, 8, seed=c)
        y, f, order, apply = color_jitter(x, gen(c), 0.8, (0.5, 1.7), 0.6, 0.25, p=0.7, random_order=random_order,
                                          return_params=True)

        def ref(im, i):
            for k in (order[i].tolist() if apply[i] else []): im = fns[k](im, float(f[i, k]))
            return im
        assert torch.equal(y, pil_each(x, ref))
        assert random_order or (order == torch.arange(4)).all()
        assert f[:, 0].min() >= 0.2 and f[:, 1].min() >= 0.5 and f[:, 1].max() <= 1.7 and f[:, 3].abs().max() <= 0.25
        assert 0.5 < apply.float().mean() < 0.9


def test_gaussian_blur_matches_pil_bit_for_bit():
    for c, h, w, sigma in ((3, 16, 13, (0.1, 2.0)), (1, 28, 28, (0.1, 2.0)), (3, 4, 6, (0.1, 2.0)),
                           (1, 20, 9, (2.5, 9.0))):
        x = images(40, c, h, w, seed=h)
        y, s, apply = gaussian_blur(x, gen(w), sigma, p=0.6, return_params=True)
        assert torch.equal(y, pil_each(x, lambda im, i: im.filter(ImageFilter.GaussianBlur(radius=float(s[i])))
                                       if apply[i] else im))
        assert s.min() >= sigma[0] and s.max() <= sigma[1]
    with pytest.raises(ConfigError, match="sigma"):
        gaussian_blur(x, gen(), (0.0, 1.0))


def test_ssl_views_on_grayscale_and_rgb():
    for c in (1, 3):
        x = images(32, c, 28, 28)
        for make in (mocov2_view, mae_view, lincls_view):
            v = make((0.5,) * c, (0.25,) * c, 32)
            a, b = v(x, gen(9)), v(x, gen(9))
            assert a.shape == (32, c, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
            assert json.loads(json.dumps(v.describe()))["name"] == v.name
    v = ResizedCropView((0.5,), (0.25,), 28, scale=(1.0, 1.0), flip=False)    # full-image crop: only normalisation
    x = images(4, 1, 28, 28)
    assert torch.equal(v.augment(x, gen()), x)
    assert v(x, gen()).sub(x.float().div(255).sub(0.5).div(0.25)).abs().max() < 1e-6
    with pytest.raises(ConfigError, match="mean"):
        ResizedCropView((0.5, 0.5), (0.25,), 28)
    with pytest.raises(ConfigError, match="jitter"):
        ResizedCropView((0.5,), (0.25,), 28, jitter=(0.4, 0.4))
    with pytest.raises(ConfigError, match="1 channel"):
        mocov2_view((0.5,) * 3, (0.25,) * 3, 28)(images(2, 1, 28, 28), gen())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_ssl_ops_equal_cpu_and_views_run_without_sync():
    x = images(64, 3, 32, 32)
    xc = x.cuda()
    boxes = rrc_boxes(64, 32, 32, gen(1))
    for mode in ("bilinear", "bicubic"):
        d = (resized_crop(xc, boxes.cuda(), 28, mode).cpu().int() - resized_crop(x, boxes, 28, mode).int()).abs()
        assert d.max() <= 1
    hf = torch.rand(64, generator=gen(2)) - 0.5
    assert torch.equal(adjust_hue(xc, hf.cuda()).cpu(), adjust_hue(x, hf))
    s = 0.1 + 1.9 * torch.rand(64, generator=gen(3), dtype=torch.float64)
    assert torch.equal(box_blur_pil(xc, s.cuda(), 2.0).cpu(), box_blur_pil(x, s, 2.0))
    g = gen(0, "cuda")
    views = [mocov2_view((0.5,) * 3, (0.25,) * 3, 32), mae_view((0.5,) * 3, (0.25,) * 3, 32)]
    for v in views: v(xc, g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [v(xc, g) for v in views] + [hflip(xc, g), random_grayscale(xc, g)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(o.is_cuda for o in outs)
