"""Train a grid of algorithms x label counts x seeds at one shared budget, then tabulate mean ± std over seeds.

    python benchmarks/grid.py --algorithms supervised fixmatch sequencematch --labels 40 250 --seeds 0 1 2 \
        --out runs/bench/ssl -- --num-iters 1000 --batch-size 32 --uratio 3

Everything after `--` is passed to every `ssl-nb fit` run (the shared budget). An algorithm written `NAME+epass`
trains NAME with the ensemble projector (`--num-projectors 3`); plain NAME of an algorithm that has projectors
trains the single-projector baseline (`--num-projectors 1`). Each run is a subprocess writing its own run folder
under --out; finished runs are skipped and interrupted ones resumed, so the command can be re-run after a stop.

Writes to --out: runs.csv (one row per run), table.md (mean ± std over seeds of best and last top-1, ECE, the
standard deviation and minimum of per-class accuracy; and, for every `BASE+variant` with its `BASE` in the grid, the
per-seed paired differences), plot.png, and budget.md (the command, the shared budget, machine and wall time; kept
as it is by --summarize-only).
"""
from __future__ import annotations

import argparse, dataclasses, json, os, platform, shlex, subprocess, sys, time
from pathlib import Path

def parse_spec(spec: str) -> tuple[str, list[str]]:
    "`simmatch+epass` -> ('simmatch', ['--num-projectors', '3']) (see `ssl_nb.epass.algorithm_spec`)."
    from ssl_nb.core import SSLNBError
    from ssl_nb.epass import algorithm_spec
    try: name, overrides = algorithm_spec(spec)
    except SSLNBError as e: sys.exit(f"grid.py: {e}")
    return name, [a for k, v in overrides.items() for a in ("--" + k.replace("_", "-"), str(v))]


def run_one(spec, labels, seed, out: Path, shared: list[str], threads: int) -> dict:
    name, flags = parse_spec(spec)
    run_dir = out / f"{spec}-{labels}-s{seed}"
    cmd = [sys.executable, "-m", "ssl_nb.cli", "fit", name, *flags, "--num-labels", str(labels), "--seed", str(seed),
           "--run-dir", str(run_dir), "--resume", "true", "--no-progress", *shared]
    asked, record = cmd[2:], run_dir / "grid_cmd.json"      # the run's own flags (not the interpreter's path)
    if record.exists() and json.loads(record.read_text()) != asked:
        sys.exit(f"grid.py: {run_dir} was trained with other flags ({shlex.join(json.loads(record.read_text()))}); "
                 f"use another --out for a different budget, or delete that run.")
    if (run_dir / "results.json").exists():
        print(f"[skip] {run_dir.name}: finished", flush=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True); record.write_text(json.dumps(asked))
        print(f"[run ] {run_dir.name}: {shlex.join(cmd[1:])}", flush=True)
        t0 = time.time()
        log = run_dir.with_suffix(".log")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(log, "a") as f: rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if rc: sys.exit(f"grid.py: {run_dir.name} failed (exit {rc}); see {log}. Re-run the same command to resume.")
        wall = time.time() - t0
        (run_dir / "wall.json").write_text(json.dumps({"wall_s": wall}))
        print(f"[done] {run_dir.name} in {wall:.0f} s", flush=True)
    return collect(run_dir, spec)


def collect(run_dir: Path, spec: str) -> dict:
    import torch
    res = json.loads((run_dir / "results.json").read_text())
    per_class = res.get("per_class")
    if per_class is None:     # older results.json: read the last evaluation from the checkpoint
        per_class = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)["history"][-1]["per_class"]
    from ssl_nb.report import per_class_spread
    spread = per_class_spread(per_class)
    wall = json.loads((run_dir / "wall.json").read_text())["wall_s"] if (run_dir / "wall.json").exists() else float("nan")
    return {"spec": spec, "algorithm": res["algorithm"], "num_labels": res["num_labels"], "seed": res["seed"],
            "steps": res["steps"], "best_top1": res["best_top1"], "last_top1": res["last_top1"], "last_ece": res["last_ece"],
            "class_std": spread["per_class_std"], "worst_class": spread["per_class_min"], "wall_s": wall,
            "run_dir": str(run_dir)}


def paired(df, order: list[str]):
    """Per-seed differences of every `BASE+variant` spec from its `BASE` spec (same labels and seed), or None when the
    grid has no such pair. Rows: (num_labels, 'variant − BASE'); columns: mean ± std (points) and count of seeds > 0."""
    import pandas as pd
    cols = {"last_top1": "top-1", "last_ece": "ECE", "class_std": "per-class std"}
    key = ["num_labels", "seed"]
    out = []
    for spec in order:
        base = spec.split("+")[0]
        if spec == base or base not in order: continue
        for n in sorted(df["num_labels"].unique()):
            a = df[(df["spec"] == spec) & (df["num_labels"] == n)].set_index(key)
            b = df[(df["spec"] == base) & (df["num_labels"] == n)].set_index(key)
            seeds = a.index.intersection(b.index)
            if len(seeds) == 0: continue
            row = {"num_labels": n, "pair": f"{spec} − {base}"}
            for c, name in cols.items():
                d = (a.loc[seeds, c] - b.loc[seeds, c]) * 100
                sd = f" ± {d.std(ddof=1):.2f}" if len(d) > 1 else ""
                row[f"Δ {name}"] = f"{d.mean():+.2f}{sd} ({int((d > 0).sum())}/{len(d)} > 0)"
            out.append(row)
    return pd.DataFrame(out).set_index(["num_labels", "pair"]) if out else None


def summarize(rows: list[dict], out: Path, order: list[str], argv: list[str], shared: list[str], t_total: float):
    import pandas as pd
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ssl_nb.report import markdown_table, mean_std
    df = pd.DataFrame(rows)
    df.to_csv(out / "runs.csv", index=False)
    cols = ("best_top1", "last_top1", "last_ece", "class_std", "worst_class")
    tab = mean_std(df, ["num_labels", "spec"], cols=cols)
    tab = tab.reindex(sorted(tab.index, key=lambda ix: (ix[0], order.index(ix[1]))))
    tab.columns = ["best top-1 %", "last top-1 %", "ECE % (last)", "per-class std %", "worst class %", "seeds"]
    cfg = json.loads((Path(rows[0]["run_dir"]) / "config.json").read_text())
    budget = {k: cfg[k] for k in ("dataset", "net", "num_iters", "batch_size", "uratio", "lr", "bn_momentum",
                                   "ema_decay", "ema_warmup", "eval_every", "eval_limit") if k in cfg}
    md = ["Mean ± std over seeds (ddof=1) of the EMA model's test top-1: the best over the evaluations and the last "
          "one; ECE (15 bins), the std and the minimum of the per-class accuracies are those of the last evaluation.",
          "", markdown_table(tab), ""]
    pairs = paired(df, order)
    if pairs is not None:
        md += ["Paired by seed (same labeled set): variant − baseline, in points, mean ± std over seeds, and in how "
               "many seeds the difference is > 0.", "", markdown_table(pairs), ""]
    md += [
          f"Budget per run: {json.dumps(budget)}; per-method defaults otherwise (see each run's config.json).",
          f"Command: `python {shlex.join(argv)}`"]
    (out / "table.md").write_text("\n".join(md) + "\n")
    if t_total > 0 or not (out / "budget.md").exists():     # --summarize-only keeps the training run's record
        (out / "budget.md").write_text("\n".join([
            f"command: python {shlex.join(argv)}", f"shared flags: {shlex.join(shared)}", f"budget: {json.dumps(budget)}",
            f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
            f"runs: {len(df)}, total wall time of the runs: {df['wall_s'].sum() / 3600:.2f} h "
            f"(this invocation: {t_total / 3600:.2f} h)", f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}"]) + "\n")
    labels = sorted(df["num_labels"].unique())
    fig, axs = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 3.4), squeeze=False)
    for ax, n in zip(axs[0], labels):
        g = df[df["num_labels"] == n].groupby("spec")["best_top1"]
        m, s = g.mean().reindex(order) * 100, g.std(ddof=1).reindex(order).fillna(0) * 100
        ax.bar(range(len(order)), m, yerr=s, capsize=3, color=[f"C{i}" for i in range(len(order))])
        ax.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(max(0, float((m - s).min()) - 10), min(100, float((m + s).max()) + 5))
        ax.set_title(f"{budget.get('dataset')}, {n} labels"); ax.set_ylabel("best test top-1 % (mean ± std)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(); fig.savefig(out / "plot.png", dpi=120)
    print((out / "table.md").read_text())


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithms", nargs="+", required=True)
    p.add_argument("--labels", nargs="+", type=int, required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", required=True)
    p.add_argument("--summarize-only", action="store_true",
                   help="tabulate the runs that have finished so far, start nothing")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time; each gets cpus/jobs threads (single-threaded runs do not fight over cores)")
    a = p.parse_args(own)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    for spec in a.algorithms: parse_spec(spec)          # fail early on a typo
    t0 = time.time()
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    grid = [(spec, labels, seed) for labels in a.labels for seed in a.seeds for spec in a.algorithms]
    if a.summarize_only:
        done = [g for g in grid if (out / f"{g[0]}-{g[1]}-s{g[2]}" / "results.json").exists()]
        print(f"{len(done)} of {len(grid)} runs finished")
        if not done: return
        return summarize([collect(out / f"{s}-{l}-s{r}", s) for s, l, r in done], out, a.algorithms,
                         [sys.argv[0], *argv], shared, 0.0)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda g: run_one(*g, out, shared, threads), grid))
    summarize(rows, out, a.algorithms, [sys.argv[0], *argv], shared, time.time() - t0)


if __name__ == "__main__":
    main()
