"""The CPU demo's budget and its report (issue 18).

    python tools/demo_cpu.py budgets OUT.jsonl '{"algo": "sequencematch", "num_iters": 400, "eval_every": 200}' ...
    python tools/demo_cpu.py report --demo-dir runs/demo_issue18 --time-log LOG --load-log LOG \
        --budgets benchmarks/results/demo_cpu_budgets.jsonl --profile benchmarks/results/demo_cpu_profile.jsonl \
        [--counts counts.json] [--compile compile.jsonl] --out benchmarks/results/demo_cpu.md

`budgets` trains each spec (a JSON dict: `algo` plus config overrides; the demo's defaults otherwise: 40 labels,
seed 0, B = 32, mu = 3) with `fit`, one CPU thread (`--threads`), and appends one JSON line per run: wall and
process CPU seconds, the load average before and after, best and last top-1 and the evaluation history.
`report` writes the results file from those lines, `tools/cpu_profile.py --compare` lines, and one `make demo` run
(its run folder, the `/usr/bin/time -v` log of the make command and a log of `date +%s load1 load5 load15` lines
sampled during it): every number in it is read from those files.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

DEMO = dict(num_labels=40, seed=0, batch_size=32, uratio=3)


def loadavg() -> list[str]:
    return open("/proc/loadavg").read().split()[:3]


def budgets(out: str, specs: list[str], threads: int = 1, root: str = "runs/demo_budgets"):
    import torch
    torch.set_num_threads(threads)
    from ssl_nb.train import fit, make_config
    for spec in specs:
        kw = {**DEMO, **json.loads(spec)}
        algo = kw.pop("algo")
        name = algo + "_" + "_".join(f"{k}{v}" for k, v in sorted(kw.items()))
        w, c, la = time.perf_counter(), time.process_time(), loadavg()
        r = fit(make_config(algo, run_dir=f"{root}/{name}_t{threads}", progress=False, tensorboard=False, resume=True,
                            **kw))
        row = {"algo": algo, "config": kw, "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - w,
               "cpu_s": time.process_time() - c, "load_before": la, "load_after": loadavg(), "best": r.best,
               "best_step": r.best_step, "last": r.last.get("top1"), "ece": r.last.get("ece"),
               "history": [(h["step"], h["top1"]) for h in r.history]}
        print(json.dumps(row), flush=True)
        with open(out, "a") as f: f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- report
def _time_log(path) -> dict:
    "Wall, user and system seconds and peak memory from a `/usr/bin/time -v` log."
    t = Path(path).read_text()
    get = lambda pat: re.search(pat, t).group(1)
    h, m, s = ("0:" + get(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)")).split(":")[-3:]
    return {"wall_s": int(h or 0) * 3600 + int(m) * 60 + float(s), "user_s": float(get(r"User time \(seconds\): ([\d.]+)")),
            "sys_s": float(get(r"System time \(seconds\): ([\d.]+)")),
            "max_rss_mb": int(get(r"Maximum resident set size \(kbytes\): (\d+)")) / 1024,
            "command": get(r'Command being timed: "(.*)"')}


def _load_log(path) -> dict:
    rows = [l.split() for l in Path(path).read_text().splitlines() if l.strip()]
    one = [float(r[1]) for r in rows]
    return {"samples": len(one), "mean": statistics.mean(one), "min": min(one), "max": max(one)}


def _fmt_pct(v): return "–" if v is None else f"{100 * v:.2f}%"


def _mmss(s: float) -> str: return f"{int(s // 60)} min {int(round(s % 60)):02d} s"


def report(a) -> str:
    L = ["# The CPU demo (`make demo`) and where the CPU step's time goes (issue 18)", ""]
    # ---- the demo run
    tl, ll = _time_log(a.time_log), _load_log(a.load_log)
    demo = Path(a.demo_dir)
    res = {p.parent.name: json.loads(p.read_text()) for p in sorted(demo.glob("*/results.json"))}
    cfg = json.loads((demo / "sequencematch" / "config.json").read_text())
    env = cfg.get("environment", {})
    sm, sup = res.get("sequencematch"), res.get("supervised")
    L += ["## `make demo`, measured", "",
          f"Command: `{tl['command']}` (`-o .venv/.ssl_nb-installed`: the install step was up to date and is "
          f"skipped; a user's second `make demo` does the same). Date: {a.date or env.get('date', '?')}. Machine: the "
          f"team's {env.get('cpu_count', '?')}-core {env.get('cpu', 'CPU')} (the load average below says what else ran), torch "
          f"{env.get('torch', '?')}, {env.get('torch_threads', '?')} training thread(s).", "",
          f"**Wall time {_mmss(tl['wall_s'])}** ({tl['wall_s']:.0f} s: data check, the notebook under papermill with "
          f"both trainings, evaluations and plots, and the summary); CPU time {tl['user_s'] + tl['sys_s']:.0f} s "
          f"(user {tl['user_s']:.0f} s + system {tl['sys_s']:.0f} s, all processes); peak memory "
          f"{tl['max_rss_mb']:.0f} MB. Load average (1 min) during the run, sampled every 10 s: mean "
          f"{ll['mean']:.2f}, min {ll['min']:.2f}, max {ll['max']:.2f} ({ll['samples']} samples) on 2 cores.", "",
          f"Budget (the notebook's defaults): {sm['num_labels'] if sm else '?'} labels, seed {cfg.get('seed')}, "
          f"B = {cfg.get('batch_size')}, mu = {cfg.get('uratio')}, {cfg.get('num_iters')} steps, evaluation every "
          f"{cfg.get('eval_every')} steps on {sm.get('eval_size') if sm else '?'} test images, one CPU thread.", "",
          "| run | best top-1 | last top-1 | ECE (last) | steps |", "|---|---|---|---|---|"]
    for name, r in res.items():
        L.append(f"| {name} | {_fmt_pct(r['best_top1'])} (step {r['best_step']}) | {_fmt_pct(r['last_top1'])} | "
                 f"{_fmt_pct(r.get('last_ece'))} | {r['steps']} |")
    if sm and sup:
        L += ["", f"SequenceMatch − supervised-only: {100 * (sm['last_top1'] - sup['last_top1']):+.2f} points (last), "
                  f"{100 * (sm['best_top1'] - sup['best_top1']):+.2f} (best)."]
    # ---- the budget experiments
    if a.budgets:
        rows = [json.loads(l) for l in Path(a.budgets).read_text().splitlines() if l.strip()]
        L += ["", "## Choosing the budget (seed 0, one thread, the same code as the demo)", "",
              "Each run trained with `fit` at the demo's settings except those listed (`python tools/demo_cpu.py "
              "budgets ...`), in turn while the machine was loaded by other jobs (its load average is given, since "
              "CPU time also grows under load: the two vCPUs share their core's caches and pipelines with the "
              "other jobs). Supervised-only trains on the 32 labeled images per step only (mu is not used).", "",
              "| method | B | mu | steps | evaluations (step: top-1) | last top-1 | CPU s | wall s | load before → after |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            c = r["config"]
            hist = ", ".join(f"{s}: {100 * t:.1f}" for s, t in r["history"])
            L.append(f"| {r['algo']} | {c['batch_size']} | {c.get('uratio', '–') if r['algo'] != 'supervised' else '–'} "
                     f"| {c['num_iters']} | {hist} | {_fmt_pct(r['last'])} | {r['cpu_s']:.0f} | {r['wall_s']:.0f} | "
                     f"{r['load_before'][0]} → {r['load_after'][0]} |")
    # ---- the profile
    if a.profile:
        sys.path.insert(0, str(Path(__file__).parent))
        from cpu_profile import compare_table
        rows = [json.loads(l) for l in Path(a.profile).read_text().splitlines() if l.strip()]
        L += ["", "## Where the CPU step's time goes", "",
              "ssl_nb's real `Run` (SequenceMatch at the demo's B = 32, mu = 3, WRN-10-2 on 28×28), phase by phase "
              "(`tools/cpu_profile.py`). Pairs 1–2: `--steps 15 --threads 1` and `--threads 2` run one after the "
              f"other; rounds 1–{a.repeats}: `--compare --repeats {a.repeats} --steps 20` (each variant in its own "
              "process, the four interleaved in each round). Cells: wall / process-CPU ms per step (CPU time counts "
              "every thread); the load average (1, 5, 15 min) before and after each run, on 2 cores.", "", compare_table(rows)]
    if a.counts:
        c = json.loads(Path(a.counts).read_text())
        L += ["", "Operators dispatched per SequenceMatch step (`--count-ops`; the views on their CUDA code path, where "
                  "each operator is a kernel launch; nested phases counted in their parent too):", "",
              "| phase | operators |", "|---|---|", *[f"| {k.strip()} | {v:.0f} |" for k, v in c.items()]]
    if a.compile:
        r = [json.loads(l) for l in Path(a.compile).read_text().splitlines() if l.strip()][-1]
        ph = {x["phase"]: x for x in r["rows"]}
        L += ["", f"`torch.compile` (`--compile --threads 1`): {r['warmup_s']:.0f} s of wall time for the first "
                  f"{a.compile_warmup} steps (compilation included; load average {r['load_before']} before), then "
                  f"{ph['step (total)']['cpu_ms']:.0f} CPU ms per step (forward {ph['  forward (model)']['cpu_ms']:.0f}, "
                  f"backward {ph['backward']['cpu_ms']:.0f})."]
    return "\n".join(L) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("budgets"); b.add_argument("out"); b.add_argument("specs", nargs="+")
    b.add_argument("--threads", type=int, default=1); b.add_argument("--root", default="runs/demo_budgets")
    r = sub.add_parser("report")
    for k in ("--demo-dir", "--time-log", "--load-log"): r.add_argument(k, required=True)
    for k in ("--budgets", "--profile", "--counts", "--compile", "--date"): r.add_argument(k, default=None)
    r.add_argument("--repeats", type=int, default=2); r.add_argument("--compile-warmup", type=int, default=3)
    r.add_argument("--prose", default=None, help="a markdown file appended after the generated part")
    r.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "budgets": return budgets(a.out, a.specs, a.threads, a.root)
    text = report(a)
    if a.prose: text += "\n" + Path(a.prose).read_text()
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
