"""Tests of ssl_nb.kernels around the kernels' values (those are in test_kernel_checks.py): dispatch errors, the
sm_90a build (tools/aot.py), the direct launch path on a fake driver (tools/hostprof.py), pick_config's GPU layouts,
the benchmark's dry run (benchmarks/kernels.py) and the GPU check script (tools/gpu_check.sh). Everything that
imports triton runs in a child process, so this process never does.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TRITON_INTERPRET": "1", "SSL_NB_KERNELS": "triton", "PYTHONWARNINGS": "ignore"}
TIMEOUT = 600


def _py(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


def test_compiled_mode_error():
    """A CPU tensor forced onto Triton when the kernels were loaded in compiled mode (here: TRITON_INTERPRET=0 set
    explicitly) raises ConfigError saying what to do, instead of triton's '0 active drivers'."""
    p = _py("import os, torch\n"
            "os.environ.pop('TRITON_INTERPRET', None); os.environ['TRITON_INTERPRET'] = '0'\n"
            "import ssl_nb.kernels as K\nfrom ssl_nb.core import ConfigError\n"
            "z = torch.randn(4, 10)\n"
            "try:\n    K.fixmatch_loss(z, z)\nexcept ConfigError as e:\n    print('CONFIGERROR', e)\n",
            SSL_NB_KERNELS="triton")
    assert "CONFIGERROR" in p.stdout and "TRITON_INTERPRET=1" in p.stdout, p.stdout + p.stderr


def test_triton_imported_first_error():
    """triton imported in compiled mode before the Triton path is taken (its own tl.max/tl.sum are then compiled-mode
    functions, which the interpreter cannot call): a clear ConfigError, not an InterpreterError from inside a kernel.
    With TRITON_INTERPRET=1 set first, importing triton early is fine."""
    code = ("import os, torch, triton\nimport ssl_nb.kernels as K\nfrom ssl_nb.core import ConfigError\n"
            "z = torch.randn(16, 10)\n"
            "try:\n    K.fixmatch_loss(z, z)\nexcept ConfigError as e:\n    print('CONFIGERROR', e)\n"
            "else:\n    print('OK')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                       env={**env, "SSL_NB_KERNELS": "triton", "PYTHONWARNINGS": "ignore"})
    assert "CONFIGERROR" in p.stdout and "before anything imports triton" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                       env={**env, "SSL_NB_KERNELS": "triton", "PYTHONWARNINGS": "ignore", "TRITON_INTERPRET": "1"})
    assert p.stdout.strip() == "OK", p.stdout + p.stderr


def test_bad_backend_name():
    from ssl_nb.core import ConfigError
    import ssl_nb.kernels as K
    old = os.environ.get("SSL_NB_KERNELS")
    os.environ["SSL_NB_KERNELS"] = "cuda-please"
    try:
        with pytest.raises(ConfigError, match="SSL_NB_KERNELS"):
            K.fixmatch_loss(torch.randn(2, 3), torch.randn(2, 3))
    finally:
        if old is None: os.environ.pop("SSL_NB_KERNELS")
        else: os.environ["SSL_NB_KERNELS"] = old


def test_compiles_for_sm90():
    """The interpreter is more lenient than the compiler: build every GPU configuration for sm_90a with triton's
    bundled ptxas (no GPU needed) and check for register spills and unvectorised loads."""
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "aot.py")], capture_output=True, text=True,
                       timeout=TIMEOUT, env={**os.environ, "TRITON_INTERPRET": "0"})
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]


def test_ticket_check_of_the_sm90_build():
    """tools/aot.py's check on the one-launch sum's PTX (test_compiles_for_sm90 runs it on the real kernels) tells a
    ticket taken by the thread that stored the partial from one taken by another thread, or with no partial stored."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r})\nfrom aot import ticket_after_own_store as t\n"
            "ok = '@%p5 st.global.b32 [a], {r};\\nbar.sync 0;\\n@%p5 atom.global.gpu.acq_rel.add.u32 %r1, [b], %r2;'\n"
            "print(t(ok), t(ok.replace('@%p5 st', '@%p6 st')), t(ok.split('\\n', 1)[1]), t('ld.global.b32'))")
    p = _py(code, TRITON_INTERPRET="0")
    assert p.returncode == 0 and p.stdout.split() == ["True", "False", "False", "None"], p.stdout + p.stderr[-2000:]


def test_pick_config_gpu_layouts():
    """pick_config's GPU layouts (their timings: benchmarks/results/kernels-h100.md): 448 x 10 spread over 28 programs
    of 16 rows with the loss summed in the same launch; a batch of <= 4 tiles in one program; one row per program at
    C = 1000 below 8192 rows, summed by a second launch; 16 prefetched rows per SequenceMatch program above."""
    code = ("from ssl_nb.kernels._triton_losses import pick_config as p\n"
            "for R, C, v in ((448, 10, 3), (448, 10, 2), (61, 10, 3), (448, 100, 3), (1280, 1000, 3), (32768, 1000, 3),"
            " (32768, 1000, 2)):\n"
            "    c = p(R, C, interpret=False, views=v)\n"
            "    print(-(-R // (c['BLOCK_R'] * c['ROW_TILES'])), c['BLOCK_R'], c['ROW_TILES'], c['LAST_PROGRAM_SUMS'])")
    p = _py(code, TRITON_INTERPRET="0")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines() == ["28 16 1 True", "28 16 1 True", "1 16 4 True", "28 16 1 True", "1280 1 1 False",
                                     "2048 1 16 True", "32768 1 1 False"], p.stdout


# The direct launch path (`_launch.Launcher`) checked on the CPU: triton's compiled-mode launch path runs for real
# (binder, specialisation, cache key) on a fake driver (`tools/hostprof.py`) whose "compiled kernel" is named by
# its cache key; every launch, through triton or direct, must pass exactly the arguments triton's binder produces for
# the call, to the kernel triton would pick for them (same specialisation: dtypes, 16-byte alignment, ints equal to 1
# or multiples of 16).
FAST_LAUNCH_SCRIPT = r'''
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.runtime.jit import compute_cache_key
from triton import knobs
sys.path.insert(0, os.environ["SSL_NB_TOOLS"])
from hostprof import install_fake_driver
LOG = []
install_fake_driver(record=LOG)
import ssl_nb.kernels._launch as LA
STATS = {"triton": 0, "direct": 0}

def expected(launcher, args):
    k = launcher.kernel
    kw = dict(launcher.meta)
    kw["debug"] = k.debug or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    _, kkc, _, _, binder = k.device_caches[0]
    bound, spec, options = binder(*args, **kw)
    return compute_cache_key(kkc, spec, options), tuple(bound.values())

orig_call = LA.Launcher.__call__
def call(self, *args):
    n = len(LOG)
    orig_call(self, *args)
    assert len(LOG) == n + 1, "one launch per call"
    kind, function, passed, grid, stream, extra = LOG[-1]
    key, bound = expected(self, args)
    name = self.kernel.__name__
    assert function == key, f"{kind} launch of {name}: the cached kernel's specialisation differs from this call's"
    assert len(passed) == len(bound), f"{kind} launch of {name}: {len(passed)} arguments, triton passes {len(bound)}"
    for i, (a, b) in enumerate(zip(passed, bound)):
        assert a is b or (type(a) is type(b) and a == b), f"{kind} launch of {name}: argument {i}: {a!r} != {b!r}"
    assert grid == tuple(self.grid) + (1,) * (3 - len(self.grid)) and stream == 1234, (grid, stream)
    if kind == "direct":
        assert extra == (False, False, None, None, (4, 1, 0), None, None, None), extra
    STATS[kind] += 1
LA.Launcher.__call__ = call

from ssl_nb.kernels import _triton_losses as TL, _triton_mae as TM, _triton_tokens as TT
f32, bf16 = torch.float32, torch.bfloat16
def z(R, C, dt, off=0, grad=False):
    t = torch.randn(R * C + off, dtype=dt)[off:].view(R, C)
    return t.requires_grad_() if grad else t
for rep in range(2):
    for (R, C, dt) in ((448, 10, f32), (64, 1000, bf16), (3, 1, f32), (16, 16, f32)):
        for off in (0, 1):
            zw, zm, zs = z(R, C, dt, off), z(R, C, dt, 0, True), z(R, C, dt, off, True)
            TL.fixmatch_loss(zw, zs)[0].backward()
            TL.refixmatch_loss(zw, zs)[0].backward()
            TL.sequencematch_loss(zw, zm, zs)[0].backward()
            TL.sequencematch_loss(zw, zm, zs, mask=torch.rand(R + off)[off:], low_conf_kl=True)[0].backward()
            TL.sequencematch_loss(zw, zm, zs, _config=dict(LAST_PROGRAM_SUMS=True))[0].backward()   # slot per call
            with torch.no_grad(): TL.sequencematch_loss(zw, zm, zs)
    for (B, N, K, D, dt, it) in ((4, 196, 49, 768, bf16, torch.int64), (2, 37, 11, 100, f32, torch.int32)):
        for off in (0, 1):
            x = torch.randn(B * N * D + off, dtype=dt)[off:].view(B, N, D).requires_grad_()
            ids = torch.argsort(torch.rand(B, N), 1)[:, :K].to(it)
            ids = torch.cat([torch.zeros(off, dtype=it), ids.reshape(-1)])[off:].view(B, K)
            torch.autograd.grad(TT.gather_tokens(x, ids), x, torch.randn(B, K, D, dtype=dt))
            tok = torch.randn(B, K, D, dtype=dt, requires_grad=True)
            fill = torch.randn(1, 1, D, requires_grad=True)
            torch.autograd.grad(TT.scatter_tokens(tok, ids, N, fill), [tok, fill], torch.randn(B, N, D, dtype=dt))
            torch.autograd.grad(TT.scatter_tokens(tok, ids, N, fill.detach()), [tok], torch.randn(B, N, D, dtype=dt))
            with torch.no_grad(): TT.gather_tokens(x, ids); TT.scatter_tokens(tok, ids, N, fill)
    for dt in (f32, bf16):                         # the MAE loss's backward: the shared in-place scale
        pred = torch.randn(2, 4, 48, dtype=dt, requires_grad=True)
        torch.autograd.grad(TM.masked_patch_mse(pred, torch.randn(2, 3, 8, 8), torch.ones(2, 4), 4), pred)
assert STATS["direct"] > 0 and STATS["triton"] > 0, STATS
# every specialisation was launched through triton once, then directly
assert STATS["direct"] >= STATS["triton"], STATS
print("OK", STATS)
'''


def test_fast_launch_args():
    p = _py(FAST_LAUNCH_SCRIPT, TRITON_INTERPRET="0", SSL_NB_TOOLS=str(ROOT / "tools"))
    assert p.returncode == 0 and p.stdout.startswith("OK"), p.stdout[-3000:] + p.stderr[-3000:]


def test_bench_dry_run(tmp_path):
    """The benchmark script end to end on the CPU (interpreter, tiny shapes, torch.compile rows with aot_eager): every
    row measured without error, the Triton op inside torch.compile included, and the four output files written."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--dry-run", "--out", str(tmp_path),
                        "--only", "losses,tokens"], capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r.get("error")], [r for r in rows if r.get("error")]
    impls = {(r["op"], r["impl"], r["mode"]) for r in rows}
    for op in ("sequencematch_loss", "gather_tokens"):
        for impl in ("triton", "triton[torch.compile]"):
            assert (op, impl, "fwd+bwd") in impls, (op, impl)
    assert all((tmp_path / f).exists() for f in ("bench.md", "bench.csv", "env.json"))


def test_bench_tuning_summary():
    """bench.md's layout summary names, per loss and shape, the variant with the least GPU time of fwd+bwd (graph ms),
    compares it with pick_config's layout and eager, and skips shapes without variants or without graph times."""
    spec = importlib.util.spec_from_file_location("kernels_benchmark", ROOT / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    b = bench.Bench.__new__(bench.Bench)
    row = lambda shape, impl, ms, mode="fwd+bwd": dict(op="sequencematch_loss", shape=shape, impl=impl, mode=mode,
                                                       graph_ms=ms)
    b.rows = [row("448x10", "triton", 0.02), row("448x10", "eager", 0.12), row("448x10", "triton[A]", 0.008),
              row("448x10", "triton[B]", 0.01), row("448x10", "triton[A]", 0.001, mode="fwd"),
              row("448x100", "triton", 0.008), row("448x100", "eager", 0.13),        # no variant: not listed
              row("32768", "triton", 0.3), row("32768", "triton[C]", None)]          # no graph time: not listed
    lines = [x for x in b.tuning_summary() if x.startswith("- ")]
    assert len(lines) == 1 and "fastest triton[A] 0.0080 ms" in lines[0], lines
    assert "pick_config's layout 0.0200 ms (-60%)" in lines[0] and f"fastest ×{0.12 / 0.008:.1f}" in lines[0], lines


def test_gpu_check_script_passes_options(tmp_path):
    """tools/gpu_check.sh with `echo` standing in for python, without a GPU: the checks are `pytest -m cuda` on
    test_kernel_checks.py and test_train.py (CHECKS_CASES: those cases' node ids instead of the files; CHECKS_ARGS:
    more pytest options), the benchmark is benchmarks/kernels.py with BENCH_ARGS, and each step writes its log under OUT."""
    script = ROOT / "tools" / "gpu_check.sh"
    env = {**os.environ, "PYTHON": "echo", "BENCH_ARGS": "--no-compile --only losses"}
    p = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
    checks, bench = (tmp_path / "checks.log").read_text().split(), (tmp_path / "bench.log").read_text().split()
    tests = str(ROOT / "tests" / "test_kernel_checks.py")
    assert checks[:6] == ["-m", "pytest", tests, str(ROOT / "tests" / "test_train.py"), "-m", "cuda"], checks
    assert bench[0] == str(ROOT / "benchmarks" / "kernels.py") and bench[1:3] == ["--out", str(tmp_path)], bench
    assert bench[-3:] == ["--no-compile", "--only", "losses"], bench
    assert "done: checks=0 bench=0" in p.stdout, p.stdout[-2000:]
    env.update(CHECKS_CASES="sum_over_programs losses_last_program_sums", CHECKS_ARGS="-x")
    subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=60, env=env)
    checks = (tmp_path / "checks.log").read_text().split()
    assert checks[2:4] == [f"{tests}::test_cuda[sum_over_programs]", f"{tests}::test_cuda[losses_last_program_sums]"]
    assert checks[-1] == "-x", checks

