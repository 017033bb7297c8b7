"""One MAE training step of ViT-B/16 (batch 256, bf16, 25% of the patches kept): ssl_nb's against the anchor of
/work/shared/baselines/anchors.py, in the same process, and SymMIM's step at the same size.

    python benchmarks/mim_step.py                       # on a GPU: prints JSON rows and a markdown table
    python benchmarks/mim_step.py --dry-run             # on the CPU: tiny shapes, 2 iterations (the test)

The anchor is anchors.py's `mae_vit_step` section itself: its source is read from the file (the file runs all its
sections at import, so it is not imported), its `bench` (median of CUDA-event timings) is taken too, and both run
here unchanged; it times keep 0.25 and 0.5 (its H100 figure at keep 0.25: 77.6 ms). ssl_nb's steps are the engine's
step (`Run.train_step`: the task's `train_step` under bf16 autocast, backward, lr schedule, AdamW step) of the `mae`
and `symmim` tasks built without data, timed with the same `bench`: once on ready inputs (normalised images and masks
made outside the step, as the anchor does) and once with `make_inputs` inside the step (MAE's random resized crop and
flip of uint8 256-px images on the device, and the masks). `--dry-run` swaps in a CPU timer and tiny shapes (a
2-block ViT on 32-px images for the anchor, the micro ViT for ssl_nb); its numbers mean nothing. Rows also go to
$OUT/mim_step.jsonl when $OUT is set.
"""
from __future__ import annotations

import argparse, ast, json, os, statistics, sys, time
from pathlib import Path

# the shared baselines' anchors.py: $ANCHORS_PY, else the copy a GPU session carries (.carry/baselines), else the team's
_CARRIED = Path(__file__).resolve().parents[1] / ".carry" / "baselines" / "anchors.py"
ANCHORS = Path(os.environ.get("ANCHORS_PY") or (_CARRIED if _CARRIED.is_file() else "/work/shared/baselines/anchors.py"))
# --dry-run: the anchor's step at tiny shapes on the CPU (each replacement must match, or the anchor changed)
TINY_ANCHOR = [('timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)',
                'timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4, '
                'embed_dim=32, depth=2, num_heads=2)'),
               ("VB(512, 16) for _ in range(8)", "VB(16, 2) for _ in range(2)"), ("nn.Linear(768, 512)", "nn.Linear(32, 16)"),
               ("nn.Linear(512, 768)", "nn.Linear(16, 48)"), ("B = 256", "B = 4"), ("B, 3, 224, 224", "B, 3, 32, 32"),
               ("N - K, 512,", "N - K, 16,"), ("repeat(1, 1, 512)", "repeat(1, 1, 16)"),
               ("bench(step, warmup=3, iters=10)", "bench(step, warmup=1, iters=2)")]


def anchor_sources(path: Path = ANCHORS) -> tuple[str, str]:
    "The source of anchors.py's `bench` function and the body of its `mae_vit_step` section (dedented)."
    text = path.read_text()
    tree = ast.parse(text)
    bench = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "bench")
    section = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and any(
        isinstance(d, ast.Call) and d.args and getattr(d.args[0], "value", None) == "mae_vit_step"
        for d in n.decorator_list))
    lines = text.splitlines()
    body = "\n".join(l[4:] for l in lines[section.body[0].lineno - 1:section.end_lineno])
    return ast.get_source_segment(text, bench), body


def cpu_bench(fn, warmup=1, iters=2):
    "Median wall time (ms) of `fn` on the CPU (the dry run's stand-in for anchors.py's CUDA-event `bench`)."
    for _ in range(warmup): fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def run_anchor(dry: bool, bench, emit) -> None:
    "anchors.py's MAE step, its code unchanged (tiny shapes in the dry run)."
    import torch, torch.nn as nn, torch.nn.functional as F
    _, body = anchor_sources()
    if dry:
        for old, new in TINY_ANCHOR:
            if old not in body: raise SystemExit(f"mim_step.py: anchors.py's MAE step no longer contains {old!r}")
            body = body.replace(old, new)
    rows = []
    exec(compile(body, str(ANCHORS), "exec"), {"torch": torch, "nn": nn, "F": F, "dev": "cuda" if not dry else "cpu",
                                              "bench": bench, "emit": lambda **kw: rows.append(kw)})
    for r in rows: emit(impl="anchors.py MAE step", batch=r["batch"], keep=r["keep"], views=False, step_ms=r["step_ms"],
                        img_per_s=r["img_per_s"])


def ssl_nb_steps(algorithm: str, dry: bool, bench, emit, batch: int) -> None:
    "The engine's step of `algorithm` (built without data), on ready inputs and with its views and masks inside."
    import torch
    from ssl_nb.core import ALGORITHMS, autocast
    from ssl_nb.train import build_optimizer, make_config, set_lr
    dev = torch.device("cpu" if dry else "cuda")
    net = "vit_micro_patch4_32" if dry else "vit_base_patch16_224"
    cfg = make_config(algorithm, net=net, dataset="fashion_mnist" if dry else "imagenet", batch_size=batch,
                      num_iters=1000, warmup_iters=10, amp=not dry, channels_last=not dry,
                      **({"mask_ratio": 0.75} if algorithm == "mae" else {}), device=str(dev))
    torch.manual_seed(0)
    task = ALGORITHMS.get(algorithm)(cfg, data=None)
    task.to(dev); task.train()
    task.model = task.model.to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    opt = build_optimizer(task.param_groups(task.model), cfg)
    gen = torch.Generator(dev).manual_seed(0)
    size = 32 if dry else 256                       # uint8 images as the ImageNet loader gives them (256 px)
    raw = {"x_img": torch.randint(0, 256, (batch, task.arch.in_chans, size, size), dtype=torch.uint8, device=dev)}
    ready = task.make_inputs(raw, gen)

    def step(inputs=None):
        opt.zero_grad(set_to_none=True)
        batch_in = inputs if inputs is not None else task.make_inputs(raw, gen)
        with autocast(dev, cfg.amp): out = task.train_step(batch_in)
        out["loss"].backward()
        set_lr(opt, cfg, task.step); opt.step(); task.step += 1

    keep = (task.arch.num_patches - int(ready["mask"].sum(1)[0]) if algorithm == "mae"
            else int(ready["m1"].ids_keep.shape[1])) / task.arch.num_patches
    name = {"mae": "ssl_nb MAE step", "symmim": "ssl_nb SymMIM step"}[algorithm]
    for views, fn in ((False, lambda: step(ready)), (True, lambda: step())):
        ms = bench(fn, *((1, 2) if dry else (3, 10)))
        emit(impl=name, batch=batch, keep=keep, views=views, step_ms=ms, img_per_s=batch / ms * 1e3)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 2 iterations: checks the script runs")
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args(argv)
    import torch
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("mim_step.py times GPU steps: run it on a CUDA machine, or pass --dry-run.")
    rows, out = [], os.environ.get("OUT")
    device = "cpu (dry run)" if a.dry_run else torch.cuda.get_device_name()

    def emit(**kw):
        row = {"device": device, **kw}
        rows.append(row); print(json.dumps(row), flush=True)
        if out:
            with open(Path(out) / "mim_step.jsonl", "a") as f: f.write(json.dumps(row) + "\n")

    if a.dry_run: bench = cpu_bench
    else:
        ns = {"torch": torch}
        exec(anchor_sources()[0], ns)
        bench = ns["bench"]
    run_anchor(a.dry_run, bench, emit)
    batch = 4 if a.dry_run else a.batch
    for algorithm in ("mae", "symmim"): ssl_nb_steps(algorithm, a.dry_run, bench, emit, batch)
    print(f"\n{device}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}\n")
    print("| step | batch | kept | views in the step | ms | images/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['batch']} | {r['keep']:.2f} | {'yes' if r['views'] else 'no'} | {r['step_ms']:.1f} | "
              f"{r['img_per_s']:.0f} |")


if __name__ == "__main__":
    main()
