"""Where the CPU training step of the embedded default goes: wall and process-CPU time per phase of ssl_nb's real step.

    python tools/cpu_profile.py [--algo sequencematch] [--steps 40] [--threads 2] [--channels-last 1]
                                [--compile] [--eval] [--eval-limit N] [--views] [--ops] [--json FILE]

Builds the run `make demo` trains (Fashion-MNIST, 40 labels, WRN-10-2, B = 32, mu = 3; `ssl_nb.train.Run`'s
open/build/restore/wrap), then repeats `Run.train_step`'s phases with a timer around each: sampling (the loader),
the views (each one), forward, loss and logs (the rest of `task.train_step`), backward, logger accumulation, lr and
optimizer step, EMA. Process CPU time (all threads) is reported beside wall time, because other processes share the
machine: CPU time / wall time above 1 means the step used more than one core; wall well above CPU time (with one
thread) means the process waited for a core. `--eval` also times one evaluation of the EMA model on the test set;
`--views` breaks each view into its ops (RandAugment, Cutout, flip/crop, normalise); `--ops` prints torch.profiler's
top operators of a few steps; `--count-ops` counts the operators each phase dispatches, with the views on their
CUDA code path (each is a kernel launch on a GPU). The load average of the machine is printed before and after.
`--compare` runs 1 and 2 threads, channels_last and contiguous, each in its own process, interleaved over
`--repeats` rounds, and prints a markdown table (wall / CPU ms per phase, the load around each run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict


def load() -> str:
    with contextlib.suppress(OSError):
        return " ".join(open("/proc/loadavg").read().split()[:3])
    return "?"


class Timer:
    "Wall (perf_counter) and process CPU (process_time: every thread) seconds per named phase."
    def __init__(self): self.wall, self.cpu, self.n = defaultdict(float), defaultdict(float), defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try: yield
        finally:
            self.wall[name] += time.perf_counter() - w; self.cpu[name] += time.process_time() - c; self.n[name] += 1

    def reset(self): self.__init__()

    def table(self, steps: int, total_wall: float, total_cpu: float) -> list[dict]:
        rows = [{"phase": k, "wall_ms": 1e3 * self.wall[k] / steps, "cpu_ms": 1e3 * self.cpu[k] / steps,
                 "share_wall": self.wall[k] / total_wall} for k in self.wall]
        rows.append({"phase": "step (total)", "wall_ms": 1e3 * total_wall / steps, "cpu_ms": 1e3 * total_cpu / steps,
                     "share_wall": 1.0})
        return rows


def fmt(rows: list[dict]) -> str:
    out = [f"{'phase':<28}{'wall ms':>10}{'CPU ms':>10}{'% wall':>8}"]
    for r in rows: out.append(f"{r['phase']:<28}{r['wall_ms']:>10.2f}{r['cpu_ms']:>10.2f}{100 * r['share_wall']:>7.1f}%")
    return "\n".join(out)


def build_run(args, run_dir: str):
    "A `Run` of the demo's config (built, not trained), as `fit` builds it."
    from ssl_nb.train import Run, make_config
    import ssl_nb.sequencematch, ssl_nb.fixmatch  # noqa: F401  (register the algorithms)
    kw = dict(num_labels=40, batch_size=args.batch_size, uratio=args.uratio, seed=0, run_dir=run_dir, progress=False,
              tensorboard=False, channels_last=bool(args.channels_last), compile=args.compile, device="cpu",
              num_iters=10**6, eval_limit=args.eval_limit)
    if args.algo == "supervised": kw.pop("uratio")
    if args.net: kw["net"] = args.net
    cfg = make_config(args.algo, **kw)
    run = Run.open(cfg)
    stack = contextlib.ExitStack()
    run._open_folder(stack)
    run.build().restore().wrap()
    return run, stack


def timed_steps(run, logger, steps: int, T: Timer):
    "`Run.train_step` (accum_steps = 1), phase by phase, with the views and the forward timed inside the task."
    from ssl_nb.train import set_lr
    cfg, task, model = run.cfg, run.task, run.model
    for _ in range(steps):
        task.step = run.step
        with T("zero_grad"): run.opt.zero_grad(set_to_none=True)
        with T("sampling (loader)"): batch = next(run.loader)
        with T("views (make_inputs)"): inputs = task.make_inputs(batch, run.aug_gen)
        with T("forward+loss+logs"): out = task.train_step(inputs)
        with T("backward"): out["loss"].backward()
        with T("logger.accumulate"): logger.accumulate(out, run.step + 1)
        with T("lr + optimizer step"):
            run.lr = set_lr(run.opt, cfg, run.step); run.opt.step()
        with T("EMA update"):
            if run.ema is not None: run.ema.update(model, run.step)
        run.step += 1


def instrument(task, T: Timer):
    "Time each view and the forward pass inside the task (instance attributes; the task's code is unchanged)."
    if task.view_fns is not None:
        task.plain_views = dict(task.view_fns)
        task.view_fns = {k: _timed(f"  view {k}", v, T) for k, v in task.view_fns.items()}
    fwd = task.forward
    task.forward = _timed("  forward (model)", fwd, T)


def _timed(name, fn, T):
    def wrapper(*a, **kw):
        with T(name): return fn(*a, **kw)
    wrapper.__wrapped__ = fn
    return wrapper


class OpCounter:
    "Aten operators dispatched per named phase (on a GPU each is about one kernel launch and its host time)."
    def __init__(self): self.counts = defaultdict(int)

    @contextlib.contextmanager
    def __call__(self, name: str):
        from torch.utils._python_dispatch import TorchDispatchMode
        counts = self.counts

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[name] += 1
                return func(*args, **(kwargs or {}))
        with Mode(): yield


def count_ops(run, logger, steps: int = 2) -> dict:
    """Operators per phase of one step, on the GPU code path of the views (`augment.CPU_SUBSETS = False`: every
    stage on the whole batch, selected per sample, as on CUDA)."""
    from ssl_nb import augment
    old, augment.CPU_SUBSETS = augment.CPU_SUBSETS, False
    C = OpCounter()
    task = run.task
    saved = task.view_fns, task.forward
    if hasattr(task, "plain_views"): task.view_fns = dict(task.plain_views)
    task.forward = _timed("  forward (model)", getattr(saved[1], "__wrapped__", saved[1]), C)
    if task.view_fns is not None: task.view_fns = {k: _timed(f"  view {k}", v, C) for k, v in task.view_fns.items()}
    try: timed_steps(run, logger, steps, C)
    finally: augment.CPU_SUBSETS = old; task.view_fns, task.forward = saved
    return {k: v / steps for k, v in C.counts.items()}


def view_ops(task, reps: int, T: Timer):
    "Each view of the task split into its ops, on the unlabeled batch size."
    import torch
    from ssl_nb.augment import cutout, flip_crop, normalize, rand_augment
    x = task.data.ulb.images[: task.cfg.batch_size * max(1, getattr(task.cfg, "uratio", 1))]
    g = torch.Generator().manual_seed(0)
    for name in ("weak", "medium", "strong"):
        v = task.plain_views[name]
        for _ in range(reps):
            y = x
            if v.n_ops:
                with T(f"{name}: rand_augment({v.n_ops})"): y = rand_augment(y, v.n_ops, g, v.ops)
            if v.cutout:
                with T(f"{name}: cutout"): y = cutout(y, g, v.cutout_frac, v.cutout_fill)
            with T(f"{name}: flip_crop"): y = flip_crop(y, g, v.pad, v.crop_size, v.flip, v.order)
            with T(f"{name}: normalize"): y = normalize(y, v.mean, v.std)
            if v.channels_last:
                with T(f"{name}: to channels_last"): y = y.contiguous(memory_format=torch.channels_last)


VARIANTS = {"1 thread, channels_last": ["--threads", "1", "--channels-last", "1"],
            "1 thread, contiguous": ["--threads", "1", "--channels-last", "0"],
            "2 threads, channels_last": ["--threads", "2", "--channels-last", "1"],
            "2 threads, contiguous": ["--threads", "2", "--channels-last", "0"]}
PHASES = ("sampling (loader)", "views (make_inputs)", "  forward (model)", "forward+loss+logs", "backward",
          "lr + optimizer step", "EMA update", "logger.accumulate", "step (total)")


def compare(args, rest: list[str]) -> list[dict]:
    """Each of `VARIANTS` in its own process, `--repeats` rounds, the variants interleaved within a round (so that
    they share the machine's state of the moment); one JSON line each in `--json`; returns them."""
    import subprocess
    out = args.json or os.path.join(tempfile.mkdtemp(prefix="cpu_compare_"), "compare.jsonl")
    for r in range(args.repeats):
        for name, flags in VARIANTS.items():
            print(f"[round {r + 1}/{args.repeats}] {name}", flush=True)
            subprocess.run([sys.executable, __file__, *rest, *flags, "--json", out, "--label", name], check=True,
                           stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": flags[1]})
    rows = [json.loads(l) for l in open(out)]
    print(compare_table(rows))
    return rows


def compare_table(rows: list[dict]) -> str:
    "Markdown: one line per run, ms per step (wall / process CPU) of the main phases, and the load around it."
    head = ["variant", "timed steps", "load before → after", *[p.strip() for p in PHASES], "steps/s"]
    L = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ph = {x["phase"]: x for x in r["rows"]}
        cells = [f"{ph[p]['wall_ms']:.0f} / {ph[p]['cpu_ms']:.0f}" if p in ph else "–" for p in PHASES]
        L.append(f"| {r.get('label') or r['config']} | {r['steps']} | {r['load_before']} → {r['load_after']} | "
                 + " | ".join(cells)
                 + f" | {r['steps_per_s']:.2f} |")
    return "\n".join(L)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", default="sequencematch")
    p.add_argument("--net", default=None, help="default: the config's (wrn_10_2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--uratio", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--channels-last", type=int, default=1, choices=(0, 1))
    p.add_argument("--compile", action="store_true", help="cfg.compile=True (torch.compile of the model)")
    p.add_argument("--eval", action="store_true", help="also time one evaluation of the EMA model")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--views", action="store_true", help="break the views into their ops")
    p.add_argument("--ops", action="store_true", help="torch.profiler's top operators over 5 steps")
    p.add_argument("--count-ops", action="store_true",
                   help="operators dispatched per phase (the views on their GPU code path): the launches of a CUDA step")
    p.add_argument("--json", default=None, help="append a JSON line with the results")
    p.add_argument("--label", default=None, help="a name for this run in the JSON line")
    p.add_argument("--compare", action="store_true",
                   help="run 1 vs 2 threads x channels_last vs contiguous back to back (subprocesses) and tabulate")
    p.add_argument("--repeats", type=int, default=2, help="--compare: rounds of the four variants")
    args, rest = p.parse_known_args(argv)
    if args.compare:
        keep = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--compare",)]
        drop = {"--repeats", "--json", "--threads", "--channels-last", "--label"}
        fwd, skip = [], False
        for a in keep:
            if skip: skip = False; continue
            if a in drop: skip = True; continue
            fwd.append(a)
        return compare(args, fwd)
    if rest: p.error(f"unrecognized arguments: {' '.join(rest)}")

    load0 = load()
    t_import = time.perf_counter()
    import torch
    if args.threads: torch.set_num_threads(args.threads)
    from ssl_nb.train import MetricLogger
    t_import = time.perf_counter() - t_import
    tmp = tempfile.mkdtemp(prefix="cpu_profile_")
    t0 = time.perf_counter()
    run, stack = build_run(args, tmp)
    t_build = time.perf_counter() - t0
    task = run.task
    logger = MetricLogger(run.run_dir, run.device, enabled=False, tensorboard=False)
    T = Timer()
    instrument(task, T)
    task.train()
    t0 = time.perf_counter()
    timed_steps(run, logger, args.warmup, T)            # includes torch.compile's compilation when --compile
    t_warm = time.perf_counter() - t0
    T.reset()
    w, c, t0s = time.perf_counter(), time.process_time(), os.times()
    timed_steps(run, logger, args.steps, T)
    w, c, t1s = time.perf_counter() - w, time.process_time() - c, os.times()
    user_ms, sys_ms = (1e3 * (t1s.user - t0s.user) / args.steps, 1e3 * (t1s.system - t0s.system) / args.steps)
    logger.flush(run.step)
    rows = T.table(args.steps, w, c)
    head = (f"{args.algo}, {task.cfg.net}, B={args.batch_size}, mu={args.uratio}, threads={torch.get_num_threads()}, "
            f"channels_last={bool(args.channels_last)}, compile={args.compile}, torch {torch.__version__}")
    print(head)
    print(f"import {t_import:.1f} s, build {t_build:.1f} s, {args.warmup} warm-up steps {t_warm:.1f} s; "
          f"load average before: {load0}")
    print(fmt(rows))
    print(f"=> {args.steps / w:.2f} steps/s wall, CPU/wall {c / w:.2f}; CPU per step: user {user_ms:.0f} ms + "
          f"system {sys_ms:.0f} ms (system time: mostly page faults of freshly mapped tensor memory)")
    res = {"label": args.label, "config": head, "threads": torch.get_num_threads(), "channels_last": bool(args.channels_last),
           "compile": args.compile, "algo": args.algo, "steps": args.steps, "warmup_s": t_warm, "build_s": t_build,
           "rows": rows, "steps_per_s": args.steps / w, "cpu_over_wall": c / w, "load_before": load0,
           "user_ms": user_ms, "sys_ms": sys_ms,
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    if args.eval:
        ev_model = run.eval_model()
        with T("evaluation"): ev = task.evaluate(ev_model)
        n = task.eval_size()
        res["eval"] = {"wall_s": T.wall["evaluation"], "cpu_s": T.cpu["evaluation"], "images": n, "top1": ev["top1"]}
        print(f"evaluation of {n} test images: {T.wall['evaluation']:.2f} s wall, {T.cpu['evaluation']:.2f} s CPU")
    if args.views:
        V = Timer(); reps = 10
        view_ops(task, reps, V)
        vrows = [{"op": k, "wall_ms": 1e3 * V.wall[k] / reps, "cpu_ms": 1e3 * V.cpu[k] / reps} for k in V.wall]
        res["view_ops"] = vrows
        print(f"\nviews split into ops ({task.cfg.batch_size * args.uratio} unlabeled images, ms per call):")
        for r in vrows: print(f"  {r['op']:<32}{r['wall_ms']:>9.2f} wall{r['cpu_ms']:>9.2f} CPU")
    if args.count_ops:
        counts = count_ops(run, logger)
        res["ops_per_step"] = counts
        print("\noperators dispatched per step (views on their GPU code path; nested phases are counted twice):")
        for k, v in counts.items(): print(f"  {k:<28}{v:>8.0f}")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof: timed_steps(run, logger, 5, Timer())
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(f"load average after: {load()}")
    res["load_after"] = load()
    stack.close()
    if args.json:
        with open(args.json, "a") as f: f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
