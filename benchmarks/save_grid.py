"""SAVE's ablations on the synthetic audio-visual scenes: one command, from data to table.

    python benchmarks/save_grid.py --out runs/bench/save --results benchmarks/results/save_synthetic

1. generates the synthetic set (`ssl_nb.avs.make_synthetic`: 1,500 training videos per subset, the default size's
   validation, test and negative-audio splits; ~2 min CPU) unless --data already holds it;
2. trains stage 1 once (`sam_stage1`: the small SAM, class-agnostic point/box prompts, no audio);
3. trains, at one shared budget on its frozen encoder, for each subset (S4-like single-source, MS3-like multi-source
   scenes) and seed: SAVE; SAVE with zeroed audio features; SAMA-AVS-style audio (encoder injection, empty sparse
   prompt); SAVE without image adapters;
4. tabulates, at each run's best validation mIoU (the checkpoint `best.pt` keeps), the test mIoU and F (AVSBench's
   metrics, one video at a time) and, on the negative-audio test splits (the same pictures with silence, noise, or
   the sound of a class that is not in the picture; every ground truth empty), the share of frames where the model
   still predicts a mask: mean ± std over seeds, per-seed paired differences, a plot, one CSV row per run.

Runs train with torch single-threaded (--threads): on a shared 2-core CPU that is several times faster than two
threads; --jobs N trains N stage-2 runs at once in worker processes. Finished runs are skipped and interrupted ones resumed, so the command can
be re-run after a stop; a finished run trained with another budget stops the grid (use another --out). --tiny runs
the whole pipeline on a tiny generated set with the tiny SAM in about a minute (the test suite does).

Writes to --out: runs.csv, table.md, plot.png, and budget.json (CPU and wall time of every run). With --results
PREFIX it also writes PREFIX.md (the tables, the command, the budget and the date), PREFIX.png and PREFIX_runs.csv;
text after a line `<!-- notes -->` in an existing PREFIX.md is kept.
"""
from __future__ import annotations

import argparse, json, os, platform, shlex, sys, time
from pathlib import Path

VARIANTS = {  # label -> (run-folder slug, SAVEConfig overrides)
    "SAVE": ("save", {}),
    "SAVE, zeroed audio": ("zero_audio", {"zero_audio": True}),
    "SAMA-style audio": ("sama", {"audio_mode": "sama"}),
    "SAVE, no image adapters": ("no_adapter", {"image_adapter": False}),
}
NEG = ("test_silence", "test_noise", "test_offscreen")
METRICS = ["test_miou", "test_fscore"] + [f"{s}_mask_rate" for s in NEG] + [f"{s}_fg_fraction" for s in NEG]
TINY_SIZE = {"s4": (4, 1, 1, 1), "ms3": (4, 1, 1, 1)}
# videos per split (train, val, test, each negative split): make_synthetic's "default" test splits with 5x (S4: 2.5x)
# its training videos. Measured: with 300 MS3 training videos SAVE memorises them (train IoU 0.78, val 0.23).
GRID_SIZE = {"s4": (1500, 60, 120, 60), "ms3": (1500, 40, 80, 40)}
BUDGET_KEYS = ("net", "img_size", "num_iters", "batch_size", "optimizer", "lr", "weight_decay", "schedule",
               "warmup_iters", "eval_every", "loss", "audio_encoder", "audio_width", "audio_hidden")


def has_dataset(root: Path) -> bool:
    return (root / "Single-source" / "s4_meta_data.csv").is_file() and (root / "Multi-sources" / "ms3_meta_data.csv").is_file()


def same_budget(run_dir: Path, cfg) -> None:
    "Stop if a finished run in `run_dir` was trained with another config (another budget needs another --out)."
    from ssl_nb.core import load_checkpoint
    saved = load_checkpoint(run_dir / "last.pt")["config"]          # the config the run trained with
    now = cfg.to_dict()
    differ = [k for k in now if k not in ("run_dir", "resume", "progress", "tensorboard", "device")
              and json.dumps(saved.get(k), default=str) != json.dumps(now[k], default=str)]
    if differ:
        sys.exit(f"save_grid.py: {run_dir} was trained with other settings ({', '.join(f'{k}: {saved.get(k)!r} vs {now[k]!r}' for k in differ[:4])}); "
                 f"use another --out for another budget, or delete that run.")


def fit_timed(algorithm: str, cfg_dict: dict, threads: int) -> dict:
    "Fit one run (in this process or a worker); its CPU and wall seconds."
    import torch
    torch.set_num_threads(threads)
    import ssl_nb.save                                         # registers sam_stage1 and save
    from ssl_nb.train import fit, make_config
    c, w = time.process_time(), time.time()
    fit(make_config(algorithm, **{k: v for k, v in cfg_dict.items() if k != "algorithm"}))
    return {"cpu_s": time.process_time() - c, "wall_s": time.time() - w}


def pending(cfg) -> bool:
    "Whether `cfg`'s run still has to train (a finished run must have been trained with the same config)."
    run_dir = Path(cfg.run_dir)
    if (run_dir / "results.json").is_file():
        same_budget(run_dir, cfg)
        print(f"[skip] {run_dir.name}: finished", flush=True)
        return False
    return True


def record(timing: dict, key: str, t: dict) -> None:
    prev = timing.get(key, {"cpu_s": 0.0, "wall_s": 0.0})              # a resumed run adds to its earlier part
    timing[key] = {"cpu_s": prev["cpu_s"] + t["cpu_s"], "wall_s": prev["wall_s"] + t["wall_s"]}
    print(f"[done] {key}: {timing[key]['cpu_s']:.0f} s CPU, {timing[key]['wall_s']:.0f} s wall", flush=True)


def collect(run_dir: Path, subset: str, variant: str, seed: int, timing: dict) -> dict:
    "The evaluation at the best validation mIoU (first of equals, as the engine keeps best.pt) and the last one."
    from ssl_nb.train import read_metrics
    evals = [r for r in read_metrics(run_dir, "eval")]
    best = max(evals, key=lambda r: (r["miou"], -r["step"]))
    last = evals[-1]
    t = timing.get(run_dir.name, {})
    return {"subset": subset, "variant": variant, "seed": seed, "best_step": best["step"], "val_miou": best["miou"],
            **{k: best[k] for k in METRICS}, "last_test_miou": last["test_miou"], "last_test_fscore": last["test_fscore"],
            "cpu_s": t.get("cpu_s", float("nan")), "wall_s": t.get("wall_s", float("nan")), "run_dir": str(run_dir)}


def paired(df, base: str = "SAVE"):
    "Per seed: SAVE minus each ablation, in points of test mIoU (and mask-rate points on silence), mean ± std, seeds > 0."
    import pandas as pd
    out = []
    for subset in df["subset"].unique():
        b = df[(df["subset"] == subset) & (df["variant"] == base)].set_index("seed")
        for v in VARIANTS:
            if v == base: continue
            a = df[(df["subset"] == subset) & (df["variant"] == v)].set_index("seed")
            seeds = b.index.intersection(a.index)
            if not len(seeds): continue
            row = {"subset": subset, "pair": f"{base} − {v}"}
            for col, name in (("test_miou", "Δ test mIoU"), ("test_fscore", "Δ test F"),
                              ("test_offscreen_mask_rate", "Δ off-screen mask rate")):
                d = (b.loc[seeds, col] - a.loc[seeds, col]) * 100
                sd = f" ± {d.std(ddof=1):.2f}" if len(d) > 1 else ""
                row[name] = f"{d.mean():+.2f}{sd} ({int((d > 0).sum())}/{len(d)} > 0)"
            out.append(row)
    return pd.DataFrame(out).set_index(["subset", "pair"]) if out else None


def summarize(rows: list[dict], out: Path, results: Path | None, argv: list[str], budget: dict, stage1: dict):
    import pandas as pd
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ssl_nb.report import markdown_table, mean_std
    df = pd.DataFrame(rows)
    order = {v: i for i, v in enumerate(VARIANTS)}
    subsets = [s for s in ("s4", "ms3") if s in set(df["subset"])]
    df = df.sort_values(["subset", "variant", "seed"], key=lambda c: c.map(order) if c.name == "variant" else
                        (c.map({s: i for i, s in enumerate(subsets)}) if c.name == "subset" else c))
    df.to_csv(out / "runs.csv", index=False)
    main_cols = ["test_miou", "test_fscore", "test_silence_mask_rate", "test_noise_mask_rate", "test_offscreen_mask_rate"]
    tab = mean_std(df, ["subset", "variant"], cols=main_cols)
    tab = tab.reindex(sorted(tab.index, key=lambda ix: (subsets.index(ix[0]), order[ix[1]])))
    tab.columns = ["test mIoU %", "test F %", "silence: mask rate %", "noise: mask rate %", "off-screen: mask rate %", "seeds"]
    fg = mean_std(df, ["subset", "variant"], cols=[f"{s}_fg_fraction" for s in NEG])
    fg = fg.reindex(tab.index)
    fg.columns = ["silence: predicted area %", "noise: predicted area %", "off-screen: predicted area %", "seeds"]
    pairs = paired(df)
    lines = ["Mean ± std over seeds (ddof=1), in %, at each run's best validation mIoU (the checkpoint `best.pt` keeps). "
             "Test mIoU and F: AVSBench's metrics on the test split, one video at a time. Mask rate: the share of "
             "frames of the negative-audio test splits (the test pictures with silence, with noise, or with the sound of "
             "a class not in the picture; every ground truth empty) where the model predicts at least one foreground "
             "pixel (AVSBench-Robust's visual bias).", "", markdown_table(tab), "",
             "Mean predicted area on the negative-audio splits (share of pixels predicted as foreground):", "",
             markdown_table(fg), ""]
    if pairs is not None:
        lines += ["Paired by seed (same stage-1 encoder, same data order): SAVE minus each ablation, in points, mean ± std "
                  "over seeds, and in how many seeds the difference is > 0.", "", markdown_table(pairs), ""]
    (out / "table.md").write_text("\n".join(lines) + "\n")

    fig, axs = plt.subplots(2, len(subsets), figsize=(5.2 * len(subsets), 7), squeeze=False)
    names = list(VARIANTS)
    for j, s in enumerate(subsets):
        d = df[df["subset"] == s]
        g = d.groupby("variant")
        x = range(len(names))
        m = g["test_miou"].mean().reindex(names) * 100; e = g["test_miou"].std(ddof=1).reindex(names).fillna(0) * 100
        f = g["test_fscore"].mean().reindex(names) * 100; fe = g["test_fscore"].std(ddof=1).reindex(names).fillna(0) * 100
        axs[0, j].bar([i - 0.2 for i in x], m, 0.4, yerr=e, capsize=3, label="mIoU")
        axs[0, j].bar([i + 0.2 for i in x], f, 0.4, yerr=fe, capsize=3, label="F")
        axs[0, j].set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        axs[0, j].set_title(f"{s}: test mIoU / F (%, mean ± std over seeds)", fontsize=9)
        axs[0, j].legend(fontsize=8, loc="lower right", framealpha=0.9)
        axs[0, j].grid(axis="y", alpha=0.3)
        for k, split in enumerate(NEG):
            mr = g[f"{split}_mask_rate"].mean().reindex(names) * 100
            axs[1, j].bar([i + (k - 1) * 0.27 for i in x], mr, 0.27, label=split.removeprefix("test_"))
        axs[1, j].set_xticks(list(x), names, rotation=20, ha="right", fontsize=8); axs[1, j].set_ylim(0, 105)
        axs[1, j].set_title(f"{s}: frames with a predicted mask, negative audio (%)", fontsize=9)
        axs[1, j].legend(fontsize=8, loc="lower right", framealpha=0.9); axs[1, j].grid(axis="y", alpha=0.3)
    fig.tight_layout(); fig.savefig(out / "plot.png", dpi=110)

    cpu_h = sum(v["cpu_s"] for v in budget["timing"].values()) / 3600
    wall_h = sum(v["wall_s"] for v in budget["timing"].values()) / 3600
    header = [
        "# SAVE on the synthetic audio-visual scenes: ablations", "",
        f"Command: `python {shlex.join(argv)}`", "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}. Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch "
        f"threads {budget['threads']}. Runs: {len(df)} + stage 1; CPU time of all runs {cpu_h:.2f} h, wall {wall_h:.2f} h "
        f"(several jobs shared the CPU).", "",
        f"Data: {budget['data']} ({budget['data_size']}). Stage 1 ({stage1['config']}): prompted validation mIoU "
        f"{stage1['miou']:.3f} (one point {stage1['miou_point']:.3f}, exact box {stage1['miou_box']:.3f}).", "",
        f"Stage-2 budget, the same for every run: {json.dumps(budget['save'])}.", ""]
    md = "\n".join(header) + (out / "table.md").read_text()
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        md_path = results.with_suffix(".md")
        notes = ""
        if md_path.is_file() and "<!-- notes -->" in md_path.read_text():
            notes = "\n<!-- notes -->" + md_path.read_text().split("<!-- notes -->", 1)[1]
        md += f"\n![plot]({results.name}.png)\n" + notes
        md_path.write_text(md)
        fig.savefig(results.with_suffix(".png"), dpi=110)
        df.to_csv(results.parent / f"{results.name}_runs.csv", index=False)
    print(md)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the runs and summaries")
    p.add_argument("--results", default=None, help="also write PREFIX.md, PREFIX.png, PREFIX_runs.csv")
    p.add_argument("--data", default="data/avs_synthetic_grid",
                   help=f"synthetic set (generated here when missing, videos per split {GRID_SIZE})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--subsets", nargs="+", default=["s4", "ms3"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of: {', '.join(VARIANTS)}")
    p.add_argument("--stage1-iters", type=int, default=1500)
    p.add_argument("--iters", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="stage 2 lr (default: SAVEConfig's)")
    p.add_argument("--evals", type=int, default=2, help="evaluations per stage-2 run (the best one by val mIoU counts)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="stage-2 runs trained at once (worker processes)")
    p.add_argument("--tiny", action="store_true", help="tiny set and tiny SAM, 2 steps per run: a pipeline check")
    p.add_argument("--summarize-only", action="store_true", help="tabulate the finished runs, train nothing")
    a = p.parse_args(argv)

    import torch
    torch.set_num_threads(a.threads)
    from ssl_nb.avs import make_synthetic, torch_threads
    from ssl_nb.core import resolve_run_dir
    from ssl_nb.save import SAVEConfig                      # registers sam_stage1 and save
    from ssl_nb.train import make_config, read_metrics

    out = resolve_run_dir(a.out); out.mkdir(parents=True, exist_ok=True)
    data = resolve_run_dir(a.data) if not a.tiny else out / "data"
    size, model = (GRID_SIZE, {}) if not a.tiny else (TINY_SIZE, dict(net="tiny", img_size=64, audio_width=32, audio_hidden=32))
    if a.tiny: a.stage1_iters, a.iters, a.batch_size, a.seeds = 2, 2, 4, a.seeds[:1]
    if not has_dataset(data):
        if a.summarize_only: sys.exit(f"save_grid.py: no dataset at {data}")
        print(f"generating the synthetic set ({size}) in {data}", flush=True)
        with torch_threads(a.threads): print(make_synthetic(data, size, image_size=64 if a.tiny else 128), flush=True)
    meta = json.loads((data / "Multi-sources" / "synthetic_meta.json").read_text())
    s4meta = json.loads((data / "Single-source" / "synthetic_meta.json").read_text())
    if [s4meta["size"], meta["size"]] != [list(size["s4"]), list(size["ms3"])]:
        sys.exit(f"save_grid.py: {data} holds a synthetic set of another size (S4 {s4meta['size']}, MS3 {meta['size']}; "
                 f"the grid's is {size}): pass another --data, or delete that folder.")
    data_size = f"S4 videos train/val/test/each negative {s4meta['size']}, MS3 {meta['size']}, {meta['image_size']} px, seed {meta['seed']}"
    timing_file = out / "budget.json"
    timing = json.loads(timing_file.read_text())["timing"] if timing_file.is_file() else {}
    common = dict(data_root=str(data), batch_size=a.batch_size, progress=False, tensorboard=False, resume=True,
                  device="cpu", **{k: v for k, v in model.items() if k in ("net", "img_size")})
    if a.tiny: common |= dict(warmup_iters=0, eval_batch_size=16)

    def save_timing(extra=None):
        budget = {"threads": a.threads, "data": str(data), "data_size": data_size, "timing": timing, **(extra or {})}
        timing_file.write_text(json.dumps(budget, indent=1)); return budget

    s1cfg = make_config("sam_stage1", **common, num_iters=a.stage1_iters, eval_every=max(1, a.stage1_iters // 5),
                        ckpt_every=max(1, a.stage1_iters // 5), run_dir=str(out / "stage1"))
    if not a.summarize_only and pending(s1cfg):
        print("[run ] stage1", flush=True); record(timing, "stage1", fit_timed("sam_stage1", s1cfg.to_dict(), a.threads))
        save_timing()
    s1_eval = read_metrics(out / "stage1", "eval")
    s1_best = max(s1_eval, key=lambda r: (r["miou"], -r["step"]))
    stage1 = {"config": f"{s1cfg.net} at {s1cfg.img_size} px, {s1cfg.num_iters} steps of batch {s1cfg.batch_size}, "
                        f"{s1cfg.stage1_subsets}", **{k: s1_best[k] for k in ("miou", "miou_point", "miou_box")}}

    every = max(1, a.iters // a.evals)
    extra = {k: v for k, v in model.items() if k not in ("net", "img_size")} | ({"lr": a.lr} if a.lr else {})
    grid = []
    for subset in a.subsets:
        for variant in a.variants:
            slug, over = VARIANTS[variant]
            for seed in a.seeds:
                run_dir = out / f"{subset}-{slug}-s{seed}"
                grid.append((subset, variant, seed, make_config(
                    "save", **common, **extra, **over, subset=subset, seed=seed, num_iters=a.iters, eval_every=every,
                    ckpt_every=every, sam_checkpoint=str(out / "stage1" / "best.pt"), run_dir=str(run_dir))))
    todo = [cfg for *_, cfg in grid if not a.summarize_only and pending(cfg)]
    if a.jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as ex:
            futures = {}
            for cfg in todo:
                print(f"[run ] {Path(cfg.run_dir).name}", flush=True)
                futures[ex.submit(fit_timed, "save", cfg.to_dict(), a.threads)] = cfg
            for f in as_completed(futures):
                record(timing, Path(futures[f].run_dir).name, f.result()); save_timing()
    else:
        for cfg in todo:
            print(f"[run ] {Path(cfg.run_dir).name}", flush=True)
            record(timing, Path(cfg.run_dir).name, fit_timed("save", cfg.to_dict(), a.threads)); save_timing()
    rows = [collect(Path(cfg.run_dir), subset, variant, seed, timing) for subset, variant, seed, cfg in grid
            if (Path(cfg.run_dir) / "results.json").is_file()]
    cfg = grid[-1][3]
    if not rows: sys.exit("save_grid.py: no finished runs to tabulate yet")
    budget = save_timing({"save": {k: getattr(cfg, k) for k in BUDGET_KEYS}})
    results = resolve_run_dir(a.results) if a.results else None
    summarize(rows, out, results, ["benchmarks/save_grid.py", *argv], budget, stage1)


if __name__ == "__main__":
    main()
