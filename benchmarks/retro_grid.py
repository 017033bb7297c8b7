"""Issue 15's evidence: a MoCo-v2 teacher, then one student trained alone (MoCo v2), with DisCo and with Retro at the
same step budget, over seeds, on Fashion-MNIST; k-NN and linear-probe top-1 (mean ± std), parameters.

    python benchmarks/retro_grid.py --out runs/retro/grid            # the grid of benchmarks/results/retro_fashion_mnist.md
    python benchmarks/retro_grid.py --tiny --out /tmp/retro_tiny     # seconds: digits, 2 steps (the pytest check)

1. The teacher `cifar_resnet18_w32` (ResNet-18 at half width) is pre-trained with `mocov2` (seed 0), then probed.
2. For every seed, the student `cifar_resnet10_w16` (one block per stage, quarter width) is trained for the same
   `--student-iters` steps with `mocov2` (alone), `disco` and `retro` (both distilling the teacher of step 1), each
   then probed linearly as `main_lincls.py` does (`ssl_nb.mocov2.lincls_config`: two trainable tensors).
3. The k-NN top-1 of the untrained student (same seeds) is measured once, as the floor.

Runs are in-process and single-threaded (`--threads`); a finished run (its results.json) is read back, an
interrupted one resumed, so the command can be re-run after a stop. Writes to --out: runs.jsonl / runs.csv (one row
per run, CPU seconds included), table.md, plot.png; and the report --results (default
benchmarks/results/retro_fashion_mnist.md) with its plot and CSV beside it.
"""
from __future__ import annotations

import argparse, json, os, platform, shlex, shutil, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("mocov2", "disco", "retro")
LABELS = {"teacher": "teacher (cifar_resnet18_w32, MoCo v2)", "mocov2": "student alone (MoCo v2)",
          "disco": "student + DisCo", "retro": "student + Retro", "init": "student at initialisation"}


def budget(a) -> dict:
    "The settings shared by every run of the grid (per-method defaults otherwise)."
    if a.tiny:
        return dict(dataset="digits", batch_size=16, K=64, knn_bank=None, eval_limit=64, teacher_iters=2,
                    student_iters=2, probe_iters=2, probe_labels=None)
    return dict(dataset="fashion_mnist", batch_size=a.batch_size, K=a.K, knn_bank=a.knn_bank, eval_limit=None,
                teacher_iters=a.teacher_iters, student_iters=a.student_iters, probe_iters=a.probe_iters,
                probe_labels=None)


def run(cfg_fn, run_dir: Path) -> tuple[dict, float]:
    "Fit (or read back) one run; its results.json and the process CPU seconds it took (recorded in cost.json)."
    from ssl_nb.train import fit
    res_path, cost_path = run_dir / "results.json", run_dir / "cost.json"
    if res_path.exists() and cost_path.exists():
        print(f"[skip] {run_dir.name}: finished", flush=True)
        return json.loads(res_path.read_text()), json.loads(cost_path.read_text())["cpu_s"]
    print(f"[run ] {run_dir}", flush=True)
    t0, w0 = time.process_time(), time.time()
    prior = json.loads(cost_path.read_text())["cpu_s"] if cost_path.exists() else 0.0
    cost_path.parent.mkdir(parents=True, exist_ok=True)
    cost_path.write_text(json.dumps({"cpu_s": prior, "partial": True}))
    fit(cfg_fn())
    cpu = prior + time.process_time() - t0
    cost_path.write_text(json.dumps({"cpu_s": cpu, "wall_s": time.time() - w0}))
    print(f"[done] {run_dir.name}: {cpu:.0f} CPU s", flush=True)
    return json.loads(res_path.read_text()), cpu


def params(run_dir: Path) -> dict:
    p = json.loads((run_dir / "config.json").read_text())["params"]
    return {"trainable_params": p["trainable"], "total_params": p["model"],
            "deployed_params": p.get("deployed", p.get("trunk")), "adapter_params": p.get("adapter", 0)}


def init_knn(b: dict, seed: int) -> float:
    "k-NN top-1 of the untrained student (the same construction as the runs of `seed`)."
    from ssl_nb.core import ALGORITHMS, seed_everything
    from ssl_nb.train import make_config
    cfg = make_config("mocov2", net="cifar_resnet10_w16", seed=seed, device="cpu", **common(b))
    seed_everything(seed)
    task = ALGORITHMS.get("mocov2").from_config(cfg)
    return task.evaluate(task.model)["knn_top1"]


def common(b: dict) -> dict:
    return dict(dataset=b["dataset"], batch_size=b["batch_size"], K=b["K"], knn_bank=b["knn_bank"],
                eval_limit=b["eval_limit"], progress=False, tensorboard=False, resume=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "retro_fashion_mnist.md"))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="student seeds (default 0 1 2; --tiny: 0)")
    p.add_argument("--teacher-iters", type=int, default=4000)
    p.add_argument("--student-iters", type=int, default=800)
    p.add_argument("--probe-iters", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--knn-bank", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="digits, 2 steps per run, one seed: a check, not a result")
    p.add_argument("--summarize-only", action="store_true", help="tabulate the finished runs, train nothing")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from ssl_nb.train import make_config
    from ssl_nb.mocov2 import lincls_config
    b, out = budget(a), Path(a.out).resolve()
    seeds = a.seeds if a.seeds is not None else ([0] if a.tiny else [0, 1, 2])
    out.mkdir(parents=True, exist_ok=True)
    every = lambda n: max(1, n // 2)
    probe = lambda src, d, seed: lambda: lincls_config(
        src, num_iters=b["probe_iters"], eval_every=every(b["probe_iters"]), ckpt_every=b["probe_iters"],
        num_labels=b["probe_labels"], eval_limit=b["eval_limit"], seed=seed, device="cpu", progress=False,
        tensorboard=False, resume=True, run_dir=str(d))
    jobs = [("teacher", 0, lambda: make_config("mocov2", net="cifar_resnet18_w32", seed=0, device="cpu", **common(b),
                                                num_iters=b["teacher_iters"], eval_every=every(b["teacher_iters"]),
                                                ckpt_every=every(b["teacher_iters"]), run_dir=str(out / "teacher")),
             out / "teacher")]
    teacher = str(out / "teacher" / "last.pt")
    for seed in seeds:
        for m in METHODS:
            extra = {"teacher": teacher} if m != "mocov2" else {}
            d = out / f"{m}-s{seed}"
            jobs.append((m, seed, (lambda m=m, d=d, seed=seed, extra=extra: make_config(
                m, net="cifar_resnet10_w16", seed=seed, device="cpu", **common(b), **extra,
                num_iters=b["student_iters"], eval_every=every(b["student_iters"]),
                ckpt_every=every(b["student_iters"]), run_dir=str(d))), d))
    t_start, rows = time.time(), []
    for method, seed, cfg_fn, d in jobs:
        if a.summarize_only and not (d / "lincls" / "results.json").exists(): continue
        res, cpu = run(cfg_fn, d)
        pres, pcpu = run(probe(d / "last.pt", d / "lincls", seed), d / "lincls")
        rows.append({"method": method, "seed": seed, "knn_best": res["best_knn_top1"], "knn_last": res["last_knn_top1"],
                     "probe_best": pres["best_top1"], "probe_last": pres["last_top1"],
                     "cos_teacher": res.get("last_cos_teacher"), **params(d), "steps": res["steps"],
                     "cpu_s": cpu + pcpu, "run_dir": str(d)})
    init_path = out / "init_knn.json"
    init = json.loads(init_path.read_text()) if init_path.exists() else {}
    if not a.summarize_only:
        for seed in seeds:
            if str(seed) not in init:
                t0 = time.process_time()
                init[str(seed)] = {"knn": init_knn(b, seed), "cpu_s": time.process_time() - t0}
        init_path.write_text(json.dumps(init))
    rows += [{"method": "init", "seed": int(s), "knn_best": v["knn"], "knn_last": v["knn"], "cpu_s": v["cpu_s"]}
             for s, v in init.items() if int(s) in seeds]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summarize(rows, out, Path(a.results), b, [sys.argv[0] if argv is None else "benchmarks/retro_grid.py", *argv],
              time.time() - t_start, a.tiny)


def summarize(rows: list[dict], out: Path, results: Path, b: dict, argv: list[str], wall: float, tiny: bool):
    import pandas as pd
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ssl_nb.report import markdown_table
    df = pd.DataFrame(rows)
    df.drop(columns=["run_dir"], errors="ignore").to_csv(out / "runs.csv", index=False)
    order = [m for m in ("teacher", "init", "mocov2", "disco", "retro") if m in set(df["method"])]
    pm = lambda s: "–" if s.isna().all() else (f"{100 * s.mean():.2f} ± {100 * s.std(ddof=1):.2f}" if s.count() > 1
                                               else f"{100 * s.mean():.2f}")
    tab = []
    for m in order:
        g = df[df["method"] == m]
        row = {"run": LABELS[m], "seeds": len(g), "k-NN best %": pm(g["knn_best"]), "k-NN last %": pm(g["knn_last"]),
               "probe best %": pm(g.get("probe_best", pd.Series(dtype=float))),
               "probe last %": pm(g.get("probe_last", pd.Series(dtype=float)))}
        if "trainable_params" in g and g["trainable_params"].notna().any():
            f = g.iloc[0]
            row.update({"trainable params": f"{int(f['trainable_params']):,}", "total params": f"{int(f['total_params']):,}",
                        "probed params": f"{int(f['deployed_params']):,}",
                        "adapter params": f"{int(f['adapter_params']):,}" if f["adapter_params"] else "–"})
        tab.append(row)
    tab = pd.DataFrame(tab).set_index("run").fillna("–")
    pairs = []
    for a_, b_ in (("retro", "disco"), ("disco", "mocov2"), ("retro", "mocov2")):
        A, B = df[df["method"] == a_].set_index("seed"), df[df["method"] == b_].set_index("seed")
        seeds = A.index.intersection(B.index)
        if not len(seeds): continue
        r = {"pair": f"{a_} − {b_}"}
        for c, name in (("knn_last", "Δ k-NN last"), ("probe_last", "Δ probe last"), ("probe_best", "Δ probe best")):
            d = (A.loc[seeds, c] - B.loc[seeds, c]) * 100
            r[name] = f"{d.mean():+.2f}" + (f" ± {d.std(ddof=1):.2f}" if len(d) > 1 else "") + f" ({int((d > 0).sum())}/{len(d)} > 0)"
        pairs.append(r)
    pairs = pd.DataFrame(pairs).set_index("pair") if pairs else None
    total_cpu = df["cpu_s"].sum()
    means = df.groupby("method")[["knn_last", "probe_last"]].mean()
    verdict = []
    for c, name in (("knn_last", "k-NN top-1 (last)"), ("probe_last", "linear-probe top-1 (last)")):
        if {"retro", "disco", "mocov2"} <= set(means.index):
            r, d, s = (means.loc[k, c] for k in ("retro", "disco", "mocov2"))
            holds = r >= d >= s
            verdict.append(f"- {name}: Retro {100 * r:.2f}, DisCo {100 * d:.2f}, alone {100 * s:.2f} (means): the order "
                           f"Retro ≥ DisCo ≥ alone {'holds' if holds else 'does not hold'} at this budget.")
    cmd = "python " + shlex.join(argv)
    table_md = [f"Mean ± std over seeds (ddof=1) of test top-1 on {b['dataset']}'s test images"
                f"{'' if b['eval_limit'] is None else ' (the first ' + str(b['eval_limit']) + ')'}. k-NN: 20 "
                f"neighbours among {b['knn_bank'] or 'all the'} class-balanced training images, cosine, τ 0.07, on the pooled features "
                "(Retro: backbone + adapter), best over the run's evaluations and last. Probe: `main_lincls.py`'s "
                "linear evaluation (one Linear on the frozen pooled features, two trainable tensors), best and last "
                "of its evaluations. Parameters: trainable in pre-training, total of the pre-training model (Retro: "
                "with the teacher's frozen head), probed (what linear evaluation keeps), and Retro's adapter.", "",
                markdown_table(tab), ""]
    if pairs is not None:
        table_md += ["Paired by seed (same initialisation and data order), in points: mean ± std and in how many seeds "
                     "the difference is > 0.", "", markdown_table(pairs), ""]
    (out / "table.md").write_text("\n".join(table_md) + "\n")
    # plot: bars of k-NN and probe (last) per method, the teacher as a line; cos(student, teacher) per seed
    fig, axs = plt.subplots(1, 3, figsize=(16, 3.6))
    studs = [m for m in ("init", "mocov2", "disco", "retro") if m in set(df["method"])]
    for ax, c, title in ((axs[0], "knn_last", "k-NN top-1 (last)"), (axs[1], "probe_last", "linear probe top-1 (last)")):
        g = df[df["method"].isin(studs)].groupby("method")[c]
        mu, sd = g.mean().reindex(studs) * 100, g.std(ddof=1).reindex(studs).fillna(0) * 100
        ax.bar(range(len(studs)), mu, yerr=sd, capsize=4, color=[f"C{i}" for i in range(len(studs))])
        for i, m in enumerate(studs):
            ax.scatter([i] * int((df["method"] == m).sum()), df[df["method"] == m][c] * 100, color="k", s=10, zorder=3)
        t = df[df["method"] == "teacher"][c]
        if len(t) and t.notna().all(): ax.axhline(100 * t.mean(), color="gray", ls="--", label="teacher")
        ax.set_xticks(range(len(studs)), [LABELS[m].replace("student ", "") for m in studs], rotation=15, fontsize=8)
        lo = float(min((mu - sd).min(), 100 * t.min() if len(t) and t.notna().all() else 100))
        ax.set_ylim(max(0, lo - 5), 100); ax.set_title(title); ax.set_ylabel("%"); ax.grid(axis="y", alpha=0.3)
        if len(t): ax.legend(fontsize=8)
    from ssl_nb.train import read_metrics
    for i, m in enumerate(("disco", "retro")):
        for j, (_, r) in enumerate(df[df["method"] == m].iterrows()):
            pts = [(x["step"], x["cos_t"]) for x in read_metrics(r["run_dir"], "train") if "cos_t" in x]
            if pts: axs[2].plot(*zip(*pts), color=f"C{2 + i}", alpha=0.7, label=LABELS[m] if j == 0 else None)
    axs[2].set_title("cos(student, teacher) of the training views"); axs[2].set_xlabel("step"); axs[2].grid(alpha=0.3)
    if axs[2].get_legend_handles_labels()[0]: axs[2].legend(fontsize=8)
    fig.suptitle(f"{b['dataset']}: student cifar_resnet10_w16, {b['student_iters']} steps, mean ± std over seeds (dots: seeds)",
                 fontsize=9)
    fig.tight_layout(); fig.savefig(out / "plot.png", dpi=120); plt.close(fig)
    # the report
    results.parent.mkdir(parents=True, exist_ok=True)
    stem = results.with_suffix("")
    shutil.copy(out / "plot.png", stem.with_suffix(".png")); shutil.copy(out / "runs.csv", stem.with_suffix(".csv"))
    n_train = {"fashion_mnist": 60_000, "digits": 1_437}.get(b["dataset"], float("nan"))
    ep = lambda steps, bs: f"{steps * bs / n_train:.2g} epochs"
    budget_line = (f"teacher {b['teacher_iters']} steps ({ep(b['teacher_iters'], b['batch_size'])}), each student "
                   f"{b['student_iters']} steps ({ep(b['student_iters'], b['batch_size'])}), batch {b['batch_size']}, "
                   f"K {b['K']}, each probe {b['probe_iters']} steps at batch 256 ({ep(b['probe_iters'], 256)}); "
                   f"{total_cpu / 60:.1f} min of single-thread CPU time in all ({len(df)} rows: runs with their probes, "
                   f"and the k-NN of the untrained students)" + (f"; {wall / 60:.0f} min wall on the shared 2-core CPU."
                                                                 if wall > 60 else "."))
    md = [f"# Retro, DisCo and MoCo v2 on {'digits (tiny check, not a result)' if tiny else 'Fashion-MNIST'}", "",
          f"Command: `{cmd}` ({time.strftime('%Y-%m-%d')}, {platform.platform()}, {os.cpu_count()} CPUs, "
          f"`OMP_NUM_THREADS=1`).", "", f"Budget: {budget_line}", "",
          "Setup: the teacher `cifar_resnet18_w32` (ResNet-18 at half width, CIFAR stem) is pre-trained with MoCo v2; "
          "the student `cifar_resnet10_w16` (one BasicBlock per stage at quarter width) is trained alone with MoCo v2, "
          "with DisCo (its own head 128 → 256 → 128) and with Retro (adapter 128 → 256, the teacher's frozen "
          "256 → 256 → 128 head) for the same number of steps, batch, queue, views (`aug_plus`, blur scaled to 28 px), "
          "SGD lr 0.06 with a cosine schedule and m = 0.99 (the CPU default of `ssl_nb.mocov2.PretrainConfig`); "
          "consistency `sum_ref32`, the intended variant (`faithful_to_code=False`).", "",
          *table_md, "The claim under test (Retro ≥ DisCo ≥ the student alone):", "", *verdict, "",
          f"![k-NN and probe top-1]({stem.with_suffix('.png').name}) Per-run rows: `{stem.with_suffix('.csv').name}`.", "",
          "What this can show: at one small, equal step budget, whether distilling a stronger frozen MoCo-v2 teacher "
          "helps this student, and whether reusing the teacher's head through an adapter (Retro) does better than "
          "DisCo's own head, on a second dataset and with a measured spread over seeds. What it cannot show: "
          "anything about ImageNet or the paper's numbers (28 px grayscale images, a 0.3M-parameter student, "
          f"{ep(b['student_iters'], b['batch_size'])} of student training instead of 200, a teacher of "
          f"{ep(b['teacher_iters'], b['batch_size'])} far weaker than a ResNet-50 trained for 200 epochs); whether "
          "the ordering holds once training converges; a difference smaller than the seed spread; the teacher is "
          "one run (seed 0), so its own spread is not measured. Retro's probe reads "
          "2× more features (256 vs 128) through an adapter that adds parameters to the deployed student (see "
          "the table), so Retro and the others are not compared at equal deployed size. The linear probe trains without "
          "augmentation (the engine's probe reads the evaluation view), unlike `main_lincls.py`'s crops."]
    results.write_text("\n".join(md) + "\n")
    print((out / "table.md").read_text())
    print("\n".join(verdict))


if __name__ == "__main__":
    main()
