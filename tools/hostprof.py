"""Host (Python) time per call of the Triton ops, measured on a machine without a GPU.

    python tools/hostprof.py [--calls 3000] [--no-direct]

The small ops are host-bound on a GPU, and their host path can be measured without one: the kernel modules are
imported in compiled mode (as on a GPU), triton's real launch path runs (binder, specialisation, cache key, launch
metadata, `CompiledKernel.run`) on a fake driver (`install_fake_driver`), and only the generated C launcher is
replaced by a Python stand-in that does what it does besides the CUDA calls (touch every argument, call `data_ptr()`
on each tensor; ~4 µs here, more than the C code). Tensors are CPU tensors, so allocations and the in-place backward
multiply are CPU ops. What this does not see: CUDA driver time (`cuLaunchKernelEx`, `cuPointerGetAttribute` per
pointer argument), the CUDA caching allocator, the autograd engine's hand-off to its CUDA device thread.

Also imported by `tests/test_kernels.py::test_fast_launch_args` (`install_fake_driver` with `record`), which checks
the arguments of every launch against triton's own binder.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":      # compiled-mode kernels: decided when triton and the kernel modules are imported
    os.environ["TRITON_INTERPRET"] = "0"

_FAKE = {"installed": False}


def install_fake_driver(record: list | None = None):
    """Make triton's compiled-mode launch path run without a GPU (call before the kernel modules launch anything).
    Each launch appends `(kind, function, kernel_args, grid, stream, extra)` to `record` when given: kind 'triton'
    (through `JITFunction.run`) or 'direct' (`_launch.Launcher`'s path); `function` is the triton cache key of the
    kernel that was "compiled" for the launch."""
    if _FAKE["installed"]: return
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class FakeDriver:
        def __init__(self):
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda i: 1234

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    def c_common(a):          # the generated C launcher, minus CUDA: hooks, data_ptr() of each tensor argument
        enter, exit_, lmeta = a[11], a[12], a[10]
        if enter is not None: enter(lmeta)
        for x in a[13:]:
            if isinstance(x, torch.Tensor): x.data_ptr()
        if exit_ is not None: exit_(lmeta)

    def c_launch(*a):         # entry point of `_launch.Launcher`'s direct path
        c_common(a)
        if record is not None: record.append(("direct", a[4], a[13:], a[:3], a[3], a[5:13]))

    class FakeRun:            # CudaLauncher
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid = launch_pdl = False
        num_ctas = 1

        def __init__(self):
            self.launch = c_launch

        def __call__(self, gridX, gridY, gridZ, stream, function, *args):     # triton's path, as CudaLauncher does
            def allocate_scratch(size, align, allocator):
                return None
            gs = allocate_scratch(self.global_scratch_size, 1, None)
            ps = allocate_scratch(self.profile_scratch_size, 1, None)
            a = (gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl, gs, ps, *args)
            c_common(a)
            if record is not None: record.append(("triton", function, a[13:], a[:3], a[3], None))

    class FakeCK:             # CompiledKernel: `function` is its triton cache key
        def __init__(self, key):
            self.name = "fake"
            self.function, self.packed_metadata, self.run, self.module = key, (4, 1, 0), FakeRun(), 1

        def launch_metadata(self, grid, stream, *args):       # as CompiledKernel's (launch hooks are never None)
            from triton import knobs
            from triton.compiler.compiler import LazyDict
            if knobs.runtime.launch_enter_hook is None: return None
            return LazyDict({"name": self.name, "function": self.function, "stream": stream})

    def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        ck = FakeCK(key)
        self.device_caches[device][0][key] = ck
        return ck

    driver.set_active(FakeDriver())
    JITFunction._do_compile = _do_compile
    from ssl_nb.kernels import _launch
    _launch._device_getter = lambda drv: (lambda: 0)        # CPU tensors stand for CUDA tensors on device 0
    _launch._on_device = lambda t, dev: True
    _FAKE["installed"] = True


def bench(fn, calls=3000, batches=15):
    "Min over `batches` of the mean time per call, µs (robust to other jobs sharing the CPU)."
    for _ in range(50): fn()
    n = max(20, calls // batches)
    best = float("inf")
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(n): fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--no-direct", action="store_true", help="every launch through triton's kernel[grid](...)")
    a = ap.parse_args(argv)
    install_fake_driver()
    if a.no_direct:
        from ssl_nb.kernels import _launch
        _launch.ENABLED = False
    import torch
    torch.set_num_threads(1)
    from ssl_nb.kernels import _triton_losses as TL, _triton_tokens as TT
    if TL.INTERPRETED: raise SystemExit("the kernels were imported in interpreter mode: run with TRITON_INTERPRET=0")
    TT.check_ids_values = lambda *args: None       # CPU-only value checks: they do not run on CUDA ids
    R, C = 448, 10
    zw, zm, zs = (torch.randn(R, C) for _ in range(3))
    zm.requires_grad_(); zs.requires_grad_()
    flex = (torch.rand(R) < 0.5).float()
    B, N, D, K = 8, 196, 64, 49
    x = torch.randn(B, N, D, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.argsort(torch.rand(B, N), 1)[:, :K]
    gout = torch.randn(B, K, D, dtype=torch.bfloat16)
    tok = torch.randn(B, K, D, dtype=torch.bfloat16, requires_grad=True)
    fill = torch.zeros(1, 1, D, dtype=torch.bfloat16, requires_grad=True)
    gsc = torch.randn(B, N, D, dtype=torch.bfloat16)

    def nograd():
        with torch.no_grad(): TL.sequencematch_loss(zw, zm, zs)

    class Trivial(torch.autograd.Function):
        @staticmethod
        def forward(ctx, zm, zs):
            return zs.new_empty(())

        @staticmethod
        def backward(ctx, g):
            return None, None

    rows = [
        ("SequenceMatch 448x10 forward (inputs need grad)", lambda: TL.sequencematch_loss(zw, zm, zs)),
        ("SequenceMatch forward + torch.autograd.grad", lambda: torch.autograd.grad(TL.sequencematch_loss(zw, zm, zs)[0],
                                                                                    [zm, zs])),
        ("SequenceMatch forward + .backward()", lambda: TL.sequencematch_loss(zw, zm, zs)[0].backward()),
        ("SequenceMatch forward + grad, FlexMatch mask",
         lambda: torch.autograd.grad(TL.sequencematch_loss(zw, zm, zs, mask=flex)[0], [zm, zs])),
        ("SequenceMatch forward under no_grad", nograd),
        ("FixMatch forward + grad", lambda: torch.autograd.grad(TL.fixmatch_loss(zw, zs)[0], [zs])),
        ("ReFixMatch forward + grad", lambda: torch.autograd.grad(TL.refixmatch_loss(zw, zs)[0], [zs])),
        (f"gather_tokens {B}x{N}x{D} bf16 keep {K}: forward", lambda: TT.gather_tokens(x, ids)),
        ("gather_tokens forward + grad", lambda: torch.autograd.grad(TT.gather_tokens(x, ids), x, gout)),
        ("scatter_tokens forward + grad", lambda: torch.autograd.grad(TT.scatter_tokens(tok, ids, N, fill), [tok, fill],
                                                                      gsc)),
        ("[floor] trivial autograd.Function: apply + torch.autograd.grad",
         lambda: torch.autograd.grad(Trivial.apply(zm, zs), [zm, zs], allow_unused=True)),
    ]
    print(f"host time per call, µs (min over batches; C launch emulated in Python; direct launches "
          f"{'off' if a.no_direct else 'on'}): python {sys.version.split()[0]}, torch {torch.__version__}")
    for name, fn in rows:
        print(f"{bench(fn, a.calls):8.1f}  {name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
