"""Correctness checks of every ssl_nb.kernels op against its PyTorch reference: values and gradients on seeded
random inputs, Triton's interpreter on the CPU and compiled Triton on a GPU. `cases(device)` names them.

pytest runs them as two parametrized tests:
- `test_interpreter[case]` (every run): the CPU cases, in child processes with TRITON_INTERPRET=1 (an out-of-bounds
  access under the interpreter kills its process: a dead child costs one case, and a new child goes on with the
  rest). The pytest process itself never imports triton.
- `test_cuda[case]` (marker `cuda`, see conftest.py; skipped without CUDA or with TRITON_INTERPRET=1): the same cases
  plus the benchmark's shapes on the GPU, in this process. `tools/gpu_check.sh` runs them with `-m cuda`.

The same cases from the command line, one line per case (`START name`, then `PASS name ...` / `FAIL name ...`,
flushed, so that a parent process can tell which case was running if the process dies):

    python tests/test_kernel_checks.py --device cpu           # TRITON_INTERPRET=1 is set for you
    python tests/test_kernel_checks.py --device cuda --cases sum_over_programs
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from ssl_nb import losses as L
from ssl_nb.core import ConfigError
from ssl_nb.kernels import reference as R
from ssl_nb.kernels._runtime import triton_module


def _load_benchmark():
    "benchmarks/kernels.py (a script, not a package): its input generator `logits` and its shapes."
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("kernels_benchmark", path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


BENCH = _load_benchmark()

# Tolerances: Liger-Kernel's (fp32 atol 1e-8 / rtol 1e-6; bf16 rtol 5e-2), plus an absolute part relative to the
# gradient's scale (`ascale` * max|ref|). fp32: 1e-6, for the GPU's approximate exp/log (ex2.approx / lg2.approx,
# ~2e-7 relative) on gradients divided by few rows. bf16: one bf16 ulp (2^-7), since the reference sums several
# bf16-rounded gradient terms (one per `.float()` in ssl_nb.losses) where the kernel rounds once, and Triton's
# interpreter truncates fp32 -> bf16 where the GPU rounds to nearest.
TOL = {torch.float32: dict(atol=1e-8, rtol=1e-6, ascale=1e-6),
       torch.bfloat16: dict(atol=1e-8, rtol=5e-2, ascale=2 ** -7),
       torch.float16: dict(atol=1e-8, rtol=1e-3, ascale=2 ** -10)}
LOSS_TOL = dict(atol=1e-6, rtol=2e-6)      # the loss is an fp32 reduction whatever the input dtype


def compare(name, got, want, atol, rtol, ascale=0.0):
    "(ok, message): elementwise |got - want| <= atol + ascale * max|want| + rtol * |want| (NaNs must coincide)."
    if got is None or want is None:
        return (got is None) == (want is None), f"{name}: {'missing' if got is None else 'unexpected'} tensor"
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    if got.shape != want.shape: return False, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0: return True, f"{name}: empty"
    err = (got - want).abs()
    scale = float(want.abs().max()) if want.numel() else 0.0
    bound = atol + ascale * scale + rtol * want.abs()
    same_nan = got.isnan() & want.isnan()
    bad = ~((err <= bound) | same_nan)
    n = int(bad.sum())
    return n == 0, f"{name}: max|err|={float(err[~same_nan].max()) if (~same_nan).any() else 0:.3g} " \
                   f"max|ref|={scale:.3g}{f' BAD {n}/{err.numel()}' if n else ''}"


# ---------------------------------------------------------------------------------------------------------- inputs
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def logits(R_, C, dtype, device, seed, layout="contiguous"):
    """The benchmark's logits (a spike on a random class, no confidence near 0.95: `BENCH.logits`) in a memory
    layout: 'contiguous', 'colstride' (every other column of a wider tensor), 'rowpad' (rows of a wider tensor),
    'transposed' (a [C, R] tensor's transpose), 'offset' (4 bytes past a 16-byte boundary); or 'ties' (values in
    {0, 2, 4}: most rows have several maxima, so the pseudo-label tests the first-maximum rule; no row is
    confident)."""
    if layout == "ties":
        z = (torch.randint(0, 3, (R_, C), generator=_gen(seed)) * 2.0).to(dtype)
    else:
        z = BENCH.logits(R_, C, dtype, "cpu", seed)
    if layout == "colstride":
        big = torch.zeros(R_, 2 * C, dtype=dtype); big[:, ::2] = z; z = big.to(device)[:, ::2]
    elif layout == "rowpad":
        big = torch.zeros(R_, C + 7, dtype=dtype); big[:, :C] = z; z = big.to(device)[:, :C]
    elif layout == "transposed":
        z = z.t().contiguous().to(device).t()
    elif layout == "offset":     # contiguous, but 4 bytes past a 16-byte boundary (another launcher key)
        big = torch.zeros(R_ * C + 8, dtype=dtype, device=device); big[1:1 + R_ * C] = z.reshape(-1).to(device)
        z = big[1:1 + R_ * C].view(R_, C)
    else:
        z = z.to(device)
    return z


# ------------------------------------------------------------------------------------------------------------ losses
def check_loss(kind, R_, C, dtype, device, config=None, mask_mode=None, threshold=0.95, T=0.5, low_conf=False,
               layout="contiguous", grad_scale=2.0, seed=0, grad_misaligned=False, tol=None, dtypes=None,
               kl_mask=None):
    """One loss on one set of inputs: loss, mask and gradients (of grad_scale * loss) against ssl_nb.losses.
    grad_misaligned: grad_output is a 0-dim view 4 bytes past a 16-byte boundary (the backward's fallback path).
    tol: tolerances instead of TOL[dtype]; dtypes: one dtype per view (mixed dtypes), instead of `dtype` for all."""
    TLm = triton_module("_triton_losses", torch.device(device))
    views = 3 if kind == "sequencematch" else 2
    dtypes = dtypes or [dtype] * views
    zs_ = [logits(R_, C, dt, device, seed + i, layout=layout) for i, dt in enumerate(dtypes)]
    mask = None
    if mask_mode == "external":                     # a FlexMatch-like mask, independent of the threshold
        mask = (torch.rand(R_, generator=_gen(seed + 9)) < 0.4).float().to(device)
    elif mask_mode in ("ones", "zeros"):
        mask = torch.full((R_,), 1.0 if mask_mode == "ones" else 0.0, device=device)
    elif mask_mode == "bool":
        mask = (torch.rand(R_, generator=_gen(seed + 9)) < 0.5).to(device)
    kw = dict(threshold=threshold, mask=mask)
    if kind != "fixmatch": kw["T"] = T
    if kind == "sequencematch": kw["low_conf_kl"] = low_conf
    if kl_mask is not None: kw["kl_mask"] = kl_mask
    out = {}
    for impl in ("ref", "triton"):
        ins = [zs_[0]] + [z.detach().clone().requires_grad_() for z in zs_[1:]]
        fn = getattr(L, f"{kind}_loss") if impl == "ref" else getattr(TLm, f"{kind}_loss")
        extra = {} if impl == "ref" else dict(_config=config)
        loss, m = fn(*ins, **kw, **extra)
        if grad_misaligned:
            loss.backward(torch.full((4,), grad_scale, device=device)[1])
        else:
            (loss * grad_scale).backward()
        out[impl] = (loss, m, [z.grad for z in ins[1:]])
    if tol is None and TLm.INTERPRETED and dtype is torch.float32 and C >= 512 and (config or {}).get("FUSED_REDUCE"):
        # the interpreter runs a multi-operand tl.reduce as a sequential fp32 loop over the row (triton's
        # `generic_reduce`), whose rounding grows with C where the GPU's reduction tree and torch's pairwise sums do
        # not: up to ~2x the fp32 bound at C = 1000 (the same cases pass the default bound on an H100)
        tol = dict(TOL[dtype], ascale=4e-6)
    tol = tol or TOL[dtype]
    res = [compare("loss", out["triton"][0], out["ref"][0], **LOSS_TOL),
           compare("mask", out["triton"][1], out["ref"][1], 0.0, 0.0)]
    for name, g1, g2 in zip(["grad_m", "grad_s"][-(views - 1):], out["triton"][2], out["ref"][2]):
        res.append(compare(name, g1, g2, **tol))
    mfrac = float(out["ref"][1].float().mean())
    ok = all(r[0] for r in res) and bool(torch.isfinite(out["triton"][0]))
    return ok, f"mask={mfrac:.2f} " + "; ".join(r[1] for r in res)


def check_grad_of_grad(device):
    """A backward with create_graph=True through a fused op (a gradient penalty) raises: the gradients the forward
    kernel wrote are constants to autograd, so second-order terms would silently be 0."""
    TLm = triton_module("_triton_losses", torch.device(device))
    TT = triton_module("_triton_tokens", torch.device(device))
    zw, zm, zs = (logits(32, 10, torch.float32, device, s) for s in range(3))
    zs.requires_grad_()
    x = torch.randn(2, 20, 16, device=device, requires_grad=True)
    ids = _ids(2, 20, 5, torch.int64, device, 0)
    out = []
    for name, y, wrt in [("loss", lambda: TLm.sequencematch_loss(zw, zm, zs)[0], zs),
                         ("gather", lambda: TT.gather_tokens(x, ids).square().sum(), x)]:
        try:
            torch.autograd.grad(y(), wrt, create_graph=True)
            out.append((False, f"{name}: create_graph=True did not raise"))
        except RuntimeError as e:
            out.append(("first-order gradients only" in str(e), f"{name}: {str(e)[:70]}"))
    return all(o[0] for o in out), "; ".join(o[1] for o in out)


def check_loss_nograd(device):
    "Inputs that need no gradient (evaluation): the kernel skips the gradient stores; same loss and mask."
    TLm = triton_module("_triton_losses", torch.device(device))
    zw, zm, zs = (logits(96, 37, torch.float32, device, s) for s in range(3))
    with torch.no_grad():
        a = TLm.sequencematch_loss(zw, zm, zs, low_conf_kl=True)
    b = L.sequencematch_loss(zw, zm, zs, low_conf_kl=True)
    r = [compare("loss", a[0], b[0], **LOSS_TOL), compare("mask", a[1], b[1], 0, 0)]
    return all(x[0] for x in r) and not a[0].requires_grad, "; ".join(x[1] for x in r)


# ------------------------------------------------------------------------------------------------------------ tokens
def _ids(B, N, K, itype, device, seed):
    return torch.argsort(torch.rand(B, N, generator=_gen(seed)), 1)[:, :K].to(itype).to(device)


def check_tokens(B, N, K, D, dtype, itype, device, config=None, layout="contiguous", seed=0):
    "gather_tokens and scatter_tokens, forward and backward (to x, tokens and fill), against MAE's formulation."
    TT = triton_module("_triton_tokens", torch.device(device))
    g = _gen(seed)
    x = torch.randn(B, N, D, generator=g).to(dtype)
    if layout == "noncontig":              # [B, N, D] view of a wider tensor, and a batch-strided view
        big = torch.zeros(B, N, D + 8, dtype=dtype); big[..., :D] = x; x = big.to(device)[..., :D]
    elif layout == "offset":               # contiguous, one element past a 16-byte boundary (another launcher key)
        big = torch.zeros(B * N * D + 1, dtype=dtype); big[1:] = x.reshape(-1); x = big.to(device)[1:].view(B, N, D)
    else:
        x = x.to(device)
    ids = _ids(B, N, K, itype, device, seed + 1)
    gout = torch.randn(B, K, D, generator=g).to(dtype).to(device)
    tok = torch.randn(B, K, D, generator=g).to(dtype).to(device)
    fill = torch.randn(1, 1, D, generator=g).to(device)          # MAE's fp32 mask_token parameter
    gsc = torch.randn(B, N, D, generator=g).to(dtype).to(device)
    if layout == "noncontig": gsc = gsc.transpose(0, 1).contiguous().transpose(0, 1)   # strided grad_output
    res = []
    for impl in ("ref", "triton"):
        xi = x.detach().clone().requires_grad_() if layout == "contiguous" else x.detach().requires_grad_()
        ti, fi = tok.detach().clone().requires_grad_(), fill.detach().clone().requires_grad_()
        if impl == "ref":
            o1 = R.gather_tokens_ref(xi, ids); o2 = R.scatter_tokens_ref(ti, ids, N, fi)
        else:
            o1 = TT.gather_tokens(xi, ids, _config=config); o2 = TT.scatter_tokens(ti, ids, N, fi, _config=config)
        gx, = torch.autograd.grad(o1, xi, gout)
        gt, gf = torch.autograd.grad(o2, [ti, fi], gsc)
        res.append((o1, gx, o2, gt, gf))
    (a1, a2, a3, a4, a5), (b1, b2, b3, b4, b5) = res[1], res[0]
    # grad_fill is a sum over B * (N - K) rows, in another order than the reference's: its absolute tolerance is
    # relative to its scale (fp32: 1e-6; bf16 tokens: the reference sums in bf16, then casts to fill's fp32)
    tol = TOL[dtype]
    ftol = dict(atol=1e-8, rtol=1e-6, ascale=1e-6) if dtype == torch.float32 else dict(atol=1e-6, rtol=1e-2,
                                                                                       ascale=2 ** -7)
    r = [compare("gather", a1, b1, 0, 0), compare("grad_x", a2, b2, 0, 0), compare("scatter", a3, b3, **tol),
         compare("grad_tokens", a4, b4, 0, 0), compare("grad_fill", a5, b5, **ftol)]
    shapes_ok = a5.shape == fill.shape and a5.dtype == fill.dtype and a3.dtype == dtype
    return all(x[0] for x in r) and shapes_ok, "; ".join(x[1] for x in r) + ("" if shapes_ok else " BAD dtype/shape")


def _ref_inverse(ids, N):
    "inv[b, n] = k where ids[b, k] == n, else -1 (int32 [B, N]), on the CPU."
    ids = ids.long().cpu()
    B, K = ids.shape
    return torch.full((B, N), -1, dtype=torch.int32).scatter_(1, ids, torch.arange(K, dtype=torch.int32).expand(B, K))


def check_tokens_modes(B, N, K, D, dtype, itype, device, config=None, seed=0):
    """The inverse index itself (written by the gather forward and by the scatter forward), and the paths the main
    token case does not take: no gradient at all, a gradient to the tokens only, to the fill token only (grad_output
    != 1 everywhere); an fp32 [D] fill with bf16 tokens."""
    TT = triton_module("_triton_tokens", torch.device(device))
    g = _gen(seed)
    x = torch.randn(B, N, D, generator=g).to(dtype).to(device)
    ids = _ids(B, N, K, itype, device, seed + 1)
    tok = torch.randn(B, K, D, generator=g).to(dtype).to(device)
    fill = torch.randn(D, generator=g).to(device)
    gsc = (3 * torch.randn(B, N, D, generator=g)).to(dtype).to(device)
    want_inv = _ref_inverse(ids, N)
    r = [compare("inv(gather)", TT.gather(x, ids, write_inv=True, config=config)[1], want_inv, 0, 0),
         compare("inv(scatter)", TT.take(tok, ids, N, fill=fill, write_inv=True, config=config)[1], want_inv, 0, 0)]
    with torch.no_grad():
        r.append(compare("gather nograd", TT.gather_tokens(x, ids, _config=config), R.gather_tokens_ref(x, ids), 0, 0))
        r.append(compare("scatter nograd", TT.scatter_tokens(tok, ids, N, fill, _config=config),   # fill cast
                         R.scatter_tokens_ref(tok, ids, N, fill), **TOL[dtype]))
    out = {}
    for impl in ("ref", "triton"):
        f = R.scatter_tokens_ref if impl == "ref" else (lambda *a: TT.scatter_tokens(*a, _config=config))
        ti = tok.detach().clone().requires_grad_()
        gt, = torch.autograd.grad(f(ti, ids, N, fill), ti, gsc)                      # tokens only
        fi = fill.detach().clone().requires_grad_()
        gf, = torch.autograd.grad(f(tok, ids, N, fi), fi, gsc)                       # fill only
        out[impl] = (gt, gf)
    ftol = dict(atol=1e-8, rtol=1e-6, ascale=1e-6) if dtype == torch.float32 else dict(atol=1e-6, rtol=1e-2,
                                                                                       ascale=2 ** -7)
    r += [compare("grad_tokens only", out["triton"][0], out["ref"][0], 0, 0),
          compare("grad_fill only", out["triton"][1], out["ref"][1], **ftol)]
    return all(x[0] for x in r), "; ".join(x[1] for x in r)


def _fast_calls(mod) -> int:
    "Launches that took the direct (cached C launcher) path in one of the Triton modules."
    n = 0
    for v in list(getattr(mod, "_PLANS", {}).values()) + list(getattr(mod, "_CACHE", {}).values()):
        for L in ([v.launcher] if hasattr(v, "launcher") else [e for e in v if hasattr(e, "fast_calls")]):
            n += L.fast_calls
    return n


def check_repeat(device, what):
    """The same calls again and again with new values (the cached plan; on a GPU, the direct launch path after the
    first launch), then views 4 bytes / 1 element off a 16-byte boundary (another key), against the reference each
    time. On CUDA, also that the direct launch path was taken."""
    f32, bf16 = torch.float32, torch.bfloat16
    res = []
    if what == "losses":
        mod = triton_module("_triton_losses", torch.device(device))
        for i in range(3):
            for kind in ("fixmatch", "refixmatch", "sequencematch"):
                res.append(check_loss(kind, 448, 10, f32, device, seed=100 + i))
            res.append(check_loss("sequencematch", 96, 13, f32, device, mask_mode="external", seed=110 + i))
            res.append(check_loss("sequencematch", 64, 1000, bf16, device, seed=120 + i))
        for i in range(2):
            res.append(check_loss("sequencematch", 448, 10, f32, device, layout="offset", seed=130 + i))
            res.append(check_loss("fixmatch", 448, 10, f32, device, seed=140 + i))
    else:
        mod = triton_module("_triton_tokens", torch.device(device))
        shape = (4, 196, 49, 768) if device == "cuda" else (2, 37, 11, 100)
        for i in range(3):
            res.append(check_tokens(*shape, bf16, torch.int64, device, seed=200 + i))
        for i in range(2):
            res.append(check_tokens(*shape, bf16, torch.int64, device, layout="offset", seed=210 + i))
            res.append(check_tokens(*shape, bf16, torch.int64, device, seed=220 + i))
    ok = all(r[0] for r in res)
    n_fast = _fast_calls(mod)
    msg = f"{sum(r[0] for r in res)}/{len(res)} calls match; direct launches: {n_fast}"
    if device == "cuda":
        from ssl_nb.kernels._launch import ENABLED
        if ENABLED and n_fast == 0:
            ok, msg = False, msg + " (expected > 0: the direct launch path was never taken)"
    bad = [r[1] for r in res if not r[0]]
    return ok, msg + (f"; first failure: {bad[0]}" if bad else "")


def check_no_cycles(device):
    """A forward whose backward never runs (evaluation with grad enabled, the benchmark's forward rows) frees its
    output, graph node and gradient buffers as soon as they go out of scope: no reference cycle through ctx."""
    import gc
    import weakref
    TLm = triton_module("_triton_losses", torch.device(device))
    TT = triton_module("_triton_tokens", torch.device(device))
    zw, zm, zs = (logits(64, 10, torch.float32, device, s) for s in range(3))
    zm.requires_grad_(); zs.requires_grad_()
    x = torch.randn(2, 9, 8, device=device, requires_grad=True)
    ids = torch.tensor([[0, 3], [4, 1]], device=device)
    tok = torch.randn(2, 2, 8, device=device, requires_grad=True)
    fill = torch.zeros(8, device=device, requires_grad=True)
    calls = {"sequencematch": lambda: TLm.sequencematch_loss(zw, zm, zs)[0],
             "fixmatch": lambda: TLm.fixmatch_loss(zw, zs)[0],
             "gather": lambda: TT.gather_tokens(x, ids), "scatter": lambda: TT.scatter_tokens(tok, ids, 9, fill)}
    kept = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name, f in calls.items():
            t = f()
            refs = [weakref.ref(t), weakref.ref(t.grad_fn)]
            del t
            if any(r() is not None for r in refs): kept.append(name)
    finally:
        if enabled: gc.enable()
    return not kept, f"kept alive by a cycle: {kept}" if kept else "all freed without the garbage collector"


def check_sum_over_programs(device):
    """`_triton_common.sum_partials` alone: many programs (more than the last program's load block, so it loops), each
    adding a block of a vector, against a float64 sum; the same launch again is bitwise equal (the last program adds
    the partials in index order, whichever finished last); the ticket counters are all back to 0. On CUDA, 2^17
    programs racing for their tickets, repeated, and launches alternating between two streams."""
    from ssl_nb.kernels._runtime import _tickets
    TC = triton_module("_triton_common", torch.device(device))
    n, block = (1100, 1) if device == "cpu" else (1 << 17, 4)
    pad = block // 2                  # ragged on CUDA: the last program's block is partly outside x
    x = torch.randn(n * block - pad, generator=_gen(0)).to(device)
    want = x.double().sum()
    parts = [TC.sum_over_programs(x, block) for _ in range(2 if device == "cpu" else 20)]
    res = [compare("total", parts[0][0], want.float(), atol=1e-4, rtol=1e-6),
           compare("partials", parts[0][1:], torch.nn.functional.pad(x, (0, pad)).view(-1, block).sum(1),
                   atol=1e-6, rtol=1e-6)]
    same = all(torch.equal(p[0], parts[0][0]) for p in parts)
    res.append((same, f"{len(parts)} launches bitwise equal: {same}"))
    if device == "cuda":          # two streams at once: each launch has its own ticket counter
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        y = -x
        for st in (s1, s2): st.wait_stream(torch.cuda.current_stream())
        a, b = [], []
        for _ in range(20):
            with torch.cuda.stream(s1): a.append(TC.sum_over_programs(x, block)[0])
            with torch.cuda.stream(s2): b.append(TC.sum_over_programs(y, block)[0])
        torch.cuda.synchronize()
        ok = all(torch.equal(v, parts[0][0]) for v in a) and all(torch.equal(v, -parts[0][0]) for v in b)
        res.append((ok, f"two streams x20: {ok}"))
    zero = all(int(t.count_nonzero()) == 0 for t in _tickets.values())
    res.append((zero, f"ticket counters back to 0: {zero}"))
    return all(r[0] for r in res), "; ".join(r[1] for r in res)


def check_last_program_sums(device):
    """The fused losses with LAST_PROGRAM_SUMS (the loss summed in the kernel's launch): against the reference (via
    check_loss) on several programs, and bitwise equal call after call. On CUDA: a CUDA graph captured before the
    ticket counters exist falls back to the two-launch sum (and replays right); then the counters are made."""
    from ssl_nb.kernels import _runtime
    TLm = triton_module("_triton_losses", torch.device(device))
    f32, bf16 = torch.float32, torch.bfloat16
    last = dict(LAST_PROGRAM_SUMS=True)
    small = dict(BLOCK_R=16, ROW_TILES=1, num_warps=4, **last)          # 448 x 10 over 28 programs
    res = [check_loss("sequencematch", 448, 10, f32, device, seed=40, config=small),
           check_loss("refixmatch", 200, 100, f32, device, seed=41, mask_mode="external", config=small),
           check_loss("fixmatch", 61, 1000, bf16, device, seed=42,
                      config=dict(BLOCK_R=4 if device == "cpu" else 1, BLOCK_C=1024, ROW_TILES=1, num_warps=4, **last))]
    if device == "cuda":     # pick_config's layout at the benchmark's largest shape (2048 programs), with the sum
        res.append(check_loss("sequencematch", 32768, 1000, bf16, device, seed=43, config=last))
    zw, zm, zs = (logits(448, 10, f32, device, s) for s in range(3))
    vals = [TLm.sequencematch_loss(zw, zm, zs, _config=small)[0] for _ in range(3)]
    two = TLm.sequencematch_loss(zw, zm, zs, _config=dict(small, LAST_PROGRAM_SUMS=False))[0]
    same = all(torch.equal(v, vals[0]) for v in vals)
    res += [(same, f"3 calls bitwise equal: {same}"), compare("vs two launches", vals[0], two, **LOSS_TOL)]
    if device == "cuda":
        saved = dict(_runtime._tickets)
        _runtime._tickets.clear(); TLm._PLANS.clear()
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):      # no warm-up call: the plan is made while capturing
                with torch.cuda.graph(g, stream=s):
                    out = TLm.sequencematch_loss(zw, zm, zs, _config=small)[0]
            fell_back = not _runtime._tickets
            zw.mul_(0.5); g.replay(); torch.cuda.synchronize()
            want = L.sequencematch_loss(zw, zm, zs)[0]
            res.append((fell_back, f"capture before the counters: two-launch path {fell_back}"))
            res.append(compare("graph replay", out, want, **LOSS_TOL))
            TLm._PLANS.clear()
            res.append(compare("after capture", TLm.sequencematch_loss(zw, zm, zs, _config=small)[0], want,
                               **LOSS_TOL))
            res.append((bool(_runtime._tickets), "counters made outside the capture"))
        finally:
            for k, v in saved.items(): _runtime._tickets.setdefault(k, v)
            TLm._PLANS.clear()
    zero = all(int(t.count_nonzero()) == 0 for t in _runtime._tickets.values())
    res.append((zero, f"ticket counters back to 0: {zero}"))
    return all(r[0] for r in res), "; ".join(r[1] for r in res)


def check_double_backward(device):
    """A second backward through a fused loss or the fused MAE loss (retain_graph=True) raises a clear RuntimeError
    (their gradient buffers are scaled in place by the first)."""
    TLm = triton_module("_triton_losses", torch.device(device))
    TM = triton_module("_triton_mae", torch.device(device))
    zw, zm, zs = (logits(32, 10, torch.float32, device, s) for s in range(3))
    zm.requires_grad_(); zs.requires_grad_()
    pred = torch.randn(2, 4, 48, device=device, requires_grad=True)
    imgs, mask = torch.randn(2, 3, 8, 8, device=device), torch.ones(2, 4, device=device)
    out = []
    for name, loss in [("sequencematch", TLm.sequencematch_loss(zw, zm, zs)[0]),
                       ("mae", TM.masked_patch_mse(pred, imgs, mask, 4))]:
        loss.backward(retain_graph=True)
        try:
            loss.backward()
            out.append((False, f"{name}: no error"))
        except RuntimeError as e:
            out.append(("one backward pass" in str(e), f"{name}: RuntimeError: {str(e)[:70]}"))
    return all(o[0] for o in out), "; ".join(o[1] for o in out)


# --------------------------------------------------------------------------------------------------------------- MAE
def check_mae(B, C, H, W, p, dtype, device, norm_pix=True, mask_mode="random", layout="contiguous", config=None,
              grad_scale=2.0, seed=0):
    "masked_patch_mse: loss and gradient to pred against MAE's forward_loss (fp32)."
    TM = triton_module("_triton_mae", torch.device(device))
    g = _gen(seed)
    Lp, E = (H // p) * (W // p), p * p * C
    imgs = torch.randn(B, C, H, W, generator=g).to(device)
    if layout == "channels_last": imgs = imgs.contiguous(memory_format=torch.channels_last)
    pred = torch.randn(B, Lp, E, generator=g).to(dtype).to(device)
    mask = {"random": (torch.rand(B, Lp, generator=g) < 0.75).float(), "ones": torch.ones(B, Lp),
            "bool": torch.rand(B, Lp, generator=g) < 0.75}[mask_mode].to(device)
    out = []
    for impl in ("ref", "triton"):
        pi = pred.detach().clone().requires_grad_()
        loss = R.masked_patch_mse_ref(pi, imgs, mask, p, norm_pix) if impl == "ref" else \
            TM.masked_patch_mse(pi, imgs, mask, p, norm_pix, _config=config)
        gp, = torch.autograd.grad(loss * grad_scale, pi)
        out.append((loss, gp))
    r = [compare("loss", out[1][0], out[0][0], atol=1e-6, rtol=1e-5), compare("grad_pred", out[1][1], out[0][1],
                                                                            **TOL[dtype])]
    return all(x[0] for x in r), "; ".join(x[1] for x in r)


# ------------------------------------------------------------------------------------------------------ errors, misc
def check_errors(device):
    "Wrong shapes, dtypes, devices and scalars raise ConfigError before any launch (the process would die otherwise)."
    dev = torch.device(device)
    TLm, TT, TM = (triton_module(n, dev) for n in ("_triton_losses", "_triton_tokens", "_triton_mae"))
    z = torch.randn(8, 10, device=dev)
    x = torch.randn(2, 16, 8, device=dev)
    ids = torch.zeros(2, 4, dtype=torch.long, device=dev)
    ok_ids = torch.arange(4, device=dev).expand(2, 4)
    # warm the caches with valid calls of the same shapes: the errors below must still be raised on a cache hit
    TLm.fixmatch_loss(z, z); TLm.refixmatch_loss(z, z); TLm.sequencematch_loss(z, z, z)
    TT.gather_tokens(x, ok_ids); TT.scatter_tokens(x[:, :4], ok_ids, 16, torch.zeros(8, device=dev))
    bad = {
        "1-d logits": lambda: TLm.fixmatch_loss(z[0], z[0]),
        "shape mismatch": lambda: TLm.sequencematch_loss(z, z, z[:, :9]),
        "int logits": lambda: TLm.fixmatch_loss(z.long(), z.long()),
        "float64 logits": lambda: TLm.fixmatch_loss(z.double(), z.double()),
        "mask shape": lambda: TLm.fixmatch_loss(z, z, mask=torch.ones(7, device=dev)),
        "tensor threshold": lambda: TLm.fixmatch_loss(z, z, threshold=torch.tensor(0.9)),
        "T <= 0": lambda: TLm.refixmatch_loss(z, z, T=0.0),
        "kl_mask": lambda: TLm.sequencematch_loss(z, z, z, kl_mask="mid"),
        "no rows": lambda: TLm.fixmatch_loss(z[:0], z[:0]),
        "ids float": lambda: TT.gather_tokens(x, ids.float()),
        "ids rows": lambda: TT.gather_tokens(x, ids[:1]),
        "x 2-d": lambda: TT.gather_tokens(x[0], ids),
        "fill size": lambda: TT.scatter_tokens(x[:, :4], ids, 16, torch.zeros(7, device=dev)),
        "N < K": lambda: TT.scatter_tokens(x[:, :4], ids, 3, torch.zeros(8, device=dev)),
        "N not int": lambda: TT.scatter_tokens(x[:, :4], ids, 16.0, torch.zeros(8, device=dev)),
        "mae patch": lambda: TM.masked_patch_mse(torch.randn(1, 4, 48, device=dev), torch.randn(1, 3, 10, 8, device=dev),
                                                 torch.ones(1, 4, device=dev), 4),
        "mae pred": lambda: TM.masked_patch_mse(torch.randn(1, 4, 47, device=dev), torch.randn(1, 3, 8, 8, device=dev),
                                                torch.ones(1, 4, device=dev), 4),
        "mae mask": lambda: TM.masked_patch_mse(torch.randn(1, 4, 48, device=dev), torch.randn(1, 3, 8, 8, device=dev),
                                                torch.ones(1, 5, device=dev), 4),
        "mae huge patch": lambda: TM.masked_patch_mse(torch.randn(1, 1, 3 * 64 * 64, device=dev),
                                                      torch.randn(1, 3, 64, 64, device=dev), torch.ones(1, 1, device=dev), 64),
    }
    if dev.type == "cpu":    # value checks that would cost a host sync on a GPU run on CPU tensors only
        bad["ids range"] = lambda: TT.gather_tokens(x, ids + 16)
        bad["duplicate ids"] = lambda: TT.scatter_tokens(x[:, :4], ids, 16, torch.zeros(8, device=dev))
        bad["ids range, cached key"] = lambda: TT.gather_tokens(x, ok_ids + 13)
        bad["duplicate ids, cached key"] = lambda: TT.gather_tokens(x, ok_ids * 0)
        bad["scatter ids range, cached key"] = lambda: TT.scatter_tokens(x[:, :4], ok_ids + 13, 16,
                                                                         torch.zeros(8, device=dev))
    missed = []
    for name, f in bad.items():
        try:
            f()
            missed.append(name)
        except ConfigError:
            pass
    return not missed, f"{len(bad) - len(missed)}/{len(bad)} raise ConfigError" + (f"; NOT raised: {missed}" if missed else "")


def check_cpu_dispatch(device):
    """Default dispatch of CPU tensors: exactly the ssl_nb.losses functions / the references, without importing
    triton. Must run before anything imports triton in the process."""
    if device != "cpu": return True, "skipped on cuda"
    saved = os.environ.pop("SSL_NB_KERNELS", None)
    try:
        import ssl_nb.kernels as K
        zw, zm, zs = (logits(64, 10, torch.float32, "cpu", s) for s in range(3))
        a = K.sequencematch_loss(zw, zm, zs, low_conf_kl=True)
        b = L.sequencematch_loss(zw, zm, zs, low_conf_kl=True)
        same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        same &= torch.equal(K.fixmatch_loss(zw, zs)[0], L.fixmatch_loss(zw, zs)[0])
        same &= torch.equal(K.refixmatch_loss(zw, zs)[0], L.refixmatch_loss(zw, zs)[0])
        x = torch.randn(2, 9, 4); ids = _ids(2, 9, 3, torch.long, "cpu", 0)
        same &= torch.equal(K.gather_tokens(x, ids), R.gather_tokens_ref(x, ids))
        no_triton = "triton" not in sys.modules
        return same and no_triton, f"bitwise equal: {same}; triton not imported: {no_triton}"
    finally:
        if saved is not None: os.environ["SSL_NB_KERNELS"] = saved


# ---------------------------------------------------------------------------------------------------- torch.compile
def _with_backend(name, fn, *args):
    "fn(*args) with SSL_NB_KERNELS=name."
    saved = os.environ.get("SSL_NB_KERNELS")
    os.environ["SSL_NB_KERNELS"] = name
    try:
        return fn(*args)
    finally:
        os.environ["SSL_NB_KERNELS"] = saved if saved is not None else "auto"


def _compiled(fn, device, mode=None, backend=None):
    "`torch.compile(fn, fullgraph=True)`: inductor on CUDA (with `mode`), aot_eager on the CPU unless `backend`."
    torch._dynamo.reset()
    if device == "cuda": return torch.compile(fn, fullgraph=True, mode=mode)
    return torch.compile(fn, fullgraph=True, backend=backend or "aot_eager")


def _run_compiled(device, step, make_inputs, grad_names, tol, ops, mode=None, calls=3, backend=None):
    """`step` compiled (the ops' custom-op path, `_compile.py`) against `step` run eagerly on the references
    (`SSL_NB_KERNELS=torch`), over `calls` calls with new values (the compiled graph and, with
    mode='reduce-overhead', its CUDA graph replayed): outputs, and gradients of `out[0]` to the inputs named in
    grad_names. `ops`: the custom ops the compiled step must have run (its first call: warm-up, not a replay).
    Returns (ok, message)."""
    import ssl_nb.kernels as K
    from ssl_nb.kernels._compile import calls as op_calls
    cstep = _compiled(lambda *a: step(K, *a), device, mode, backend)
    before = dict(op_calls)
    res = []
    for i in range(calls):
        inputs = make_inputs(i)
        got = {}
        for impl in ("ref", "compiled"):
            ins = {k: (v.detach().clone().requires_grad_() if k in grad_names else v) for k, v in inputs.items()}
            if impl == "ref":
                out = _with_backend("torch", step, K, *ins.values())
            else:
                if mode == "reduce-overhead": torch.compiler.cudagraph_mark_step_begin()
                out = cstep(*ins.values())
            out[0].backward()
            got[impl] = ([o.detach().clone() for o in out], [ins[k].grad for k in grad_names])
        if i == 0: ran = {op: op_calls[op] - before.get(op, 0) for op in ops}
        (oc, gc), (orf, grf) = got["compiled"], got["ref"]
        res += [compare(f"{i}:out{j}", a, b, **(LOSS_TOL if j == 0 else dict(atol=0, rtol=0)))
                for j, (a, b) in enumerate(zip(oc, orf))]
        res += [compare(f"{i}:grad_{k}", a, b, **tol.get(k, tol["*"])) for k, a, b in zip(grad_names, gc, grf)]
    bad = [r[1] for r in res if not r[0]] + [f"custom op {op} not run" for op, n in ran.items() if not n]
    return not bad, (f"{len(res)} comparisons over {calls} calls; ops run {ran}; " +
                     ("; ".join(bad) if bad else "; ".join(r[1] for r in res[-len(grad_names):])))


def check_compiled_losses(device, mode=None, R_=96, C=13, dtype=torch.float32, backend=None):
    """The three fused losses inside one compiled step (fullgraph: no graph break), with grad_output != 1, a
    FlexMatch-like external mask, kl_mask and low_conf_kl; the gradients of both views sum over several ops."""
    def step(K, zw, zm, zs, mask):
        l1, m1 = K.sequencematch_loss(zw, zm, zs, kl_mask="low", low_conf_kl=True)
        l2, _ = K.fixmatch_loss(zw, zs, mask=mask)
        l3, m3 = K.refixmatch_loss(zw, zm, T=0.7)
        return 2 * l1 + l2 + 0.5 * l3, m1, m3

    def make_inputs(i):
        z = [logits(R_, C, dtype, device, 40 + 3 * i + j) for j in range(3)]
        mask = (torch.rand(R_, generator=_gen(50 + i)) < 0.4).float().to(device)
        return dict(zw=z[0], zm=z[1], zs=z[2], mask=mask)
    return _run_compiled(device, step, make_inputs, ["zm", "zs"], {"*": TOL[dtype]}, ["consistency_loss"], mode,
                         backend=backend)


def check_compiled_tokens_mae(device, mode=None):
    "gather_tokens, scatter_tokens and masked_patch_mse inside one compiled step, gradients to every input."
    B, N, K_, D, p = 2, 37, 11, 48, 8

    def step(K, x, ids, tok, fill, wa, wb, pred, imgs, m):
        a = K.gather_tokens(x, ids)
        b = K.scatter_tokens(tok, ids, N, fill)
        c = K.masked_patch_mse(pred, imgs, m, p)
        return (a * wa).sum() + (b * wb).sum() + 3 * c, a, b

    def make_inputs(i):
        g = _gen(60 + i)
        r = lambda *s: torch.randn(*s, generator=g).to(device)
        return dict(x=r(B, N, D), ids=_ids(B, N, K_, torch.int32, device, 70 + i), tok=r(B, K_, D), fill=r(1, 1, D),
                    wa=r(B, K_, D), wb=r(B, N, D), pred=r(B, 4, p * p * 3), imgs=r(B, 3, 2 * p, 2 * p),
                    m=(torch.rand(B, 4, generator=g) < 0.75).float().to(device))
    # fill's gradient is a sum over B * (N - K) rows, in another order than the reference's
    tol = {"*": TOL[torch.float32], "fill": dict(atol=1e-8, rtol=1e-6, ascale=1e-6)}
    ops = ["gather_tokens", "gather_tokens_backward", "scatter_tokens", "scatter_tokens_backward", "masked_patch_mse"]
    return _run_compiled(device, step, make_inputs, ["x", "tok", "fill", "pred"], tol, ops, mode)


def check_opcheck(device):
    """`torch.library.opcheck` of every custom op (schema, fake implementation, autograd registration, AOT dispatch
    with dynamic shapes), with inputs that need gradients and without."""
    from ssl_nb.kernels import _compile as OC
    z = [logits(48, 13, torch.float32, device, s) for s in range(3)]
    zg = [t.detach().clone().requires_grad_() for t in z]
    ids = _ids(2, 37, 11, torch.int64, device, 0)
    r = lambda *s, **k: torch.randn(*s, device=device, **k)
    calls = {
        "seq": (OC.consistency_loss, (z[0], zg[1], zg[2], None, 0.95, 0.5, False, 0, True)),
        "refix_mask": (OC.consistency_loss, (z[0], None, zg[2], torch.rand(48, device=device), 0.95, 0.5, True, 0, True)),
        "seq_nograd": (OC.consistency_loss, (z[0], z[1], z[2], None, 0.95, 0.5, False, 2, False)),
        "gather": (OC.gather_tokens_op, (r(2, 37, 24, requires_grad=True), ids, True)),
        "scatter": (OC.scatter_tokens_op, (r(2, 11, 24, requires_grad=True), ids, 37, r(24, requires_grad=True), True)),
        "mae": (OC.masked_patch_mse_op, (r(2, 4, 48, requires_grad=True), r(2, 3, 8, 8),
                                         (torch.rand(2, 4, device=device) < 0.5).float(), 4, True, True)),
    }
    bad = []
    for name, (op, args) in calls.items():
        out = torch.library.opcheck(op, args)
        bad += [f"{name}.{k}: {v}" for k, v in out.items() if v != "SUCCESS"]
    return not bad, f"{len(calls)} ops x 4 opcheck tests" + (f"; FAILED {bad}" if bad else ": all SUCCESS")


def check_compiled_errors(device):
    "Wrong calls inside torch.compile (no fullgraph) still raise ConfigError with the eager path's message."
    import ssl_nb.kernels as K
    z = torch.randn(8, 10, device=device)
    x = torch.randn(2, 16, 8, device=device)
    bad = {"shape mismatch": lambda: K.sequencematch_loss(z, z, z[:, :9]),
           "T <= 0": lambda: K.refixmatch_loss(z, z, T=0.0),
           "kl_mask": lambda: K.sequencematch_loss(z, z, z, kl_mask="mid"),
           "ids float": lambda: K.gather_tokens(x, torch.zeros(2, 4, device=device)),
           "mae patch": lambda: K.masked_patch_mse(torch.randn(1, 4, 48, device=device),
                                                   torch.randn(1, 3, 10, 8, device=device),
                                                   torch.ones(1, 4, device=device), 4)}
    if device == "cpu":     # id values: checked when the op's body runs (Triton) or by the traced reference (torch)
        ids = torch.tensor([[1, 1, 2, 3], [0, 3, 5, 6]])
        bad["duplicate ids (op body)"] = lambda: K.scatter_tokens(x[:, :4], ids, 16, torch.zeros(8))
        bad["ids out of range (op body)"] = lambda: K.gather_tokens(x, ids + 13)
        bad["duplicate ids (reference)"] = lambda: _with_backend("torch", K.scatter_tokens, x[:, :4], ids, 16,
                                                                 torch.zeros(8))
    missed = []
    for name, f in bad.items():
        torch._dynamo.reset()
        try:
            torch.compile(f, backend="aot_eager" if device == "cpu" else "inductor")()
            missed.append(name)
        except ConfigError:
            pass
    return not missed, f"{len(bad) - len(missed)}/{len(bad)} raise ConfigError" + (f"; NOT raised: {missed}" if missed else "")


# ------------------------------------------------------------------------------------------------------------- cases
def cases(device: str) -> dict:
    """name -> zero-argument check. CPU (interpreter): few, large programs ('blocked' = the interpreter's configuration
    at realistic sizes; 'gpu' = the GPU's configuration, 1 row per program from C ~ 1000, on a tiny grid). CUDA:
    the same cases plus the benchmark shapes in the GPU configuration."""
    dev = device
    f32, bf16 = torch.float32, torch.bfloat16
    gpu_cfg = None
    if dev == "cpu":
        def gpu_cfg(R_, C):  # the configuration pick_config chooses on a GPU
            from ssl_nb.kernels._triton_losses import pick_config
            return pick_config(R_, C, interpret=False)
    c = {"cpu_dispatch": lambda: check_cpu_dispatch(dev), "errors": lambda: check_errors(dev)}
    for kind in ("fixmatch", "refixmatch", "sequencematch"):
        k = kind[:3] if kind != "refixmatch" else "refix"
        c[f"{k}_448x10_f32"] = lambda kind=kind: check_loss(kind, 448, 10, f32, dev)
        c[f"{k}_300x1000_f32"] = lambda kind=kind: check_loss(kind, 300, 1000, f32, dev, seed=1)
        c[f"{k}_257x13_bf16"] = lambda kind=kind: check_loss(kind, 257, 13, bf16, dev, seed=2)
        c[f"{k}_extmask"] = lambda kind=kind: check_loss(kind, 200, 100, f32, dev, mask_mode="external", seed=3)
        c[f"{k}_gpucfg_1000"] = lambda kind=kind: check_loss(
            kind, 6, 1000, f32, dev, config=gpu_cfg(6, 1000) if gpu_cfg else None, seed=4)
    c.update({
        "seq_lowconf_130x1000_bf16": lambda: check_loss("sequencematch", 130, 1000, bf16, dev, low_conf=True, seed=5),
        "seq_lowconf_extmask_bool": lambda: check_loss("sequencematch", 96, 13, f32, dev, low_conf=True,
                                                       mask_mode="bool", seed=6),
        "seq_all_confident": lambda: check_loss("sequencematch", 64, 10, f32, dev, threshold=0.0, seed=7),
        "seq_none_confident": lambda: check_loss("sequencematch", 64, 10, f32, dev, threshold=1.0, seed=8),
        "refix_none_confident": lambda: check_loss("refixmatch", 64, 10, f32, dev, threshold=1.0, seed=8),
        "fix_mask_zeros": lambda: check_loss("fixmatch", 64, 10, f32, dev, mask_mode="zeros", seed=9),
        "seq_mask_ones": lambda: check_loss("sequencematch", 64, 10, f32, dev, mask_mode="ones", low_conf=True,
                                            seed=9),
        "seq_colstride": lambda: check_loss("sequencematch", 100, 13, f32, dev, layout="colstride", seed=10),
        "seq_rowpad_bf16": lambda: check_loss("sequencematch", 100, 1000, bf16, dev, layout="rowpad", seed=11),
        "refix_transposed": lambda: check_loss("refixmatch", 100, 10, f32, dev, layout="transposed", seed=12),
        "seq_grad_out_misaligned": lambda: check_loss("sequencematch", 96, 13, bf16, dev, grad_scale=0.5, seed=21,
                                                      grad_misaligned=True),
        # fp16 under a GradScaler-sized grad_output: each gradient rounded to fp16 once (a relative tolerance of a few
        # fp16 ulps; TOL's absolute part, relative to max|grad|, would hide gradients flushed to 0)
        "seq_f16_gradscaler": lambda: check_loss("sequencematch", 300, 1000, torch.float16, dev, grad_scale=65536.0,
                                                 seed=22, tol=dict(atol=1e-6, rtol=2 ** -9)),
        "seq_mixed_dtypes": lambda: check_loss("sequencematch", 64, 100, f32, dev, seed=23,
                                               dtypes=[f32, bf16, f32], tol=TOL[bf16]),
        "seq_grad_of_grad_raises": lambda: check_grad_of_grad(dev),
        # kl_mask: the KLD terms on the unconfident target rows, or on all rows (the CE mask stays the confident one)
        "seq_klmask_low_bf16": lambda: check_loss("sequencematch", 200, 100, bf16, dev, seed=24, kl_mask="low"),
        "seq_klmask_all_extmask": lambda: check_loss("sequencematch", 130, 1000, f32, dev, seed=25, kl_mask="all",
                                                     mask_mode="external", low_conf=True),
        "seq_grad_out_1": lambda: check_loss("sequencematch", 128, 10, f32, dev, grad_scale=1.0, seed=13),
        "seq_multiblock_1000": lambda: check_loss("sequencematch", 64, 1000, f32, dev, seed=14, low_conf=True,
                                                  config=dict(BLOCK_C=256, BLOCK_R=16 if dev == "cpu" else 1,
                                                              num_warps=4)),
        # the prefetching layout (next tile's loads issued before this tile's math), ragged: the last program's
        # last tile is partly outside the batch
        "seq_prefetch_61x1000_bf16": lambda: check_loss("sequencematch", 61, 1000, bf16, dev, seed=19, config=dict(
            BLOCK_R=4, BLOCK_C=1024, ROW_TILES=4, PREFETCH=True, num_warps=4)),
        "refix_prefetch_5x1000": lambda: check_loss("refixmatch", 5, 1000, f32, dev, seed=20, config=dict(
            BLOCK_R=1, BLOCK_C=1024, ROW_TILES=3, PREFETCH=True, num_warps=4)),
        "seq_5000_f32": lambda: check_loss("sequencematch", 32, 5000, f32, dev, seed=15),
        # tied maxima in the weak view: the pseudo-label is the first maximum (CE on every row: an all-ones mask)
        "seq_ties_mask_ones": lambda: check_loss("sequencematch", 64, 10, f32, dev, layout="ties", mask_mode="ones",
                                                 seed=26),
        # FUSED_REDUCE flipped from pick_config's choice on this device (the GPU's default is fused, the
        # interpreter's unfused, so both paths are checked on both): the 2-, 3- and 5-sum variants; the GPU's layouts
        # at C = 1000 and 10; ties; prefetching
        "seq_flipreduce_gpucfg_1000": lambda: check_loss("sequencematch", 6, 1000, f32, dev, seed=27, low_conf=True,
                                                         config=_flip_reduce(dev, gpu_cfg(6, 1000) if gpu_cfg else None)),
        "seq_flipreduce_gpucfg_448x10": lambda: check_loss("sequencematch", 448, 10, f32, dev, seed=28,
                                                           config=_flip_reduce(dev, gpu_cfg(448, 10) if gpu_cfg else None)),
        "fix_flipreduce_257x13_bf16": lambda: check_loss("fixmatch", 257, 13, bf16, dev, seed=29,
                                                         config=_flip_reduce(dev)),
        "refix_flipreduce_extmask": lambda: check_loss("refixmatch", 64, 100, f32, dev, mask_mode="external", seed=30,
                                                       config=_flip_reduce(dev)),
        "seq_flipreduce_ties_klall": lambda: check_loss("sequencematch", 64, 10, f32, dev, layout="ties",
                                                        mask_mode="ones", kl_mask="all", seed=31,
                                                        config=_flip_reduce(dev)),
        "seq_flipreduce_prefetch_13x1000_bf16": lambda: check_loss(
            "sequencematch", 13, 1000, bf16, dev, seed=32, low_conf=True, kl_mask="all", mask_mode="external",
            config=_flip_reduce(dev, dict(BLOCK_R=2, BLOCK_C=1024, ROW_TILES=4, PREFETCH=True, num_warps=4))),
        "seq_gpucfg_448x10": lambda: check_loss("sequencematch", 448, 10, f32, dev, seed=16,
                                                config=gpu_cfg(448, 10) if gpu_cfg else None),
        # a batch of <= 4 tiles: one program walks them (the last one ragged)
        "seq_gpucfg_tiles_61x10": lambda: check_loss("sequencematch", 61, 10, f32, dev, seed=44, low_conf=True,
                                                     config=gpu_cfg(61, 10) if gpu_cfg else None),
        "seq_gpucfg_448x100": lambda: check_loss("sequencematch", 48, 100, bf16, dev, seed=17,
                                                 config=gpu_cfg(448, 100) if gpu_cfg else None),
        "seq_nograd": lambda: check_loss_nograd(dev),
        "sum_over_programs": lambda: check_sum_over_programs(dev),
        "losses_last_program_sums": lambda: check_last_program_sums(dev),
        "seq_blocked_1280x1000_bf16": lambda: check_loss("sequencematch", 1280, 1000, bf16, dev, seed=18),
        "tokens_8x196x49x768_bf16": lambda: check_tokens(8, 196, 49, 768, bf16, torch.int64, dev, seed=5),
        "tokens_196_49_768_f32": lambda: check_tokens(3, 196, 49, 768, f32, torch.int64, dev),
        "tokens_ragged_bf16_i32": lambda: check_tokens(2, 37, 11, 100, bf16, torch.int32, dev, seed=1),
        "tokens_full_perm": lambda: check_tokens(2, 50, 50, 64, f32, torch.int64, dev, seed=2),
        "tokens_noncontig": lambda: check_tokens(2, 196, 98, 96, f32, torch.int64, dev, layout="noncontig", seed=3),
        "tokens_gpucfg": lambda: check_tokens(2, 20, 5, 64, bf16, torch.int64, dev, seed=4,
                                              config=_tok_gpu_cfg(64, 2) if dev == "cpu" else None),
        # the inverse index on ragged sizes: several [BLOCK_N, BLOCK_K] tiles (GPU configuration: 32 x 64), N and K
        # not multiples of them, D not a power of 2; int32 and int64 ids; bf16 and fp32
        "tokens_modes_ragged_gpucfg_i32_bf16": lambda: check_tokens_modes(
            2, 150, 100, 96, bf16, torch.int32, dev, seed=6, config=_tok_gpu_cfg(96, 2) if dev == "cpu" else None),
        "tokens_modes_i64_f32": lambda: check_tokens_modes(3, 37, 11, 40, f32, torch.int64, dev, seed=7),
        "tokens_ragged_gpucfg_i64": lambda: check_tokens(2, 150, 100, 96, f32, torch.int64, dev, seed=8,
                                                         config=_tok_gpu_cfg(96, 4) if dev == "cpu" else None),
        "tokens_offset_bf16": lambda: check_tokens(2, 37, 11, 100, bf16, torch.int32, dev, layout="offset", seed=9),
        "repeat_losses": lambda: check_repeat(dev, "losses"),
        "repeat_tokens": lambda: check_repeat(dev, "tokens"),
        "double_backward_raises": lambda: check_double_backward(dev),
        "no_ref_cycles": lambda: check_no_cycles(dev),
        "seq_offset": lambda: check_loss("sequencematch", 100, 13, f32, dev, layout="offset", seed=19),
        "mae_224_p16_f32": lambda: check_mae(2, 3, 224, 224, 16, f32, dev),
        "mae_nonorm_bf16": lambda: check_mae(3, 3, 32, 48, 8, bf16, dev, norm_pix=False, seed=1),
        "mae_channels_last_boolmask": lambda: check_mae(2, 3, 64, 64, 16, f32, dev, layout="channels_last",
                                                        mask_mode="bool", seed=2),
        "mae_mask_ones_1ch": lambda: check_mae(2, 1, 28, 28, 7, f32, dev, mask_mode="ones", seed=3),
        # fp16 pred under a GradScaler-sized grad_output: the fp32 gradient buffer scaled in place, cast once
        "mae_f16_gradscaler": lambda: check_mae(2, 3, 32, 32, 16, torch.float16, dev, grad_scale=65536.0, seed=5),
        "mae_gpucfg": lambda: check_mae(1, 3, 32, 32, 16, f32, dev, seed=4,
                                        config=_mae_gpu_cfg(4, 768) if dev == "cpu" else None),
    })
    if dev == "cuda":   # the benchmark shapes, in the GPU configuration, and the interpreter-only cases dropped
        for kind in ("fixmatch", "refixmatch", "sequencematch"):
            for (R_, C, dt) in BENCH.LOSS_SHAPES:
                c[f"bench_{kind}_{R_}x{C}_{str(dt)[6:]}"] = lambda kind=kind, R_=R_, C=C, dt=dt: check_loss(
                    kind, R_, C, dt, dev, seed=20)
        for keep in (0.25, 0.5):
            c[f"bench_tokens_256x196x768_keep{keep}"] = lambda keep=keep: check_tokens(
                256, 196, int(196 * keep), 768, bf16, torch.int64, dev, seed=21)
        c["bench_mae_vitb16_b256_f32"] = lambda: check_mae(256, 3, 224, 224, 16, f32, dev, seed=22)
        c["bench_mae_vitb16_b256_bf16pred"] = lambda: check_mae(256, 3, 224, 224, 16, bf16, dev, seed=22)
        c.pop("cpu_dispatch")
    # torch.compile: the custom ops of _compile.py (aot_eager on the CPU, plus one inductor case; inductor on CUDA,
    # and CUDA graphs). Last: on a GPU they cost most of the checks' time (one inductor build each)
    c.update({
        "compile_losses": lambda: check_compiled_losses(dev),
        "compile_losses_bf16_1000": lambda: check_compiled_losses(dev, R_=40, C=1000, dtype=bf16),
        "compile_losses_inductor": lambda: check_compiled_losses(dev, R_=64, C=10, backend="inductor"),
        "compile_tokens_mae": lambda: check_compiled_tokens_mae(dev),
        "compile_opcheck": lambda: check_opcheck(dev),
        "compile_errors": lambda: check_compiled_errors(dev),
    })
    if dev == "cuda":
        c.pop("compile_losses_inductor")            # every CUDA case uses inductor
        # CUDA graphs (cudagraph trees) replaying the fused kernels, forward and backward
        c["compile_losses_cudagraphs"] = lambda: check_compiled_losses(dev, mode="reduce-overhead", R_=448, C=10)
        c["compile_tokens_mae_cudagraphs"] = lambda: check_compiled_tokens_mae(dev, mode="reduce-overhead")
    return c


def _flip_reduce(dev, cfg=None):
    """`cfg` (None: pick_config's choice for the shape) with FUSED_REDUCE the other way than it would run (by default
    fused on a GPU, unfused under the interpreter; a GPU configuration checked on the CPU says it itself)."""
    from ssl_nb.kernels._triton_losses import pick_config
    fused = (cfg or {}).get("FUSED_REDUCE", pick_config(1, 10, interpret=dev == "cpu")["FUSED_REDUCE"])
    return {**(cfg or {}), "FUSED_REDUCE": not fused}


def _tok_gpu_cfg(D, elem):
    from ssl_nb.kernels._triton_tokens import pick_config
    return pick_config(D, elem, interpret=False)


def _mae_gpu_cfg(R_, E):
    from ssl_nb.kernels._triton_mae import pick_config
    return pick_config(R_, E, interpret=False)


# ------------------------------------------------------------------------------------------------------------ pytest
CPU_CASES = cases("cpu")
CUDA_CASES = cases("cuda")
CHILD_ENV = {"TRITON_INTERPRET": "1", "SSL_NB_KERNELS": "triton", "PYTHONWARNINGS": "ignore"}
CHILD_TIMEOUT_S = 600


def run_in_children(names) -> dict:
    """name -> (ok, detail) for the CPU cases `names`, run by `main` in child processes; a child that dies marks its
    current case as crashed and a new child goes on with the rest."""
    results, todo = {}, list(names)
    while todo:
        p = subprocess.run([sys.executable, __file__, "--device", "cpu", "--cases", *todo], capture_output=True,
                           text=True, env={**os.environ, **CHILD_ENV}, timeout=CHILD_TIMEOUT_S)
        current = None
        for line in p.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word == "START": current = rest.strip()
            elif word in ("PASS", "FAIL"):
                name, _, detail = rest.partition(" ")
                results[name] = (word == "PASS", detail)
                current = None
        if current is not None:        # died inside a case
            results[current] = (False, f"child process died (exit {p.returncode}) in this case: {p.stderr[-2000:]}")
        elif p.returncode not in (0, 1):
            for n in todo:
                results.setdefault(n, (False, f"child exited {p.returncode}: {p.stderr[-2000:]}"))
        todo = [n for n in todo if n not in results]
    return results


@pytest.fixture(scope="module")
def interpreter_results(request):
    "The interpreter cases this session selected (-k and -m apply), all run at once in child processes."
    names = [it.callspec.params["name"] for it in request.session.items
             if getattr(it, "originalname", None) == "test_interpreter" and it.module.__name__ == __name__]
    return run_in_children(names)


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_interpreter(name, interpreter_results):
    ok, detail = interpreter_results[name]
    assert ok, detail


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CUDA_CASES))
def test_cuda(name, monkeypatch):
    monkeypatch.setenv("SSL_NB_KERNELS", "triton")
    ok, detail = CUDA_CASES[name]()
    print(detail)           # tools/gpu_check.sh runs pytest with -s: the detail of every case goes to its log
    assert ok, detail


# ---------------------------------------------------------------------------------------------------- command line
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", nargs="*", help="names to run (default: all)")
    ap.add_argument("--skip", nargs="*", default=[], help="names not to run")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=RuntimeWarning)      # masked-off lanes under the interpreter
    os.environ.setdefault("SSL_NB_KERNELS", "triton")
    if a.device == "cpu":       # before anything (torch.compile included) imports triton in compiled mode
        os.environ.setdefault("TRITON_INTERPRET", "1")
    allc = CPU_CASES if a.device == "cpu" else CUDA_CASES
    if a.list:
        print("\n".join(allc)); return 0
    names = [n for n in (a.cases or list(allc)) if n not in set(a.skip)]
    names.sort(key=lambda n: n != "cpu_dispatch")      # it checks that triton is not imported yet: run it first
    unknown = [n for n in names if n not in allc]
    if unknown: print(f"unknown cases: {unknown}", flush=True); return 2
    if a.device == "cuda":
        if not torch.cuda.is_available(): print("no CUDA device", flush=True); return 2
        print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    fails = 0
    t_all = time.time()
    for n in names:
        print(f"START {n}", flush=True)
        t = time.time()
        try:
            ok, msg = allc[n]()
        except Exception as e:                       # one broken case must not stop the others
            ok, msg = False, f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3)!r}"
        dt = time.time() - t
        fails += not ok
        print(f"{'PASS' if ok else 'FAIL'} {n} {dt:.2f}s {msg}", flush=True)
    print(f"DONE {len(names) - fails}/{len(names)} passed in {time.time() - t_all:.1f}s", flush=True)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
