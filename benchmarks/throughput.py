"""Time to train, side by side: ssl_nb's whole training iteration against the USB-style reference pipeline.

    python benchmarks/throughput.py [--out runs/throughput] [--iters 100] [--warmup 10] [--workers 16]
                                    [--groups wrn_28_2 wrn_28_8 mae] [--budget-s 420] [--dry-run]

One process, synthetic uint8 images (no dataset needed): CIFAR-10 shape (32×32 RGB) for WRN-28-2 and CIFAR-100
shape for WRN-28-8, at the classic batch (B = 64 labeled + mu = 7 × B unlabeled images per view).

- **ssl_nb** rows drive the real training step, `ssl_nb.train.Run` (open, build, restore, wrap, then
  `Run.train_step` with the run's `MetricLogger`, flushed every `log_every` steps as `fit` does): the registered
  algorithm (`fixmatch`, `sequencematch`) with its paper preset (`cifar10-40`, `cifar100-400`) on a registered
  synthetic dataset, so what is timed is what users run: sampling, the views made on the device, forward, losses,
  backward, optimizer, EMA and the logging accumulation. Variants: the engine's defaults (on CUDA: bf16 autocast,
  channels_last, fused Triton losses and the whole step replayed as one CUDA graph, `graph_step="auto"`), the eager
  step (`graph_step=False`), the PyTorch losses (`SSL_NB_KERNELS=torch`), fp32 (`amp=False`) and `compile=True`
  (which takes the eager step: the two do not combine).
- **USB-style** rows follow `../shared/baselines/pipeline.py`: PIL flip + reflect crop (+ torchvision RandAugment
  with 1 or 3 ops) in DataLoader workers (a quarter of them for the labeled stream), the batch moved to the GPU,
  a WRN forward + CE + backward + SGD/Nesterov step (no EMA, a zero-weighted unlabeled term), in fp32 as USB trains
  and in bf16 + channels_last.
- **MAE** (when `ssl_nb.mae` exists): ssl_nb's `mae` task, ViT-B/16 at 224 px, batch 256, mask ratio 0.75, against
  `anchors.py`'s MAE step (a timm ViT-B/16 encoder on the visible patches, an 8×512 decoder, bf16, AdamW, no
  augmentation).

Each row: warm-up iterations, then `--iters` iterations timed with a device sync only before and after the window
(wall time per iteration, and the process's CPU time per iteration: on a GPU, CPU ms close to wall ms means the
step is bound by the host). Writes OUT/throughput.md (the table: ms/iteration, images/s, speed-up over the USB-style
fp32 and bf16 pipelines of the same network and method, hours for 2^20 iterations, card, date, versions) and
OUT/throughput.jsonl (one JSON line per row, written as each row finishes). `--budget-s` skips the remaining rows
(named in the table) once that many seconds have passed, so that a device call always ends with a table.

`--dry-run` runs every row on the CPU with tiny shapes (B = 4, mu = 2, WRN-10-2 and a micro ViT, 2 iterations): it
checks the command end to end, and its numbers are not measurements.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ITERS_2POW20_H = 2**20 / 3.6e6        # ms per iteration -> hours for 2^20 iterations


@dataclass(frozen=True)
class Sizes:
    "The shapes of one invocation (the real ones, or the dry run's)."
    batch: int = 64
    uratio: int = 7
    image: int = 32
    n_train: int = 50_000             # synthetic training images (CIFAR's count)
    n_test: int = 512
    iters: int = 100
    warmup: int = 10
    usb_warmup: int = 5               # pipeline.py's warm-up iterations (its workers fill their prefetch queues)
    workers: int = 16                 # USB-style DataLoader workers (all processes together)
    wrn_small: str | None = None      # dry run: this net instead of WRN-28-2 / WRN-28-8
    mae_net: str = "vit_base_patch16_224"
    mae_batch: int = 256
    mae_image: int = 224
    mae_n: int = 1024
    mae_anchor: tuple = (16, 768, 12, 12, 512, 8, 16)   # patch, dim, depth, heads, decoder dim, depth, heads

REAL = Sizes()
DRY = Sizes(batch=4, uratio=2, n_train=512, n_test=64, iters=2, warmup=1, usb_warmup=1, workers=2, wrn_small="wrn_10_2",
            mae_net="vit_micro_patch4_32", mae_batch=4, mae_image=32, mae_n=64, mae_anchor=(4, 64, 2, 2, 32, 1, 2))


# ---------------------------------------------------------------- synthetic data, registered as ssl_nb datasets
def register_synthetic(name: str, n_train: int, n_test: int, size: int, classes: int, channels: int = 3):
    """Register dataset `name` in `ssl_nb.data.DATASETS`: uniform random uint8 images `[n, channels, size, size]`,
    balanced labels (`i % classes`), the CIFAR-10 normalisation; the same tensors at every load (seeded, cached)."""
    from ssl_nb.data import DATASETS, NORM_STATS, ImageDataset
    cache = {}

    def load(split: str, root=None) -> ImageDataset:
        if split not in cache:
            n = n_train if split == "train" else n_test
            g = torch.Generator().manual_seed(0 if split == "train" else 1)
            x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
            mean, std = NORM_STATS["cifar10"] if channels == 3 else ((0.5,), (0.25,))
            cache[split] = ImageDataset(x, torch.arange(n) % classes, [f"c{i}" for i in range(classes)], mean, std, name)
        return cache[split]

    load.splits, load.default_root = ("train", "test"), False
    DATASETS.register(name)(load)
    return name


# ---------------------------------------------------------------- timing helpers
def sync(device: torch.device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def timed(fn, warmup: int, iters: int, device: torch.device) -> tuple[float, float]:
    "(wall ms, process CPU ms) per call of `fn` over `iters` calls after `warmup` calls; syncs only around the window."
    for _ in range(warmup): fn()
    sync(device)
    w, c = time.perf_counter(), time.process_time()
    for _ in range(iters): fn()
    sync(device)
    return 1e3 * (time.perf_counter() - w) / iters, 1e3 * (time.process_time() - c) / iters


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device):
    gc.collect()                              # the previous row's run, model and loaders
    if device.type == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def kernels_env(value: str | None):
    "SSL_NB_KERNELS set to `value` (None: unset, the default choice) for the duration."
    old = os.environ.get("SSL_NB_KERNELS")
    if value is None: os.environ.pop("SSL_NB_KERNELS", None)
    else: os.environ["SSL_NB_KERNELS"] = value
    try: yield
    finally:
        if old is None: os.environ.pop("SSL_NB_KERNELS", None)
        else: os.environ["SSL_NB_KERNELS"] = old


# ---------------------------------------------------------------- ssl_nb's training step
def ssl_nb_step(algo: str, preset: str | None, overrides: dict, sizes: Sizes, device: torch.device,
                kernels: str | None = None) -> dict:
    """Time `Run.train_step` of a run of `algo` built as `fit` builds it (`Run.open`, `_open_folder`, `build`,
    `restore`, `wrap`), with `fit`'s logger flushes every `log_every` steps."""
    from ssl_nb.train import MetricLogger, Run, make_config
    tmp = tempfile.mkdtemp(prefix="ssl_nb_throughput_")
    cfg = make_config(algo, preset, **{"run_dir": tmp, "device": str(device), "progress": False,
                                       "tensorboard": False, "num_workers": 0, "resume": False, **overrides})
    reset_peak(device)
    with kernels_env(kernels), contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        run = Run.open(cfg)
        run._open_folder(stack)
        run.build().restore().wrap()
        logger = stack.enter_context(contextlib.closing(MetricLogger(run.run_dir, run.device, tensorboard=False)))
        stack.callback(run.loader.close)
        task = run.task
        task.train()
        build_s = time.perf_counter() - t0

        def one():
            done = run.train_step(logger)
            if done % cfg.log_every == 0: logger.flush(done, lr=run.lr)      # what fit does (one host sync)

        t0 = time.perf_counter()
        one(); sync(device)
        first_s = time.perf_counter() - t0                                   # includes torch.compile's compilation
        ms, cpu_ms = timed(one, sizes.warmup, sizes.iters, device)
        row = logger.flush(run.step, lr=run.lr)                              # outside the window
        views = getattr(task, "views", None)
        if views:
            per_view = {"lb": cfg.batch_size, "ulb": cfg.batch_size * getattr(cfg, "uratio", 0)}
            images = sum(per_view[src] for src, _ in views.values())
        else: images = cfg.batch_size
        return {"ms": ms, "cpu_ms": cpu_ms, "images": images, "build_s": build_s, "first_step_s": first_s,
                "loss": row.get("loss"), "peak_gib": peak_gib(device), "net": cfg.net,
                "batch": cfg.batch_size, "uratio": getattr(cfg, "uratio", None),
                "precision": "bf16" if (cfg.amp and device.type == "cuda") else "fp32",
                "channels_last": cfg.channels_last, "compile": cfg.compile, "graph": run.graph_step,
                "losses": ("triton" if (kernels or "auto") != "torch" and device.type == "cuda" else "torch")}


# ---------------------------------------------------------------- the USB-style pipeline (pipeline.py's definition)
class _Block(torch.nn.Module):
    "anchors.py's WRN block: BN -> LeakyReLU -> conv (stride) -> BN -> LeakyReLU -> conv, 1x1 conv shortcut when the shape changes."
    def __init__(self, i, o, stride):
        super().__init__()
        nn = torch.nn
        self.bn1, self.c1 = nn.BatchNorm2d(i, momentum=0.001), nn.Conv2d(i, o, 3, stride, 1, bias=False)
        self.bn2, self.c2 = nn.BatchNorm2d(o, momentum=0.001), nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.sc = None if (i == o and stride == 1) else nn.Conv2d(i, o, 1, stride, 0, bias=False)

    def forward(self, x):
        F = torch.nn.functional
        o = F.leaky_relu(self.bn1(x), 0.1)
        y = self.c2(F.leaky_relu(self.bn2(self.c1(o)), 0.1))
        return y + (x if self.sc is None else self.sc(o))


class _WRN(torch.nn.Module):
    "anchors.py's WRN (depth, widen), 3 groups with strides 1, 2, 2."
    def __init__(self, num_classes: int, depth: int, widen: int):
        super().__init__()
        nn, n = torch.nn, (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(*[_Block(ch[g] if b == 0 else ch[g + 1], ch[g + 1], s if b == 0 else 1)
                                      for g, s in zip(range(3), (1, 2, 2)) for b in range(n)])
        self.bn, self.fc = nn.BatchNorm2d(ch[3], momentum=0.001), nn.Linear(ch[3], num_classes)

    def forward(self, x):
        F = torch.nn.functional
        x = F.leaky_relu(self.bn(self.blocks(self.conv(x))), 0.1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _wrn_shape(net: str) -> tuple[int, int]:
    "(depth, widen) of `wrn_<depth>_<widen>`."
    _, d, w = net.split("_")
    return int(d), int(w)


class _PILImages(torch.utils.data.Dataset):
    "Endless PIL views of HWC uint8 images: `(view(img) for view in views)` (+ the label for the labeled stream)."
    def __init__(self, data, labels, views, labeled: bool):
        self.data, self.labels, self.views, self.labeled = data, labels, views, labeled
    def __len__(self): return 10**7
    def __getitem__(self, i):
        from PIL import Image
        j = i % len(self.data)
        im = Image.fromarray(self.data[j])
        if self.labeled: return self.views[0](im), int(self.labels[j])
        return tuple(v(im) for v in self.views)


def usb_step(algo: str, precision: str, net: str, classes: int, sizes: Sizes, device: torch.device) -> dict:
    """pipeline.py's iteration: PIL augmentation in DataLoader workers, the batch moved to `device`, a WRN step
    (fp32, or bf16 autocast + channels_last)."""
    import numpy as np
    import torchvision.transforms as TT
    F = torch.nn.functional
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    norm = [TT.ToTensor(), TT.Normalize(mean, std)]
    base = [TT.RandomHorizontalFlip(), TT.RandomCrop(sizes.image, padding=sizes.image // 8, padding_mode="reflect")]
    weak = TT.Compose(base + norm)
    medium, strong = TT.Compose(base + [TT.RandAugment(1, 10)] + norm), TT.Compose(base + [TT.RandAugment(3, 10)] + norm)
    views = [weak, strong] if algo == "fixmatch" else [weak, medium, strong]
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (min(sizes.n_train, 50_000), sizes.image, sizes.image, 3), dtype=np.uint8)
    labels = rng.integers(0, classes, len(data))
    B, mu, W = sizes.batch, sizes.uratio, sizes.workers
    lw = max(1, W // 4); uw = max(1, W - lw)
    kw = dict(pin_memory=device.type == "cuda", persistent_workers=True, prefetch_factor=4)
    reset_peak(device)
    t0 = time.perf_counter()
    ll = torch.utils.data.DataLoader(_PILImages(data, labels, [weak], True), batch_size=B, num_workers=lw, **kw)
    ul = torch.utils.data.DataLoader(_PILImages(data, labels, views, False), batch_size=B * mu, num_workers=uw, **kw)
    li, ui = iter(ll), iter(ul)
    depth, widen = _wrn_shape(net)
    model = _WRN(classes, depth, widen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4)
    cl = precision != "fp32"
    if cl: model = model.to(memory_format=torch.channels_last)
    bf16 = precision != "fp32" and device.type == "cuda"

    def one():
        xl, yl = next(li); us = next(ui)
        x = torch.cat([xl, *us]).to(device, non_blocking=True); y = yl.to(device, non_blocking=True)
        if cl: x = x.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            out = model(x)
            loss = F.cross_entropy(out[:B], y) + out[B:].float().logsumexp(-1).mean() * 0
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()

    try:
        one(); sync(device)
        build_s = time.perf_counter() - t0
        ms, cpu_ms = timed(one, sizes.usb_warmup, sizes.iters, device)
    finally:
        del li, ui, ll, ul                                   # stops the workers
    return {"ms": ms, "cpu_ms": cpu_ms, "images": B * (1 + mu * len(views)), "build_s": build_s,
            "peak_gib": peak_gib(device), "net": net, "batch": B, "uratio": mu, "workers": W,
            "precision": "bf16" if bf16 else "fp32", "channels_last": cl, "compile": False, "losses": "-"}


# ---------------------------------------------------------------- MAE: ssl_nb's task and anchors.py's step
def mae_anchor_step(sizes: Sizes, device: torch.device, mask_ratio: float = 0.75) -> dict:
    """anchors.py's MAE step: a timm ViT (patch embedding + positions, blocks on the kept patches), a linear
    projection, an MLP-free decoder of plain blocks over all positions, a dummy loss; bf16 autocast, AdamW."""
    import timm  # noqa: F401
    from timm.models.vision_transformer import Block, VisionTransformer
    nn = torch.nn
    p, dim, depth, heads, ddim, ddepth, dheads = sizes.mae_anchor
    B, size = sizes.mae_batch, sizes.mae_image
    reset_peak(device)
    enc = VisionTransformer(img_size=size, patch_size=p, embed_dim=dim, depth=depth, num_heads=heads,
                            num_classes=0).to(device)
    dec = nn.Sequential(*[Block(ddim, dheads) for _ in range(ddepth)]).to(device)
    proj, head = nn.Linear(dim, ddim).to(device), nn.Linear(ddim, p * p * 3).to(device)
    params = [*enc.parameters(), *dec.parameters(), *proj.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    imgs = torch.randn(B, 3, size, size, device=device)
    bf16 = device.type == "cuda"

    def one():
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
            N = x.shape[1]; K = int(N * (1 - mask_ratio))
            ids = torch.argsort(torch.rand(B, N, device=device), 1)
            vis = torch.gather(x, 1, ids[:, :K, None].repeat(1, 1, x.shape[-1]))
            for blk in enc.blocks: vis = blk(vis)
            z = proj(enc.norm(vis))
            full = torch.cat([z, torch.zeros(B, N - K, ddim, device=device, dtype=z.dtype)], 1)
            full = torch.gather(full, 1, torch.argsort(ids, 1)[:, :, None].repeat(1, 1, ddim))
            loss = (head(dec(full)).float() ** 2).mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()

    t0 = time.perf_counter(); one(); sync(device); build_s = time.perf_counter() - t0
    ms, cpu_ms = timed(one, sizes.warmup, sizes.iters, device)
    return {"ms": ms, "cpu_ms": cpu_ms, "images": B, "build_s": build_s, "peak_gib": peak_gib(device),
            "net": f"timm ViT p{p} d{dim}x{depth} + dec {ddim}x{ddepth}", "batch": B, "uratio": None,
            "precision": "bf16" if bf16 else "fp32", "channels_last": False, "compile": False, "losses": "-"}


# ---------------------------------------------------------------- the rows
@dataclass(frozen=True)
class Case:
    group: str                   # wrn_28_2, wrn_28_8, mae
    algo: str                    # fixmatch, sequencematch, mae
    pipeline: str                # "ssl_nb" or "usb" (USB-style) or "anchor"
    variant: str                 # what differs from the defaults
    run: object = None           # callable(sizes, device) -> dict

    @property
    def label(self) -> str: return f"{self.group} {self.algo} {self.pipeline} {self.variant}"


def _ssl_nb_mae(sizes: Sizes, device: torch.device) -> dict:
    "ssl_nb's `mae` task at MAE's ViT-B/16 recipe (preset imagenet-vit_b) on synthetic 224 px images, batch 256."
    over = {"dataset": "synthetic_imagenet", "net": sizes.mae_net, "batch_size": sizes.mae_batch, "knn_labels": 10,
            "eval_limit": 16, "mask_ratio": 0.75}
    return ssl_nb_step("mae", "imagenet-vit_b" if sizes.mae_net == REAL.mae_net else None, over, sizes, device)


def cases(sizes: Sizes, groups, compile_rows: bool) -> list[Case]:
    "Every row, most important first (so that --budget-s drops the least important)."
    out, late = [], []
    specs = {"wrn_28_2": ("cifar10-40", "synthetic_cifar10", 10), "wrn_28_8": ("cifar100-400", "synthetic_cifar100", 100)}
    for group in [g for g in ("wrn_28_2", "wrn_28_8") if g in groups]:
        preset, dataset, classes = specs[group]
        net = sizes.wrn_small or group
        base = {"dataset": dataset, "num_labels": 4 * classes, "batch_size": sizes.batch, "uratio": sizes.uratio,
                "eval_limit": sizes.n_test, **({"net": net} if sizes.wrn_small else {})}

        def ours(algo, over=None, kernels=None, preset=preset, base=base):
            return lambda s, d: ssl_nb_step(algo, preset, {**base, **(over or {})}, s, d, kernels)

        def usb(algo, prec, net=net, classes=classes):
            return lambda s, d: usb_step(algo, prec, net, classes, s, d)

        for algo in ("sequencematch", "fixmatch"):
            out += [Case(group, algo, "ssl_nb", "default", ours(algo)),
                    Case(group, algo, "ssl_nb", "eager step", ours(algo, {"graph_step": False})),
                    Case(group, algo, "usb", "fp32", usb(algo, "fp32")),
                    Case(group, algo, "usb", "bf16+cl", usb(algo, "bf16_cl"))]
        if group == "wrn_28_2":
            for algo in ("sequencematch", "fixmatch"):
                out += [Case(group, algo, "ssl_nb", "torch losses", ours(algo, kernels="torch")),
                        Case(group, algo, "ssl_nb", "fp32", ours(algo, {"amp": False, "channels_last": False}))]
            if compile_rows:                 # last: each compiles for a minute or more
                late += [Case(group, algo, "ssl_nb", "compile", ours(algo, {"compile": True}))
                        for algo in ("sequencematch", "fixmatch")]
    if "mae" in groups:
        out += [Case("mae", "mae", "ssl_nb", "default", _ssl_nb_mae),
                Case("mae", "mae", "anchor", "anchors.py", mae_anchor_step)]
    return out + late


def mae_available() -> str | None:
    "None when `ssl_nb.mae` (the MAE task) imports; else why not."
    try:
        importlib.import_module("ssl_nb.mae")
        from ssl_nb.core import ALGORITHMS
        ALGORITHMS.get("mae")
        return None
    except Exception as e:
        return f"ssl_nb.mae is not available ({type(e).__name__}: {e})"


# ---------------------------------------------------------------- the table
def environment(device: torch.device) -> dict:
    vers = {"python": platform.python_version(), "torch": torch.__version__}
    for m in ("triton", "torchvision", "timm", "PIL"):
        with contextlib.suppress(Exception): vers[m] = importlib.import_module(m).__version__
    if device.type == "cuda": vers["cuda"] = torch.version.cuda; vers["cudnn"] = torch.backends.cudnn.version()
    with contextlib.suppress(Exception):
        vers["ssl_nb commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                               text=True, timeout=10).stdout.strip() or "?"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"card": card, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "versions": vers}


def add_ratios(rows: list[dict]) -> list[dict]:
    "Speed-up of each row over the USB-style fp32 and bf16 rows of the same group and method (usb_ms / ms)."
    ref = {(r["group"], r["algo"], r["variant"]): r["ms"] for r in rows if r.get("pipeline") == "usb" and "ms" in r}
    anchor = {(r["group"], r["algo"]): r["ms"] for r in rows if r.get("pipeline") == "anchor" and "ms" in r}
    for r in rows:
        if "ms" not in r: continue
        fp32, bf16 = ref.get((r["group"], r["algo"], "fp32")), ref.get((r["group"], r["algo"], "bf16+cl"))
        r["x_usb_fp32"] = fp32 / r["ms"] if fp32 else None
        r["x_usb_bf16"] = bf16 / r["ms"] if bf16 else None
        a = anchor.get((r["group"], r["algo"]))
        r["x_anchor"] = a / r["ms"] if a and r["pipeline"] != "anchor" else None
        r["images_per_s"] = r["images"] / r["ms"] * 1e3
        r["hours_2pow20"] = r["ms"] * ITERS_2POW20_H
    return rows


def _f(v, fmt="{:.2f}", none="–"):
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


GROUPS = {"wrn_28_2": "WRN-28-2, CIFAR-10 shape", "wrn_28_8": "WRN-28-8, CIFAR-100 shape", "mae": "MAE ViT-B/16"}
TARGETS = {("wrn_28_2", "sequencematch"): 21.0, ("wrn_28_2", "fixmatch"): 15.0}   # ms on an H100 (issue 18)


def table(rows: list[dict], meta: dict, dry_run: bool) -> str:
    L = []
    if dry_run:
        L += ["**CPU DRY RUN: tiny shapes (B = 4, mu = 2, WRN-10-2, a micro ViT), 2 iterations. These numbers check "
              "that the command runs end to end; they are not measurements.**", ""]
    v = meta["versions"]
    L += [f"Card: **{meta['card']}**, {meta['cpu_cores']} CPU cores; date {meta['date']}; "
          + ", ".join(f"{k} {v[k]}" for k in v), "",
          f"Command: `{meta['command']}`", "",
          f"Timed: {meta['iters']} iterations after {meta['warmup']} warm-up ones (device sync only around the "
          f"window), synthetic uint8 images {meta['image']}×{meta['image']} RGB, B = {meta['batch']}, mu = "
          f"{meta['uratio']}; USB-style rows with {meta['workers']} DataLoader workers. "
          "`× USB fp32` / `× USB bf16`: the USB-style pipeline's ms per iteration (same network and method) divided "
          "by the row's. CPU ms: the process's CPU time per iteration (all threads; the workers' not included).", "",
          "| row | network | method | pipeline | variant | precision, layout, step | images/iter | ms/iter | CPU ms/iter | images/s | "
          "× USB fp32 | × USB bf16 | h per 2^20 iters | peak GiB |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ms" not in r:
            L.append(f"| {GROUPS[r['group']]} | | {r['algo']} | {r['pipeline']} | {r['variant']} | | | "
                     f"{r.get('skipped', 'failed')} | | | | | | |")
            continue
        setup = r["precision"] + (" + CL" if r.get("channels_last") else "") + (" + CUDA graph" if r.get("graph") else "")
        L.append(f"| {GROUPS[r['group']]} | {r['net']} | {r['algo']} | {r['pipeline']} | {r['variant']} | {setup}"
                 f" | {r['images']} | {_f(r['ms'])} | {_f(r['cpu_ms'])} | "
                 f"{_f(r['images_per_s'], '{:,.0f}')} | {_f(r['x_usb_fp32'])} | {_f(r['x_usb_bf16'])} | "
                 f"{_f(r['hours_2pow20'], '{:.1f}')} | {_f(r.get('peak_gib'))} |")
    mae = [r for r in rows if r.get("group") == "mae" and r.get("pipeline") == "ssl_nb" and r.get("x_anchor")]
    for r in mae: L += ["", f"MAE: ssl_nb's step is {r['x_anchor']:.2f}× anchors.py's ({_f(r['ms'])} ms vs "
                            f"{_f(r['ms'] * r['x_anchor'])} ms per iteration)."]
    checks = []
    timed = lambda g, a, variant: next((r for r in rows if (r.get("group"), r.get("algo"), r.get("pipeline"),
                                                           r.get("variant")) == (g, a, "ssl_nb", variant) and "ms" in r), None)
    for (g, a), target in TARGETS.items():
        for variant in ("default", "eager step"):
            if (r := timed(g, a, variant)) is None: continue
            checks.append(f"- {a}, {g}, ssl_nb {variant}: {_f(r['ms'])} ms per iteration (issue 18's target on an "
                          f"H100: ≤ {target:.0f} ms); × USB fp32 {_f(r['x_usb_fp32'])} (target ≥ 4.5), × USB bf16 "
                          f"{_f(r['x_usb_bf16'])} (target ≥ 2.4).")
        r, t = timed(g, a, "default"), timed(g, a, "torch losses")
        if r is not None and t is not None:
            verdict = "faster" if r["ms"] < t["ms"] else "NOT faster"
            checks.append(f"  - fused losses vs PyTorch losses: {_f(r['ms'])} vs {_f(t['ms'])} ms: the fused step is "
                          f"{verdict}{' (on the CPU both are the PyTorch losses)' if 'CPU' in meta['card'] else ''}.")
    if checks: L += ["", "Issue 18's targets:", *checks]
    notes = [r for r in rows if r.get("note")]
    if notes: L += ["", "Notes:", *[f"- {r['group']} {r['algo']} {r['pipeline']} {r['variant']}: {r['note']}" for r in notes]]
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", default=str(ROOT / "runs" / "throughput"))
    p.add_argument("--iters", type=int, default=None, help=f"timed iterations per row (default {REAL.iters})")
    p.add_argument("--warmup", type=int, default=None, help=f"warm-up iterations per row (default {REAL.warmup})")
    p.add_argument("--workers", type=int, default=None, help="USB-style DataLoader workers (default min(16, cores))")
    p.add_argument("--groups", nargs="+", default=["wrn_28_2", "wrn_28_8", "mae"], choices=["wrn_28_2", "wrn_28_8", "mae"])
    p.add_argument("--no-compile", action="store_true", help="skip the compile=True rows")
    p.add_argument("--budget-s", type=float, default=None, help="skip the remaining rows after this many seconds")
    p.add_argument("--device", default="auto")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 iterations: checks the command")
    args = p.parse_args(argv)

    sizes = DRY if args.dry_run else replace(REAL, workers=min(16, os.cpu_count() or 1))
    if args.iters is not None: sizes = replace(sizes, iters=args.iters)
    if args.warmup is not None: sizes = replace(sizes, warmup=args.warmup)
    if args.workers is not None: sizes = replace(sizes, workers=args.workers)
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)          # tiny ops: a second thread only waits (and the test machine is shared)
    else:
        from ssl_nb.core import get_device
        device = get_device(args.device)
        if device.type != "cuda":
            print("throughput.py: no CUDA device; these are CPU numbers (use --dry-run for a quick check)", flush=True)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    jsonl, md = out / "throughput.jsonl", out / "throughput.md"
    jsonl.write_text("")

    register_synthetic("synthetic_cifar10", sizes.n_train, sizes.n_test, sizes.image, 10)
    register_synthetic("synthetic_cifar100", sizes.n_train, sizes.n_test, sizes.image, 100)
    groups = list(args.groups)
    mae_note = mae_available() if "mae" in groups else None
    if "mae" in groups and mae_note is None:
        register_synthetic("synthetic_imagenet", sizes.mae_n, 64, sizes.mae_image, 10)
    compile_rows = not args.no_compile and not args.dry_run
    meta = {**environment(device), "command": shlex.join(["python", "benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
            "iters": sizes.iters, "warmup": sizes.warmup, "image": sizes.image, "batch": sizes.batch,
            "uratio": sizes.uratio, "workers": sizes.workers, "dry_run": args.dry_run}
    print(json.dumps(meta), flush=True)
    with open(jsonl, "a") as f: f.write(json.dumps({"meta": meta}) + "\n")
    rows, skipped, start = [], [], time.perf_counter()
    todo = cases(sizes, groups, compile_rows)
    if "mae" in groups and mae_note is not None:
        todo = [c for c in todo if c.group != "mae"]
        skipped.append({"group": "mae", "algo": "mae", "pipeline": "ssl_nb", "variant": "default",
                     "skipped": "skipped", "note": mae_note})
    if not compile_rows:
        skipped.append({"group": "wrn_28_2", "algo": "sequencematch, fixmatch", "pipeline": "ssl_nb", "variant": "compile",
                     "skipped": "skipped", "note": "compile rows skipped (" + ("dry run: torch.compile on the CPU "
                     "takes minutes" if args.dry_run else "--no-compile") + ")"})
    for case in todo:
        base = {"group": case.group, "algo": case.algo, "pipeline": case.pipeline, "variant": case.variant}
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            rows.append({**base, "skipped": "skipped", "note": f"over --budget-s {args.budget_s:.0f}"})
            continue
        t0 = time.perf_counter()
        try:
            row = {**base, **case.run(sizes, device)}
        except Exception as e:                                 # one broken row must not lose the others
            traceback.print_exc()
            row = {**base, "skipped": "failed", "note": f"{type(e).__name__}: {str(e)[:300]}"}
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(jsonl, "a") as f: f.write(json.dumps(row) + "\n")
        md.write_text(table(add_ratios([dict(r) for r in rows + skipped]), meta, args.dry_run))
    rows = add_ratios(rows + skipped)
    with open(jsonl, "a") as f:
        for r in skipped: f.write(json.dumps(r) + "\n")
    md.write_text(table(rows, meta, args.dry_run))
    print(md.read_text(), flush=True)
    return 0 if all("ms" in r or r.get("skipped") == "skipped" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
