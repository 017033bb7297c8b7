"""The fault campaign: kill a short CPU run at random moments and compare the resumed result bit for bit with an
uninterrupted run; feed the CLI bad input and check that each case ends in one clear message and exit status 2.

    python benchmarks/faults.py --kills 30 --out runs/faults --results benchmarks/results/faults.md
    python benchmarks/faults.py --short            # what `make test` runs (tests/test_faults.py): 2 kills, 10 inputs

Kills: a SequenceMatch run (30 steps, a checkpoint every 5, an evaluation every 10, tiny batches, the first 128 test
images) is started with `ssl-nb fit`, killed (SIGKILL, or SIGINT as Ctrl-C does) at a random moment, restarted with
`--resume true` (some trials are killed again during the resume), and run to the end. The final `last.pt` (model, EMA,
optimizer, loader, task state, RNG states, best, history), `metrics.jsonl` (without timings and `resume` rows) and
`results.json` must equal those of the uninterrupted reference run exactly (two of which must equal each other first;
the second one's time sets when kills land). A SIGINT must end in exit status 130 with one line naming the checkpoint
to resume from, never a traceback.

Bad inputs: each case runs the CLI once and must end in exit status 2 (1 is left to bugs) with one `ssl-nb:` message on
stderr and no traceback; some cases also check what must not happen (no checkpoint lost, the run folder untouched).
"""
from __future__ import annotations

import argparse, json, os, random, shutil, signal, subprocess, sys, tempfile, time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ["fit", "sequencematch", "--num-iters", "30", "--ckpt-every", "5", "--eval-every", "10", "--batch-size", "8",
       "--uratio", "2", "--eval-limit", "128", "--log-every", "5", "--device", "cpu", "--no-progress", "--no-tensorboard"]
CKPT_KEYS = ("step", "model", "ema", "optimizer", "loader", "task", "aug_rng", "cpu_rng", "best", "history")


def _default_sigint():
    """A shell without job control starts background jobs with SIGINT ignored, and their children inherit that: a
    Ctrl-C sent to them would be lost. The runs under test get the default disposition back, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(args, timeout=300, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    "Run `python -m ssl_nb.cli ARGS` from the project root with one CPU thread."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "ssl_nb.cli", *map(str, args)]
    if kw.pop("background", False):        # SIGINT as in a terminal even when this script runs in the background
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sigint)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------------
# kills

def _same(a, b, where=""):
    import math, torch
    if torch.is_tensor(a): return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict): return isinstance(b, dict) and set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a): return isinstance(b, float) and math.isnan(b)
    return a == b


def fingerprint(run_dir: Path) -> dict:
    "What must equal the uninterrupted run: the checkpoint's state, the metric rows, the results."
    from ssl_nb.core import load_checkpoint
    ck = load_checkpoint(run_dir / "last.pt")
    rows = [{k: v for k, v in json.loads(l).items() if k != "ms_per_step"}
            for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res = json.loads((run_dir / "results.json").read_text()); res.pop("run_dir")
    return {"ckpt": {k: ck[k] for k in CKPT_KEYS}, "rows": [r for r in rows if r["kind"] != "resume"], "results": res}


@dataclass
class Trial:
    n: int
    kills: list = field(default_factory=list)     # (signal name, seconds after start, exit status, stderr tail)
    restarts: int = 0
    identical: bool = False
    clean_sigint: bool = True
    note: str = ""


def kill_trial(n: int, rng: random.Random, ref: dict, ref_seconds: float, out: Path, max_kills: int = 2) -> Trial:
    run_dir = out / f"trial{n:03d}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t = Trial(n)
    kills_left, resume = rng.randint(1, max_kills), False
    while True:
        p = cli([*RUN, "--run-dir", run_dir, "--resume", str(resume).lower()], background=True)
        t0 = time.monotonic()
        if kills_left:
            first = len(t.kills) == 0                   # every 4th trial starts with a Ctrl-C, the others draw
            sig = signal.SIGINT if (first and n % 4 == 1) or (not first and rng.random() < 0.25) else signal.SIGKILL
            delay = rng.uniform(0.2, ref_seconds * 1.05)
            try:
                p.wait(timeout=delay)
                sig = None                                              # it finished before the kill
            except subprocess.TimeoutExpired:
                p.send_signal(sig)
            _, err = p.communicate(timeout=300)
            if sig is None and p.returncode != 0:                       # it failed on its own: a bug, not a kill
                t.note += f" the run exited {p.returncode} before its kill: {err[-500:]}"; return t
            if p.returncode == 0: sig = None                            # the signal came as the run ended
            if sig is None:                                             # nothing was killed: the next run resumes a finished run
                t.note += " a run finished before its kill."; kills_left = 0; resume = True; t.restarts += 1
                continue
            t.kills.append((sig.name, round(time.monotonic() - t0, 2), p.returncode, err.strip().splitlines()[-1:]))
            if sig == signal.SIGINT and p.returncode != 130:
                t.clean_sigint = False; t.note += f" SIGINT ended with {p.returncode}: {err[-300:]}"
            if sig == signal.SIGINT and p.returncode == 130 and ("Traceback" in err or err.count("ssl-nb:") != 1):
                t.clean_sigint = False; t.note += f" SIGINT output: {err[-300:]}"
            kills_left -= 1
        else:
            _, err = p.communicate(timeout=600)
            if p.returncode != 0: t.note += f" final run exited {p.returncode}: {err[-500:]}"; return t
            break
        resume = True; t.restarts += 1
    got = fingerprint(run_dir)
    t.identical = _same(got, ref)
    if not t.identical: t.note += " differs from the uninterrupted run: " + ", ".join(
        k for k in ("ckpt", "rows", "results") if not _same(got[k], ref[k]))
    return t


def reference(out: Path) -> tuple[dict, float]:
    """Two uninterrupted runs, which must be equal (a run that is not deterministic leaves nothing to compare a resumed
    one with). Returns the second one's fingerprint and time: the first pays for cold file caches and bytecode
    compilation, and its time would put many kills after the end of the run."""
    got = []
    for name in ("reference_warmup", "reference"):
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.monotonic()
        r = cli([*RUN, "--run-dir", d], timeout=600)
        if r.returncode != 0: raise SystemExit(f"faults.py: the reference run failed:\n{r.stderr[-2000:]}")
        got.append((fingerprint(d), time.monotonic() - t0))
    if not _same(got[0][0], got[1][0]):
        raise SystemExit("faults.py: two uninterrupted runs of the same config differ, so no resumed run can be judged; "
                         f"compare {out / 'reference_warmup'} with {out / 'reference'}.")
    return got[1]


def kill_campaign(n: int, seed: int, out: Path, log=print) -> list[Trial]:
    out.mkdir(parents=True, exist_ok=True)
    ref, ref_seconds = reference(out)
    rng, trials = random.Random(seed), []
    for i in range(n):
        trials.append(kill_trial(i, rng, ref, ref_seconds, out))
        tr = trials[-1]
        log(f"[kill {i + 1}/{n}] {', '.join(f'{s}@{d}s->{c}' for s, d, c, _ in tr.kills)}; identical: {tr.identical}"
            + (f" ({tr.note})" if tr.note else ""))
    return trials


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs

TINY = ["--num-iters", "2", "--eval-every", "2", "--batch-size", "4", "--uratio", "1", "--eval-limit", "16",
        "--device", "cpu", "--no-progress", "--no-tensorboard"]


@dataclass
class Case:
    name: str
    args: list                 # CLI arguments; "{d}" is replaced by the case's scratch folder
    setup: object = None       # setup(d: Path) before the run
    check: object = None       # check(d: Path, result) -> problem text or ""
    quick: bool = False        # part of the short campaign


def _finished_run(d: Path):
    r = cli(["fit", "supervised", *TINY, "--run-dir", d / "run"])
    assert r.returncode == 0, r.stderr


def _corrupt(d: Path, names=("last.pt", "prev.pt")):
    _finished_run(d)
    for n in names: (d / "run" / n).write_bytes(b"\0" * 64)


def _image_folder(d: Path, corrupt_val: bool = True):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (d / "data" / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "data" / split / c / f"{i}.png")
    if corrupt_val: (d / "data" / "val" / "b" / "1.png").write_bytes(b"not a png")


def _evil_cifar(d: Path):
    import pickle
    class Boom:
        def __reduce__(self): return (os.system, ("echo pwned > " + str(d / "pwned"),))
    root = d / "data" / "cifar-10-batches-py"; root.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (root / f).write_bytes(pickle.dumps({"data": Boom()}))


def _no_checkpoint_lost(d: Path, r) -> str:
    return "" if (d / "run" / "last.pt").exists() else "last.pt is gone"


def _step2_saved(d: Path, r) -> str:
    from ssl_nb.core import load_checkpoint
    p = d / "run" / "last.pt"
    if not p.exists(): return "no last.pt: the steps before the failing evaluation were lost"
    if "val/b/1.png" not in r.stderr: return "the message does not name the bad file"
    return "" if load_checkpoint(p)["step"] == 2 else "last.pt is not at the evaluated step"


def _not_pwned(d: Path, r) -> str:
    return "the pickle ran code" if (d / "pwned").exists() else ""


def _lock_held(d):
    (d / "run").mkdir()


CASES = [
    Case("unknown flag", ["fit", "fixmatch", "--lrr", "0.1"], quick=True),
    Case("value out of range", ["fit", "fixmatch", "--p-cutoff", "2"], quick=True),
    Case("negative seed", ["fit", "fixmatch", "--seed", "-1"], quick=True),
    Case("infinite temperature", ["fit", "fixmatch", "--T", "inf"], quick=True),
    Case("infinite lr", ["fit", "fixmatch", "--lr", "inf"]),
    Case("NaN lr", ["fit", "fixmatch", "--lr", "nan"]),
    Case("NaN weight decay", ["fit", "fixmatch", "--weight-decay", "nan"]),
    Case("zero batch", ["fit", "fixmatch", "--batch-size", "0"]),
    Case("batch not a number", ["fit", "fixmatch", "--batch-size", "eight"]),
    Case("batch not divisible by accum_steps", ["fit", "fixmatch", "--batch-size", "8", "--accum-steps", "3"]),
    Case("unknown net", ["fit", "fixmatch", "--net", "wrn_99_9"]),
    Case("unknown dataset", ["fit", "fixmatch", "--dataset", "cifar-10"]),
    Case("unknown preset", ["fit", "fixmatch", "--preset", "cifar11-40"]),
    Case("unknown algorithm", ["fit", "nosuchalgo"], quick=True),
    Case("no algorithm", ["fit"]),
    Case("unknown optimizer", ["fit", "fixmatch", "--optimizer", "adam"]),
    Case("unknown schedule", ["fit", "fixmatch", "--schedule", "linear"]),
    Case("EMA decay 1", ["fit", "fixmatch", "--ema-decay", "1.0"]),
    Case("eval_limit 0", ["fit", "fixmatch", "--eval-limit", "0"]),
    Case("no GPU", ["fit", "fixmatch", "--device", "cuda:0"]),
    Case("data_root does not exist", ["fit", "fixmatch", *TINY, "--data-root", "{d}/nowhere", "--run-dir", "{d}/run"],
         check=lambda d, r: "" if not (d / "run").exists() else "a run folder was created", quick=True),
    Case("dataset missing from data_root", ["fit", "fixmatch", "--dataset", "cifar10", "--data-root", "{d}",
                                            "--run-dir", "{d}/run", *TINY]),
    Case("CIFAR pickle that runs code", ["fit", "fixmatch", "--dataset", "cifar10", "--data-root", "{d}/data",
                                         "--num-labels", "10", "--run-dir", "{d}/run", *TINY], setup=_evil_cifar,
         check=_not_pwned),
    Case("run_dir is a file", ["fit", "fixmatch", *TINY, "--run-dir", "{d}/file"],
         setup=lambda d: (d / "file").write_text("x"), quick=True),
    Case("run_dir not writable", ["fit", "fixmatch", *TINY, "--run-dir", "/proc/ssl_nb_run"]),
    Case("run_dir in use by another run", ["fit", "supervised", *TINY, "--run-dir", "{d}/run"], setup=_lock_held),
    Case("new run over a checkpoint", ["fit", "supervised", *TINY, "--run-dir", "{d}/run"], setup=_finished_run,
         check=_no_checkpoint_lost, quick=True),
    Case("resume with another seed", ["fit", "supervised", *TINY, "--run-dir", "{d}/run", "--resume", "true",
                                      "--seed", "1"], setup=_finished_run, check=_no_checkpoint_lost),
    Case("resume before the checkpoint's step", ["fit", "supervised", *TINY, "--run-dir", "{d}/run", "--resume", "true",
                                                 "--num-iters", "1"], setup=_finished_run, check=_no_checkpoint_lost),
    Case("resume from best.pt (weights only)", ["fit", "supervised", *TINY, "--run-dir", "{d}/run2",
                                                "--resume", "{d}/run/best.pt"], setup=_finished_run),
    Case("resume from a missing file", ["fit", "supervised", *TINY, "--run-dir", "{d}/run", "--resume", "{d}/none.pt"]),
    Case("every checkpoint corrupt", ["fit", "supervised", *TINY, "--run-dir", "{d}/run", "--resume", "true"],
         setup=_corrupt, check=lambda d, r: "" if (d / "run" / "last.pt").read_bytes() == b"\0" * 64 else "file changed"),
    Case("init weights missing", ["fit", "fixmatch", *TINY, "--checkpoint", "{d}/none.pt", "--run-dir", "{d}/run"]),
    Case("init weights corrupt", ["fit", "fixmatch", *TINY, "--checkpoint", "{d}/w.pt", "--run-dir", "{d}/run"],
         setup=lambda d: (d / "w.pt").write_bytes(b"PK\x03\x04garbage")),
    Case("corrupt validation image", ["fit", "supervised", "--dataset", "imagenet", "--data-root", "{d}/data",
                                      "--num-labels", "3", "--crop-size", "16", "--num-iters", "2", "--eval-every", "2",
                                      "--ckpt-every", "2", "--batch-size", "3", "--num-workers", "0", "--device", "cpu",
                                      "--no-progress", "--no-tensorboard", "--run-dir", "{d}/run"],
         setup=_image_folder, check=_step2_saved),
    Case("NaN loss", ["fit", "supervised", "--num-iters", "6", "--ckpt-every", "2", "--eval-every", "2", "--log-every",
                      "1", "--lr", "1e38", "--batch-size", "4", "--eval-limit", "16", "--device", "cpu",
                      "--no-progress", "--no-tensorboard", "--run-dir", "{d}/run"]),
    Case("linear probe without a source", ["fit", "linear_probe"]),
    Case("linear probe of a missing run", ["fit", "linear_probe", "--source", "{d}/none/last.pt", "--run-dir", "{d}/p"]),
    Case("presets of an unknown algorithm", ["presets", "nosuchalgo"]),
    Case("summary of a missing folder", ["summary", "{d}/none"], quick=True),
    Case("summary of an empty folder", ["summary", "{d}"]),
]


def run_case(case: Case, scratch: Path) -> dict:
    d = scratch / case.name.replace(" ", "_").replace("/", "_")
    shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
    if case.setup: case.setup(d)
    args = [str(a).replace("{d}", str(d)) for a in case.args]
    if case.setup is _lock_held:
        from ssl_nb.core import run_lock
        with run_lock(d / "run"): r = cli(args)
    else: r = cli(args)
    lines = r.stderr.strip().splitlines()
    problems = []
    if r.returncode != 2: problems.append(f"exit status {r.returncode}")
    if r.stderr.count("ssl-nb:") != 1 or not r.stderr.startswith("ssl-nb: "): problems.append("not one ssl-nb message")
    if "Traceback" in r.stderr: problems.append("a traceback")
    if case.check and (p := case.check(d, r)): problems.append(p)
    return {"case": case.name, "command": "ssl-nb " + " ".join(a.replace(str(d), "DIR") for a in args),
            "exit": r.returncode, "message": (lines[-1] if lines else "").replace(str(d), "DIR")[:240],
            "ok": not problems, "problems": "; ".join(problems)}


def bad_inputs(scratch: Path, quick: bool = False, log=print) -> list[dict]:
    rows = []
    for case in [c for c in CASES if c.quick or not quick]:
        rows.append(run_case(case, scratch))
        log(f"[input] {rows[-1]['case']}: exit {rows[-1]['exit']} {'ok' if rows[-1]['ok'] else 'FAIL ' + rows[-1]['problems']}")
    return rows


# ---------------------------------------------------------------------------------------------------------------------

def report(trials: list[Trial], rows: list[dict], seconds: float, command: str) -> str:
    kills = [k for t in trials for k in t.kills]
    sigint = [k for k in kills if k[0] == "SIGINT"]
    lines = [f"# Fault campaign", "", f"`{command}` ({time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min on "
             f"{os.cpu_count()} CPU cores).", "",
             f"**Kills:** {len(trials)} trials, {len(kills)} kills ({len(kills) - len(sigint)} SIGKILL, {len(sigint)} SIGINT),"
             f" {sum(t.restarts for t in trials)} resumes; **{sum(t.identical for t in trials)}/{len(trials)} ended bit for "
             f"bit equal** to the uninterrupted run; every SIGINT ended cleanly (exit 130, one message): "
             f"{all(t.clean_sigint for t in trials)}.",
             f"**Bad inputs:** {len(rows)} cases, **{sum(r['ok'] for r in rows)}/{len(rows)} clear** (exit status 2, one "
             f"`ssl-nb:` message on stderr, no traceback, nothing lost).", "",
             "| trial | kills (signal @ seconds -> exit) | resumes | identical | note |", "|---|---|---|---|---|"]
    lines += [f"| {t.n} | {', '.join(f'{s} @ {d} s -> {c}' for s, d, c, _ in t.kills)} | {t.restarts} | {t.identical} | "
              f"{t.note} |" for t in trials]
    lines += ["", "| case | exit | message | ok |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['exit']} | {r['message'].replace('|', '/')} | {'yes' if r['ok'] else 'NO: ' + r['problems']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=30, help="kill trials (default 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "faults")
    ap.add_argument("--results", type=Path, default=None, help="write the markdown report here")
    ap.add_argument("--short", action="store_true", help="2 kills and the quick bad inputs (make test)")
    a = ap.parse_args(argv)
    n = 2 if a.short else a.kills
    t0 = time.monotonic()
    trials = kill_campaign(n, a.seed, a.out / "kills")
    rows = bad_inputs(a.out / "inputs", quick=a.short)
    text = report(trials, rows, time.monotonic() - t0, "python benchmarks/faults.py " + " ".join(argv or sys.argv[1:]))
    if a.results: a.results.parent.mkdir(parents=True, exist_ok=True); a.results.write_text(text)
    print("\n".join(text.splitlines()[:6]))
    ok = all(t.identical and t.clean_sigint for t in trials) and all(r["ok"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
