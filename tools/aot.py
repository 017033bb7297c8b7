"""Compile the ssl_nb.kernels kernels for an NVIDIA target on a machine without a GPU (a development check).

    python tools/aot.py      # every GPU configuration for sm_90a; one JSON line per kernel; exit 1 on a problem

The interpreter is more lenient than the compiler (globals, constexpr rules, layouts), so a kernel that passes its
interpreter tests can still fail to compile on the GPU. `capture()` swaps every kernel's launch for a compile-only
step: the same binder as a real launch specialises the (CPU) arguments exactly as it would for CUDA tensors of the
same shapes, strides and alignment, then `triton.compile` builds the cubin for `sm_90` with the ptxas bundled in
triton, and `ptxas -v` reports registers and spills. Kernels do not run (outputs stay uninitialised).

`tests/test_kernels.py` runs it. As a library, in a process with TRITON_INTERPRET unset or 0, calling the modules'
`launch`/`gather`/... functions directly:

    with capture() as log:
        _triton_losses.launch(...)
    log -> [{'kernel', 'constexprs', 'num_warps', 'registers', 'spill_bytes', 'ptx_vector_loads', ...}]
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import tempfile
from pathlib import Path

if __name__ == "__main__":      # compiled-mode kernels: decided when triton and the kernel modules are imported
    os.environ["TRITON_INTERPRET"] = "0"

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature


def _ptxas():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_info(ptx: str, arch: str = "sm_90a") -> dict:
    "Registers and spill bytes of the (single) kernel in `ptx`, from `ptxas -v`."
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        open(p, "w").write(ptx)
        r = subprocess.run([_ptxas(), f"-arch={arch}", "-v", p, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    txt = r.stdout + r.stderr
    regs = re.findall(r"Used (\d+) registers", txt)
    spill = re.findall(r"(\d+) bytes spill stores", txt)
    return dict(registers=int(regs[-1]) if regs else None, spill_bytes=int(spill[-1]) if spill else None)


def compile_launch(fn: JITFunction, args, kwargs, target=GPUTarget("cuda", 90, 32)):
    "Compile `fn[grid](*args, **kwargs)` for `target` exactly as the JIT would, without a driver."
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def ticket_after_own_store(ptx: str):
    """For a kernel with the one-launch sum (`_triton_common.sum_partials`): whether the acquire-release ticket is
    taken by the thread that stored the program's partial just before it (the same predicate on both instructions),
    which is what makes the partial visible before the ticket. None for a kernel without a ticket."""
    lines = ptx.splitlines()
    at = [i for i, l in enumerate(lines) if "atom.global.gpu.acq_rel" in l]
    if not at: return None
    pred = lambda l: (re.match(r"\s*@(%p\d+)", l) or [None, None])[1]
    stores = [l for l in lines[:at[0]] if "st.global" in l]
    return bool(stores) and pred(stores[-1]) is not None and pred(stores[-1]) == pred(lines[at[0]])


@contextlib.contextmanager
def capture(arch: str = "sm_90a"):
    "Within the block, `kernel[grid](...)` compiles for `arch` and records a summary instead of running."
    log = []
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        k = compile_launch(self, args, kwargs, GPUTarget("cuda", int(arch.split("_")[1].rstrip("a")), 32))
        ptx = k.asm["ptx"]
        const = {n: v for n, v in kwargs.items() if n[:1].isupper()}
        log.append(dict(kernel=self.__name__, constexprs=const, num_warps=k.metadata.num_warps, grid=str(grid),
                        shared_bytes=k.metadata.shared,
                        ptx_vector_loads=len(re.findall(r"ld\.global[^;]*\.v[248]", ptx)),
                        ptx_scalar_loads=len(re.findall(r"ld\.global(?![^;]*\.v[248])", ptx)),
                        ticket_after_own_store=ticket_after_own_store(ptx),
                        **ptxas_info(ptx, arch)))
        return None

    JITFunction.run = run
    try:
        yield log
    finally:
        JITFunction.run = orig


def gpu_configs():
    """Every kernel specialisation the benchmark and the common training calls use on a GPU, launched on CPU
    tensors of the same shapes (inside `capture`, nothing runs)."""
    import torch
    from ssl_nb.kernels import _triton_common as TC, _triton_losses as TL, _triton_mae as TM, _triton_tokens as TT
    spec = importlib.util.spec_from_file_location("kernels_benchmark", Path(__file__).resolve().parents[1] /
                                                  "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
    tuning_variants, LOSS_SHAPES = bench.tuning_variants, bench.LOSS_SHAPES
    f32, bf16 = torch.float32, torch.bfloat16
    for (R, C, dt) in LOSS_SHAPES + [(448, 13, f32), (64, 5000, f32)]:
        z = [torch.empty(R, C, dtype=dt) for _ in range(3)]
        TL.launch(z[0], None, z[2], None, 0.95, 0.5, False, False, True)           # fixmatch
        TL.launch(z[0], None, z[2], None, 0.95, 0.5, False, True, True)            # refixmatch
        TL.launch(z[0], z[1], z[2], None, 0.95, 0.5, True, False, True)            # sequencematch
    z = [torch.empty(32768, 1000, dtype=bf16) for _ in range(3)]
    for cfg in tuning_variants("sequencematch", 32768, 1000):                       # the benchmark's tuning variants
        TL.launch(z[0], z[1], z[2], None, 0.95, 0.5, True, False, True, config=cfg)
    for cfg in tuning_variants("fixmatch", 32768, 1000):
        TL.launch(z[0], None, z[2], None, 0.95, 0.5, False, False, True, config=cfg)    # fixmatch (2-sum)
        TL.launch(z[0], None, z[2], None, 0.95, 0.5, False, True, True, config=cfg)     # refixmatch (3-sum)
    for (R, C, dt) in LOSS_SHAPES[:2]:
        z = [torch.empty(R, C, dtype=dt) for _ in range(3)]
        for cfg in tuning_variants("sequencematch", R, C):
            TL.launch(z[0], z[1], z[2], None, 0.95, 0.5, True, False, True, config=cfg)
    for dt in (f32, bf16):                                                          # backward: in-place scale
        n = 2 * 448 * 10
        TC.scale_(torch.empty(n, dtype=dt), torch.empty(()), TC.scale_launcher(n))
    TC.sum_over_programs(torch.empty(1 << 19), 4)                                   # the one-launch sum alone
    z = [torch.empty(448, 10) for _ in range(3)]
    TL.launch(z[0], z[1], z[2], torch.empty(448), 0.95, 0.5, True, True, True)     # FlexMatch mask, low_conf_kl
    TL.launch(z[0], z[1], z[2], None, 0.95, 0.5, True, False, False)               # no gradient (evaluation)
    for K in (49, 98):
        x = torch.empty(256, 196, 768, dtype=bf16)
        ids = torch.empty(256, K, dtype=torch.long)
        tok = torch.empty(256, K, 768, dtype=bf16)
        inv = torch.empty(256, 196, dtype=torch.int32)
        TT.gather(x, ids, write_inv=True)                                           # gather forward (+ inverse)
        TT.gather(x, ids)                                                           # gather forward, no grad
        TT.take(tok, inv, 196, inv=inv)                                             # gather backward
        TT.take(tok, ids, 196, fill=torch.empty(1, 1, 768), write_inv=True)         # scatter forward (+ inverse)
        TT.take(tok, ids, 196, fill=torch.empty(768, dtype=bf16))                   # scatter forward, no grad
        TT.scatter_grads(x, ids, inv, True, True)                                   # scatter backward
        TT.scatter_grads(x, ids, inv, False, True)
    x = torch.empty(256, 49, 512, dtype=bf16)                                       # MAE decoder width, int32 ids
    TT.take(x, torch.empty(256, 49, dtype=torch.int32), 196, fill=torch.empty(512), write_inv=True)
    for dt in (f32, bf16):
        TM.launch(torch.empty(256, 196, 768, dtype=dt), torch.empty(256, 3, 224, 224), torch.empty(256, 196), 16,
                  True, True)
    TM.launch(torch.empty(8, 196, 768), torch.empty(8, 3, 224, 224), torch.empty(8, 196), 16, False, False)


def main():
    """Compile gpu_configs() for sm_90a; print one JSON line per kernel; exit 1 on a spill, an unvectorised loss load
    or a one-launch sum's ticket taken by another thread than its partial's store."""
    import json
    import time
    os.environ["TRITON_INTERPRET"] = "0"          # compiled-mode kernels (set before the modules are imported)
    t = time.time()
    with capture() as log:
        gpu_configs()
    bad = []
    for r in log:
        print(json.dumps(r), flush=True)
        if r["spill_bytes"]: bad.append(f"{r['kernel']} spills {r['spill_bytes']} bytes")
        if r["ticket_after_own_store"] is False: bad.append(f"{r['kernel']} {r['constexprs']}: the ticket is not "
                                                             f"taken by the thread that stored the partial")
        if r["shared_bytes"] > 160 * 1024: bad.append(f"{r['kernel']} needs {r['shared_bytes']} bytes of shared memory")
        if r["kernel"] == "_consistency_kernel" and r["constexprs"].get("ALIGN", 1) >= 4 and not r["ptx_vector_loads"]:
            bad.append(f"{r['kernel']} {r['constexprs']}: no vector loads")
    print(f"compiled {len(log)} kernels for sm_90a in {time.time() - t:.1f}s; problems: {bad or 'none'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
