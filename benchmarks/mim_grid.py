"""SymMIM against MAE's swept mask ratios and SimMIM on Fashion-MNIST, at one step budget, over seeds.

    python benchmarks/mim_grid.py --out runs/bench/mim --seeds 0 1 2 --num-iters 1200 \
        --results benchmarks/results/mim_fashion_mnist

Pre-trains, for every seed, SymMIM (its defaults: fixed 50% checkerboards), MAE at mask ratios 0.5, 0.75 and 0.9 and
SimMIM at 0.6 (and, as an ablation, SymMIM with λ = 0: its fine-checkerboard reconstruction without the
contrastive loss), all on the micro ViT of the embedded default with the same optimiser, schedule, augmentation, batch
and number of steps (the MIM base of `ssl_nb.mae`), evaluating the k-NN top-1 of the frozen encoder every
--eval-every steps; then probes each final encoder with the engine's linear probe. The baseline is the same encoder at
its initial weights (for a seed, every method starts from the same encoder weights), scored the same way.

Runs go under --out (one folder per method and seed, the probe inside it); finished runs are skipped and interrupted
ones resumed, so the command can be re-run after a stop. Writes to --out: runs.csv (one row per run), knn_curves.csv
(every k-NN evaluation), table.md (mean ± std over seeds and per-seed differences of SymMIM from each MAE ratio),
knn.png (k-NN top-1 over training) and budget.md. With --results PREFIX also PREFIX.md (the table, the command, the
budget; a section after the line `<!-- hand-written -->` in an existing PREFIX.md is kept), PREFIX.png and
PREFIX_runs.csv. --tiny runs the whole pipeline in seconds (for the tests).
"""
from __future__ import annotations

import argparse, json, os, platform, shlex, sys, time
from pathlib import Path

SPECS = {  # label -> (algorithm, method settings); "random init" is the untrained encoder
    "SymMIM": ("symmim", {}),
    "SymMIM λ=0": ("symmim", {"con_weight": 0.0}),   # ablation: the fine checkerboard's reconstruction alone
    "MAE 0.5": ("mae", {"mask_ratio": 0.5}),
    "MAE 0.75": ("mae", {"mask_ratio": 0.75}),
    "MAE 0.9": ("mae", {"mask_ratio": 0.9}),
    "SimMIM 0.6": ("simmim", {"mask_ratio": 0.6}),
    "random init": ("mae", {}),
}
MAE_LABELS = ["MAE 0.5", "MAE 0.75", "MAE 0.9"]
MARK = "<!-- hand-written -->"


def slug(label: str) -> str: return label.lower().replace(" ", "_").replace(".", "").replace("λ=", "lambda")


def shared_settings(a) -> dict:
    "The budget every pre-training run shares."
    return dict(num_iters=a.num_iters, batch_size=a.batch_size, lr=a.lr, warmup_iters=a.warmup_iters,
                eval_every=a.eval_every, ckpt_every=a.eval_every, knn_labels=a.knn_labels, eval_limit=a.eval_limit,
                device="cpu", progress=False, tensorboard=False, log_every=max(1, min(50, a.eval_every)))


def _finished(run_dir: Path) -> dict | None:
    "results.json of a finished run (None while it is not)."
    p = run_dir / "results.json"
    return json.loads(p.read_text()) if p.exists() else None


def run_one(label: str, seed: int, out: Path, a) -> dict:
    "Pre-train (or build the untrained encoder), score its k-NN top-1, train its linear probe; returns the run's row."
    import torch
    from ssl_nb.train import fit, make_config
    from ssl_nb.classify import load_source_task
    from ssl_nb.mae import initial_checkpoint, probe_config
    algo, kw = SPECS[label]
    run_dir = out / f"{slug(label)}-s{seed}"
    cfg = make_config(algo, **shared_settings(a), **kw, seed=seed, run_dir=str(run_dir), resume=True)
    record = run_dir / "grid_cfg.json"
    if record.exists() and json.loads(record.read_text()) != json.loads(json.dumps(cfg.to_dict())):
        sys.exit(f"mim_grid.py: {run_dir} was trained with other settings; use another --out for another budget.")
    run_dir.mkdir(parents=True, exist_ok=True); record.write_text(json.dumps(cfg.to_dict()))
    t0, c0 = time.time(), time.process_time()
    if label == "random init":
        source = run_dir / "init.pt"
        if not (run_dir / "knn.json").exists():
            task = load_source_task(initial_checkpoint(cfg, source))
            (run_dir / "knn.json").write_text(json.dumps(task.evaluate(task.model)))
        knn = json.loads((run_dir / "knn.json").read_text())["knn_top1"]
        row = {"knn_top1": knn, "best_knn_top1": knn, "steps": 0}
    else:
        source = run_dir / "last.pt"
        res = _finished(run_dir)
        if res is None:
            print(f"[run ] {run_dir.name}", flush=True)
            res = fit(cfg).summary()
        row = {"knn_top1": res["last_knn_top1"], "best_knn_top1": res["best_knn_top1"], "steps": res["steps"]}
    probe = _finished(run_dir / "probe") or fit(probe_config(
        source, run_dir / "probe", a.probe_labels, a.probe_iters, eval_limit=a.eval_limit, seed=seed, device="cpu",
        progress=False, tensorboard=False, resume=True)).summary()
    cost_file = run_dir / "cost.json"
    if not cost_file.exists():                  # the pass that trained; a re-run only reads
        cost_file.write_text(json.dumps({"cpu_s": time.process_time() - c0, "wall_s": time.time() - t0,
                                         "threads": torch.get_num_threads()}))
    cost = json.loads(cost_file.read_text())
    print(f"[done] {run_dir.name}: k-NN {row['knn_top1']:.4f}, probe {probe['last_top1']:.4f}, "
          f"{cost['cpu_s']:.0f} s CPU", flush=True)
    return {"label": label, "algorithm": algo, "seed": seed, **row, "probe_top1": probe["last_top1"], **cost,
            "run_dir": str(run_dir)}


def paired(df, order) -> list[dict]:
    "Per-seed differences SymMIM − X (points) for X in MAE's ratios, SimMIM and the untrained encoder."
    sym = df[df.label == "SymMIM"].set_index("seed")
    rows = []
    for other in [l for l in order if l != "SymMIM"]:
        o = df[df.label == other].set_index("seed")
        seeds = sym.index.intersection(o.index)
        if not len(seeds): continue
        row = {"pair": f"SymMIM − {other}"}
        for col, name in (("knn_top1", "Δ k-NN"), ("probe_top1", "Δ probe")):
            d = (sym.loc[seeds, col] - o.loc[seeds, col]) * 100
            sd = f" ± {d.std(ddof=1):.2f}" if len(d) > 1 else ""
            row[name] = f"{d.mean():+.2f}{sd} ({int((d >= 0).sum())}/{len(d)} ≥ 0)"
        rows.append(row)
    return rows


def summarize(rows: list[dict], out: Path, a, argv: list[str], results: str | None):
    import pandas as pd
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ssl_nb.report import markdown_table, mean_std
    order = [l for l in SPECS if any(r["label"] == l for r in rows)]
    df = pd.DataFrame(rows)
    df.to_csv(out / "runs.csv", index=False)
    tab = mean_std(df, ["label"], cols=("knn_top1", "best_knn_top1", "probe_top1")).reindex(order)
    tab.columns = ["k-NN top-1 % (last)", "k-NN top-1 % (best)", "linear probe top-1 % (last)", "seeds"]
    means = df.groupby("label")[["knn_top1", "probe_top1"]].mean()
    best_mae = {c: means.loc[[l for l in MAE_LABELS if l in means.index], c].idxmax()
                for c in ("knn_top1", "probe_top1")} if any(l in means.index for l in MAE_LABELS) else {}
    pairs = pd.DataFrame(paired(df, order))
    cfg = json.loads((Path(rows[0]["run_dir"]) / "grid_cfg.json").read_text())
    budget = {k: cfg[k] for k in ("dataset", "net", "num_iters", "batch_size", "optimizer", "lr", "betas",
                                   "weight_decay", "schedule", "warmup_iters", "crop_scale", "pool", "eval_every",
                                   "knn_labels", "knn_k", "knn_T", "eval_limit")}
    probe_cfg = json.loads((Path(rows[0]["run_dir"]) / "probe" / "config.json").read_text())
    probe = {k: probe_cfg[k] for k in ("num_labels", "num_iters", "batch_size", "lr", "optimizer", "schedule",
                                        "feature_norm", "eval_limit")}
    cpu_h, wall_h = df["cpu_s"].sum() / 3600, df["wall_s"].sum() / 3600
    lines = [
        "Mean ± std over seeds (ddof=1). k-NN: top-1 of the weighted 20-NN vote (T = 0.07) of the frozen encoder's "
        f"CLS features, a bank of {budget['knn_labels']} labeled training images (class-balanced, the same for every "
        f"run) against the first {budget['eval_limit']} test images; last = after the last step, best = the best of the "
        "evaluations during training. Linear probe: the engine's `linear_probe` (BatchNorm without affine + linear "
        "layer on the frozen CLS features) on the same test images. 'random init' is the encoder every run of that "
        "seed starts from, untrained.", "", markdown_table(tab), ""]
    if best_mae:
        lines += [f"Best swept MAE ratio by mean k-NN: **{best_mae['knn_top1']}**; by mean linear probe: "
                  f"**{best_mae['probe_top1']}**.", ""]
    if len(pairs):
        lines += ["Paired by seed (same initial encoder, same data order): SymMIM − X in points, mean ± std over "
                  "seeds, and in how many seeds SymMIM is at least as good.", "",
                  markdown_table(pairs.set_index("pair")), ""]
    lines += [f"Pre-training budget per run (every method): `{json.dumps(budget)}`.",
              f"Linear probe: `{json.dumps(probe)}`.",
              f"Cost: {len(df)} runs, {cpu_h:.2f} h of CPU time ({int(df['threads'].max())} thread(s) per run), "
              f"{wall_h:.2f} h wall, on {platform.platform()} with {os.cpu_count()} CPUs shared with other jobs.",
              f"Command: `python {shlex.join(argv)}`", f"Date: {time.strftime('%Y-%m-%d')}."]
    table_md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table_md)
    (out / "budget.md").write_text("\n".join(lines[-4:]) + "\n")
    # k-NN over training: mean ± std over seeds per method, the untrained encoder as a line
    from ssl_nb.mae import knn_curve
    curves = pd.DataFrame([{"label": r["label"], "seed": r["seed"], "step": st, "knn_top1": v} for r in rows
                           if r["label"] != "random init" for st, v in zip(*knn_curve(r["run_dir"]))])
    curves.to_csv(out / "knn_curves.csv", index=False)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, label in enumerate(l for l in order if l != "random init"):
        g = curves[curves.label == label].groupby("step")["knn_top1"]
        m, s = g.mean() * 100, g.std(ddof=1).fillna(0) * 100
        ax.plot(m.index, m.values, marker="o", ms=3, color=f"C{i}", label=label)
        ax.fill_between(m.index, m - s, m + s, color=f"C{i}", alpha=0.15)
    if "random init" in order:
        ax.axhline(100 * df[df.label == "random init"]["knn_top1"].mean(), color="gray", ls="--", label="random init")
    ax.set_xlabel("pre-training step"); ax.set_ylabel("k-NN top-1 % (test)")
    ax.set_title(f"Fashion-MNIST, {budget['net']}, batch {budget['batch_size']}: mean ± std over "
                 f"{df.seed.nunique()} seed(s)", fontsize=9)
    ax.grid(alpha=0.3); ax.legend(fontsize=8)
    fig.tight_layout(); fig.savefig(out / "knn.png", dpi=120)
    if results:
        res = Path(results); res.parent.mkdir(parents=True, exist_ok=True)
        old = res.with_suffix(".md").read_text() if res.with_suffix(".md").exists() else ""
        kept = old[old.index(MARK):] if MARK in old else f"{MARK}\n"
        res.with_suffix(".md").write_text("# MIM on Fashion-MNIST: SymMIM vs MAE's mask ratios and SimMIM\n\n"
                                          f"![k-NN top-1 over training]({res.name}.png)\n\n" + table_md + "\n" + kept)
        fig.savefig(res.with_suffix(".png"), dpi=120)
        df.to_csv(res.parent / f"{res.name}_runs.csv", index=False)
    print(table_md)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/mim")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS), metavar="LABEL")
    p.add_argument("--num-iters", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup-iters", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--knn-labels", type=int, default=2000)
    p.add_argument("--eval-limit", type=int, default=2000)
    p.add_argument("--probe-labels", type=int, default=10000)
    p.add_argument("--probe-iters", type=int, default=500)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the grid's process")
    p.add_argument("--results", default=None, help="also write PREFIX.md, PREFIX.png and PREFIX_runs.csv")
    p.add_argument("--summarize-only", action="store_true", help="tabulate the finished runs, train nothing")
    p.add_argument("--tiny", action="store_true", help="seconds-long settings for the tests (seed 0, 2 steps)")
    a = p.parse_args(argv)
    if a.tiny:
        a.seeds, a.num_iters, a.batch_size, a.warmup_iters, a.eval_every = [0], 2, 8, 1, 1
        a.knn_labels, a.eval_limit, a.probe_labels, a.probe_iters = 20, 20, 20, 2
    import torch
    torch.set_num_threads(a.threads)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    grid = [(label, seed) for seed in a.seeds for label in a.specs]
    if a.summarize_only:
        grid = [(l, s) for l, s in grid if (out / f"{slug(l)}-s{s}" / "probe" / "results.json").exists()]
        print(f"{len(grid)} runs finished")
        if not grid: return
    rows = [run_one(label, seed, out, a) for label, seed in grid]
    summarize(rows, out, a, [sys.argv[0], *argv], a.results)


if __name__ == "__main__":
    main()
