"""Low-overhead kernel launches: triton's own launch path the first time, then the compiled kernel's C launcher.

`kernel[grid](*args, **meta)` costs 10-20 µs of Python per call in triton 3.6 (argument binding and specialisation,
the cache-key string, a `LazyDict` of launch metadata, the launch hooks called through Python), which is most of
the time of a small loss. A `Launcher` stands for one specialisation of one kernel: a fixed grid, fixed constexprs
and fixed specialised arguments. Its first call goes through `kernel[grid](...)` (compiles if needed, and returns
the `CompiledKernel`); later calls call that kernel's C launcher directly, with the same positional arguments
triton would pass (`*bound_args.values()`: the runtime arguments, then the constexpr values).

The caller must key its `Launcher`s on everything triton specialises on, so that a cache hit is the same compiled
kernel triton would pick: the integer arguments' values (shapes, strides: triton specialises ints equal to 1 and
multiples of 16), the tensors' dtypes and the 16-byte alignment of every pointer argument (`data_ptr() % 16`). The
tensors it allocates itself (fresh from the caching allocator, 512-byte aligned) have a fixed alignment per key.

The fast path is skipped (triton's path is taken) under the interpreter, when a launch hook is registered (e.g. the
proton profiler), when the current CUDA device is not the one the kernel was loaded on, with an async-compile
kernel, or when `SSL_NB_FAST_LAUNCH=0` is set (read at import). Tested on the CPU against triton's own binder
(`tests/test_kernels.py::test_fast_launch_args`), and on the GPU by `tests/test_kernel_checks.py`'s `repeat_*` cases.
"""
from __future__ import annotations

import os

import torch
import triton

ENABLED = os.environ.get("SSL_NB_FAST_LAUNCH", "1").strip() != "0"

try:                                     # triton 3.6: launch hooks are HookChain objects (empty: nothing to call)
    from triton import knobs as _knobs
    _RT = _knobs.runtime
    _HookChain = type(_RT.launch_enter_hook)
    if _HookChain.__name__ != "HookChain": _RT = None
except Exception:                        # another triton: always take triton's own path
    _RT = None


def _hooks_idle() -> bool:
    e, x = _RT.launch_enter_hook, _RT.launch_exit_hook
    return type(e) is _HookChain and type(x) is _HookChain and not e.calls and not x.calls


class Launcher:
    """`kernel[grid](*args, **meta)` for one specialisation (see the module docstring); `launcher(*args)`."""
    __slots__ = ("kernel", "grid", "meta", "fast", "fast_calls")

    def __init__(self, kernel, grid, meta: dict):
        self.kernel, self.grid, self.meta = kernel, tuple(grid), dict(meta)
        self.fast = None          # set after the first launch on a GPU
        self.fast_calls = 0       # launches that took the fast path (tests, checks)

    def __call__(self, *args):
        f = self.fast
        if f and f(args): return
        ck = self.kernel[self.grid](*args, **self.meta)
        if f is None and ENABLED and _RT is not None and ck is not None:
            self.fast = _fast_path(self, ck, args) or False


def constexpr_tail(kernel, n_args: int, meta: dict) -> tuple:
    "The values triton appends after the `n_args` runtime arguments: every remaining parameter (constexprs), in order."
    names = kernel.arg_names
    return tuple(meta[n] for n in names[n_args:])


def _device_getter(drv):
    "The current CUDA device index (torch's C function: cheaper than torch.cuda.current_device)."
    return getattr(torch._C, "_cuda_getDevice", None) or drv.get_current_device


def _on_device(t: torch.Tensor, dev: int) -> bool:
    return t.is_cuda and t.get_device() == dev


def _fast_path(launcher: Launcher, ck, args):
    "A function(args) -> bool that launches `ck` directly (False: not taken, use triton's path), or None."
    try:
        if hasattr(ck, "result"): return None                      # async compilation future
        tail = constexpr_tail(launcher.kernel, len(args), launcher.meta)
        if len(args) + len(tail) != len(launcher.kernel.arg_names): return None
        if not _hooks_idle(): return None
        drv = triton.runtime.driver.active
        get_device = _device_getter(drv)
        get_stream = drv.get_current_stream
        dev = get_device()
        for a in args:
            if isinstance(a, torch.Tensor) and not _on_device(a, dev): return None
        run = ck.run                                              # the CudaLauncher (handles loaded by now)
        function, packed = ck.function, ck.packed_metadata
        g = launcher.grid + (1,) * (3 - len(launcher.grid))
        g0, g1, g2 = g
        c_launch = getattr(run, "launch", None)
        direct = (c_launch is not None and getattr(run, "global_scratch_size", 1) == 0
                  and getattr(run, "profile_scratch_size", 1) == 0 and hasattr(run, "launch_cooperative_grid")
                  and hasattr(run, "launch_pdl"))
    except Exception:
        return None
    if direct:
        coop, pdl = run.launch_cooperative_grid, run.launch_pdl

        def fast(args):
            if get_device() != dev or not _hooks_idle(): return False
            c_launch(g0, g1, g2, get_stream(dev), function, coop, pdl, None, None, packed, None, None, None,
                     *args, *tail)
            launcher.fast_calls += 1
            return True
    else:
        def fast(args):
            if get_device() != dev or not _hooks_idle(): return False
            run(g0, g1, g2, get_stream(dev), function, packed, None, None, None, *args, *tail)
            launcher.fast_calls += 1
            return True
    return fast

