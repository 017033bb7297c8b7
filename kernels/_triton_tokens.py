"""Row gather / scatter of tokens ([B, N, D] <-> [B, K, D] by per-sample ids), with backward. Imports triton.

Built around the inverse index `inv[b, n] = k` where `ids[b, k] == n`, else -1 (int32 [B, N]):

* gather forward (`_gather_kernel`, EXTRA=1): `out[b, k] = x[b, ids[b, k]]`, and, in the same launch, B extra
  programs that write `inv` (one sample each: its N slots against its K ids, in [BLOCK_N, BLOCK_K] tiles);
* gather backward (`_take_kernel`, USE_INV): `grad_x[b, n] = g[b, inv[b, n]]`, 0 where inv < 0: every element of
  grad_x written once, coalesced, no zero-fill pass, no atomics;
* scatter forward (`_take_kernel`, scanning ids): `out[b, n] = tokens[b, k]` for the k with `ids[b, k] == n`, the fill
  token elsewhere; its first D block also stores the k it found (or -1) into `inv` when fill needs a gradient;
* scatter backward (`_gather_kernel`, EXTRA=2): `grad_tokens = g[b, ids[b, k]]`, and extra programs summing the
  gradient rows with inv < 0 (the fill slots) per sample and D block, fp32 partials [B, D], then one torch sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launcher
from ._runtime import align, is_interpreted, cdiv, fill_grad, first_order_only, next_pow2
from ._validate import check_gather, check_ids_values, check_scatter
from .reference import gather_tokens_ref, scatter_tokens_ref

I32 = torch.int32
F32 = torch.float32
_grad_enabled = torch.is_grad_enabled


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _match(ids_ptr, b, sib, sik, n, N, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """For each slot n (int32, [ROWS]) of sample b: the k with ids[b, k] == n (the largest such k), or -1 when n was
    not kept. Compares in int32 (ids outside [0, N) are mapped to -1 first, so they match nothing): half the
    registers of int64, which matters in `_gather_kernel`, whose register count is that of its largest role."""
    kk = tl.full([ROWS], -1, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kv = k0 + tl.arange(0, BLOCK_K)
        idk = tl.load(ids_ptr + b * sib + kv.to(tl.int64) * sik, mask=kv < K, other=-1)
        idk = tl.where((idk >= 0) & (idk < N), idk, -1).to(tl.int32)
        hit = idk[None, :] == n[:, None]
        kk = tl.maximum(kk, tl.max(tl.where(hit, kv[None, :], -1), axis=1))
    return kk


@triton.jit
def _gather_rows(x_ptr, ids_ptr, out_ptr, q, n_d, B, N, K, D, sxb, sxn, sxd, sib, sik,
                 ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    "Program q of the gather: out[r] = x[b, ids[b, k]] for ROWS flat output rows r = b * K + k, one D block."
    pr = q // n_d
    pd = q - pr * n_d
    r = pr.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < B * K
    b = r // K
    k = r - b * K
    idx = tl.load(ids_ptr + b * sib + k * sik, mask=rmask, other=-1).to(tl.int64)
    ok = rmask & (idx >= 0) & (idx < N)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    d64 = d.to(tl.int64)
    v = tl.load(x_ptr + (b * sxb + idx * sxn)[:, None] + d64[None, :] * sxd, mask=ok[:, None] & dmask[None, :],
                other=0.0)
    tl.store(out_ptr + r[:, None] * D + d64[None, :], v, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _inverse_row(ids_ptr, inv_ptr, b, N, K, sib, sik, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    "inv[b, n] = the k with ids[b, k] == n, else -1, for every slot n of sample b."
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        kk = _match(ids_ptr, b, sib, sik, n, N, K, BLOCK_N, BLOCK_K)
        tl.store(inv_ptr + b * N + n, kk, mask=n < N)


@triton.jit
def _fill_rows(g_ptr, inv_ptr, part_ptr, q, n_d, N, D, sgb, sgn, sgd, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    "part[b, d] = fp32 sum of g[b, n, d] over the slots n of sample b with inv[b, n] < 0 (the fill slots)."
    b = (q // n_d).to(tl.int64)
    pd = q - (q // n_d) * n_d
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    d64 = d.to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, ROWS):
        n = n0 + tl.arange(0, ROWS).to(tl.int64)
        nmask = n < N
        kk = tl.load(inv_ptr + b * N + n, mask=nmask, other=0)
        free = nmask & (kk < 0)
        g = tl.load(g_ptr + (b * sgb + n * sgn)[:, None] + d64[None, :] * sgd, mask=free[:, None] & dmask[None, :],
                    other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(part_ptr + b * D + d64, acc, mask=dmask)


@triton.jit(do_not_specialize=["B", "N", "K", "D", "n_d", "n_extra"])
def _gather_kernel(x_ptr, ids_ptr, out_ptr, inv_ptr, part_ptr, B, N, K, D, sxb, sxn, sxd, sib, sik, n_d, n_extra,
                   EXTRA: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, ALIGN: tl.constexpr):
    """1-D grid: n_extra extra programs first, then the gather programs (flat output rows x D blocks).
    EXTRA = 0: none; 1: one program per sample writes inv (gather forward); 2: one program per (sample, D block)
    sums the gradient rows with inv < 0 into part (scatter backward, x = the gradient [B, N, D]).
    Out-of-range ids (never produced by the checked CPU path) give zeros instead of an out-of-bounds read.
    ALIGN: a power of 2 dividing D and the row strides (see _triton_losses): 16-byte vector loads and stores."""
    if ALIGN > 1:
        D = (D // ALIGN) * ALIGN
        sxb = (sxb // ALIGN) * ALIGN
        sxn = (sxn // ALIGN) * ALIGN
    pid = tl.program_id(0)
    if EXTRA == 0:
        _gather_rows(x_ptr, ids_ptr, out_ptr, pid, n_d, B, N, K, D, sxb, sxn, sxd, sib, sik, ROWS, BLOCK_D)
    else:
        if pid < n_extra:
            if EXTRA == 1:
                _inverse_row(ids_ptr, inv_ptr, pid.to(tl.int64), N, K, sib, sik, BLOCK_N, BLOCK_K)
            else:
                _fill_rows(x_ptr, inv_ptr, part_ptr, pid, n_d, N, D, sxb, sxn, sxd, ROWS, BLOCK_D)
        else:
            _gather_rows(x_ptr, ids_ptr, out_ptr, pid - n_extra, n_d, B, N, K, D, sxb, sxn, sxd, sib, sik, ROWS,
                         BLOCK_D)


@triton.jit(do_not_specialize=["BN", "N", "K", "D", "n_d"])
def _take_kernel(src_ptr, ids_ptr, inv_ptr, fill_ptr, out_ptr, BN, N, K, D, ssb, ssk, ssd, sib, sik, sf, n_d,
                 USE_INV: tl.constexpr, WRITE_INV: tl.constexpr, HAS_FILL: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr):
    """out[b, n] = src[b, k] for the k with ids[b, k] == n, else fill (or 0): every output element written exactly
    once, so no zero-fill pass and no atomics. Program = (ROWS output rows, one D block).
    USE_INV: k = inv[b, n] (flat rows r = b * N + n over the whole batch). Otherwise: ROWS slots of one sample, k
    found by scanning the sample's ids, and stored into inv by the first D block's programs when WRITE_INV."""
    if ALIGN > 1:
        D = (D // ALIGN) * ALIGN
        ssb = (ssb // ALIGN) * ALIGN
        ssk = (ssk // ALIGN) * ALIGN
    pid = tl.program_id(0)
    pr = pid // n_d
    pd = pid - pr * n_d
    if USE_INV:
        r = pr.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = r < BN
        b = r // N
        kk = tl.load(inv_ptr + r, mask=rmask, other=-1)
    else:
        n_tiles = tl.cdiv(N, ROWS)
        b = (pr // n_tiles).to(tl.int64)
        n = (pr % n_tiles) * ROWS + tl.arange(0, ROWS)
        rmask = n < N
        r = b * N + n
        kk = _match(ids_ptr, b, sib, sik, n, N, K, ROWS, BLOCK_K)
        if WRITE_INV:
            if pd == 0:
                tl.store(inv_ptr + r, kk, mask=rmask)
    found = rmask & (kk >= 0) & (kk < K)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    d64 = d.to(tl.int64)
    v = tl.load(src_ptr + (b * ssb + kk.to(tl.int64) * ssk)[:, None] + d64[None, :] * ssd,
                mask=found[:, None] & dmask[None, :], other=0.0)
    if HAS_FILL:
        f = tl.load(fill_ptr + d64 * sf, mask=dmask, other=0.0).to(v.dtype)
        v = tl.where(found[:, None], v, f[None, :])
    tl.store(out_ptr + r[:, None] * D + d64[None, :], v, mask=rmask[:, None] & dmask[None, :])


INTERPRETED = is_interpreted(_gather_kernel)


# ---------------------------------------------------------------------------------------------------------- launch
def pick_config(D: int, elem_size: int, interpret: bool = INTERPRETED) -> dict:
    """GPU: D blocks of <= 1024 columns that divide D when possible (768 -> 3 x 256, no masked lanes) and ~16 KB per
    program; [64, 64] tiles for the inverse index. Interpreter: the whole row and many rows per program (each program
    instance costs milliseconds)."""
    if interpret:
        return dict(BLOCK_D=next_pow2(D), ROWS=max(1, min(256, 65536 // next_pow2(D))), BLOCK_K=256, BLOCK_N=256,
                    num_warps=4)
    # inverse tiles of [32, 64] int32 compares (8 per thread at 8 warps): the inverse role must not raise the
    # register count of the (memory-bound) gather programs that share its kernel
    BLOCK_D = next((c for c in (1024, 512, 256, 128) if D % c == 0), min(next_pow2(D), 1024))
    ROWS = max(1, min(64, 16384 // (BLOCK_D * elem_size)))
    return dict(BLOCK_D=BLOCK_D, ROWS=ROWS, BLOCK_K=64, BLOCK_N=32, num_warps=8 if ROWS * BLOCK_D >= 8192 else 4)


def _align(D, t):
    "ALIGN hint for a [B, rows, D] tensor: only when its last dimension is contiguous."
    return align(D, t.stride(0), t.stride(1)) if t.stride(2) == 1 else 1


def _cfg(D, elem_size, config):
    cfg = pick_config(D, elem_size)
    if config: cfg = {**cfg, **config}
    return cfg


def _tk(t):
    "What one tensor contributes to a launcher key: all that triton specialises on (and that validation checked)."
    return t.shape, t.stride(), t.dtype, t.get_device(), t.data_ptr() & 15


def _ck(config):
    return None if config is None else tuple(sorted(config.items()))


_CACHE: dict = {}
MAX_CACHE = 1024


def _cache(key, value):
    if key is not None:
        if len(_CACHE) >= MAX_CACHE: _CACHE.clear()
        _CACHE[key] = value
    return value


def _gather_launcher(x, ids, extra, with_gather, config):
    """(launcher, trailing int arguments) of `_gather_kernel` on x [B, N, D] and ids [B, K]: gather programs (unless
    not with_gather) + `extra` programs (1: inverse index, 2: fill-gradient partials)."""
    B, N, D = x.shape
    K = ids.shape[1]
    c = _cfg(D, x.element_size(), config)
    n_d = cdiv(D, c["BLOCK_D"])
    n_gather = cdiv(B * K, c["ROWS"]) * n_d if with_gather else 0
    n_extra = B if extra == 1 else (B * n_d if extra == 2 else 0)
    ROWS = c["ROWS"] if with_gather or extra != 2 else min(c["ROWS"], max(1, next_pow2(N)))
    meta = dict(EXTRA=extra, ROWS=ROWS, BLOCK_D=c["BLOCK_D"], BLOCK_N=min(c["BLOCK_N"], max(16, next_pow2(N))),
                BLOCK_K=min(c["BLOCK_K"], max(16, next_pow2(K))), ALIGN=_align(D, x), num_warps=c["num_warps"])
    tail = (B, N, K, D, *x.stride(), *ids.stride(), n_d, n_extra)
    return Launcher(_gather_kernel, (n_extra + n_gather,), meta), tail


def _take_launcher(src, ids, N, use_inv, write_inv, has_fill, sf, config):
    "(launcher, trailing int arguments) of `_take_kernel`: src [B, K, D] into [B, N, D]."
    B, K, D = src.shape
    c = _cfg(D, src.element_size(), config)
    n_d = cdiv(D, c["BLOCK_D"])
    rows = cdiv(B * N, c["ROWS"]) if use_inv else B * cdiv(N, c["ROWS"])
    meta = dict(USE_INV=use_inv, WRITE_INV=write_inv, HAS_FILL=has_fill, ROWS=c["ROWS"], BLOCK_D=c["BLOCK_D"],
                BLOCK_K=min(c["BLOCK_K"], max(16, next_pow2(K))), ALIGN=_align(D, src), num_warps=c["num_warps"])
    sib, sik = ids.stride() if ids.dim() == 2 else (0, 0)
    tail = (B * N, N, K, D, *src.stride(), sib, sik, sf, n_d)
    return Launcher(_take_kernel, (rows * n_d,), meta), tail


# ---------------------------------------------------------------------------- uncached entry points (tools/aot.py)
def gather(x, ids, write_inv=False, config=None):
    "out [B, K, D] (and inv [B, N] int32 when write_inv) on validated arguments."
    B, N, D = x.shape
    out = torch.empty((B, ids.shape[1], D), dtype=x.dtype, device=x.device)
    inv = torch.empty((B, N), dtype=I32, device=x.device) if write_inv else None
    L, tail = _gather_launcher(x, ids, 1 if write_inv else 0, True, config)
    L(x, ids, out, ids if inv is None else inv, out, *tail)
    return out, inv


def take(src, ids, N, inv=None, fill=None, write_inv=False, config=None):
    """[B, N, D]: src rows by inv (given, not write_inv) or by a scan of ids (then inv is written when write_inv),
    fill (or 0) elsewhere. Returns (out, inv)."""
    B, K, D = src.shape
    out = torch.empty((B, N, D), dtype=src.dtype, device=src.device)
    use_inv = inv is not None and not write_inv
    if write_inv and inv is None: inv = torch.empty((B, N), dtype=I32, device=src.device)
    sf = (fill.stride(-1) if fill.dim() else 0) if fill is not None else 0
    L, tail = _take_launcher(src, ids, N, use_inv, write_inv, fill is not None, sf, config)
    L(src, ids, out if inv is None else inv, out if fill is None else fill, out, *tail)
    return out, inv


def scatter_grads(g, ids, inv, need_tokens, need_fill, config=None):
    "Backward of scatter: (grad_tokens [B, K, D] or None, fp32 partial fill gradients [B, D] or None)."
    B, N, D = g.shape
    K = ids.shape[1]
    gt = torch.empty((B, K, D), dtype=g.dtype, device=g.device) if need_tokens else None
    part = torch.empty((B, D), dtype=F32, device=g.device) if need_fill else None
    L, tail = _gather_launcher(g, ids, 2 if need_fill else 0, need_tokens, config)
    L(g, ids, part if gt is None else gt, inv if need_fill else ids, gt if part is None else part, *tail)
    return gt, part


# ------------------------------------------------------------------------------------- cached launches (hot paths)
def _gather_fwd(x, ids, need_grad, config):
    """`out[b, k] = x[b, ids[b, k]]` and, when need_grad, the inverse index for the backward: (out, inv or None,
    (B, N, K, D)), or None when there is nothing to launch (an empty output). A call whose key (shapes, strides,
    dtypes, devices, 16-byte alignment, grad mode) was validated before skips the checks (except the value checks of
    CPU ids, which run on every call) and reuses its launcher."""
    try:
        key = ("gather", _tk(x), _tk(ids), need_grad, _ck(config))
    except AttributeError:          # not tensors: the checks say what is wrong
        key = None
    ent = _CACHE.get(key) if key is not None else None
    if ent is None:
        B, N, D, K = check_gather(x, ids, distinct=True)
        if B * K * D == 0: return None
        L, tail = _gather_launcher(x, ids, 1 if need_grad else 0, True, config)
        ent = _cache(key, (L, tail, (B, N, K, D), x.device))
    elif ids.get_device() < 0:
        check_ids_values(ids, ent[2][1], True)
    L, tail, dims, dev = ent
    B, N, K, D = dims
    out = torch.empty((B, K, D), dtype=x.dtype, device=dev)
    inv = torch.empty((B, N), dtype=I32, device=dev) if need_grad else None
    L(x, ids, out, ids if inv is None else inv, out, *tail)
    return out, inv, dims


def gather_backward(g, inv, N, config=None):
    "`grad_x[b, n] = g[b, inv[b, n]]`, 0 where inv < 0: [B, N, D] in g's dtype."
    key = ("gather_bwd", _tk(g), N, _ck(config))
    ent = _CACHE.get(key)
    if ent is None: ent = _cache(key, _take_launcher(g, inv, N, True, False, False, 0, config))
    L, tail = ent
    B, K, D = g.shape
    gx = torch.empty((B, N, D), dtype=g.dtype, device=g.device)
    L(g, inv, inv, inv, gx, *tail)
    return gx


def _scatter_fwd(tokens, ids, N, fill, need_f, config):
    """The scatter forward and, when need_f, the inverse index the fill gradient needs: (out, inv or None), or None
    when there is nothing to launch. Cached as `_gather_fwd`."""
    try:
        if type(N) is not int: raise AttributeError
        key = ("scatter", _tk(tokens), _tk(ids), _tk(fill), N, need_f, _ck(config))
    except AttributeError:
        key = None
    ent = _CACHE.get(key) if key is not None else None
    if ent is None:
        B, N, D, K = check_scatter(tokens, ids, N, fill)
        if B * D == 0: return None
        sf = fill.stride(-1) if fill.dim() else 0
        L, tail = _take_launcher(tokens, ids, N, False, need_f, True, sf, config)
        ent = _cache(key, (L, tail, (B, N, K, D), tokens.device))
    elif ids.get_device() < 0:
        check_ids_values(ids, N, True)
    L, tail, (B, N, K, D), dev = ent
    out = torch.empty((B, N, D), dtype=tokens.dtype, device=dev)
    inv = torch.empty((B, N), dtype=I32, device=dev) if need_f else None
    L(tokens, ids, out if inv is None else inv, fill, out, *tail)
    return out, inv


def scatter_backward(g, ids, inv, need_t, need_f, config=None):
    "The scatter backward: (grad_tokens [B, K, D] or None, fp32 fill-gradient partials [B, D] or None)."
    key = ("scatter_bwd", _tk(g), _tk(ids), need_t, need_f, _ck(config))
    ent = _CACHE.get(key)
    if ent is None: ent = _cache(key, _gather_launcher(g, ids, 2 if need_f else 0, need_t, config))
    L, tail = ent
    B, N, D = g.shape
    gt = torch.empty((B, ids.shape[1], D), dtype=g.dtype, device=g.device) if need_t else None
    part = torch.empty((B, D), dtype=F32, device=g.device) if need_f else None
    L(g, ids, part if gt is None else gt, inv if need_f else ids, gt if part is None else part, *tail)
    return gt, part


# ---------------------------------------------------------------------------------------------------------- autograd
class _Gather(torch.autograd.Function):
    """The forward kernel runs before `apply`; st = (out, inv, N, config). ctx keeps all but the output (an output
    held by its own grad_fn is a reference cycle)."""

    @staticmethod
    def forward(ctx, x, st):
        ctx.st = st[1:]
        return st[0]

    @staticmethod
    def backward(ctx, g):
        first_order_only("gather_tokens")
        inv, N, config = ctx.st
        return gather_backward(g, inv, N, config), None


class _Scatter(torch.autograd.Function):
    "The forward kernel runs before `apply`; st = (out, inv, ids, fill shape, fill dtype, config); ctx keeps st[1:]."

    @staticmethod
    def forward(ctx, tokens, fill, st):
        ctx.st = st[1:]
        return st[0]

    @staticmethod
    def backward(ctx, g):
        first_order_only("scatter_tokens")
        inv, ids, fshape, fdtype, config = ctx.st
        need_t, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_t or need_f): return None, None, None
        gt, part = scatter_backward(g, ids, inv, need_t, need_f, config)
        return gt, (None if part is None else fill_grad(part, fshape, fdtype)), None


# ----------------------------------------------------------------------------------------------------------- API
def gather_tokens(x, ids, *, _config=None):
    "The eager hot path: `_gather_fwd` and the minimal autograd node."
    try:
        need_grad = x.requires_grad and _grad_enabled()
    except AttributeError:
        need_grad = False
    res = _gather_fwd(x, ids, need_grad, _config)
    if res is None: return gather_tokens_ref(x, ids)           # nothing to launch
    out, inv, dims = res
    if not need_grad: return out
    return _Gather.apply(x, (out, inv, dims[1], _config))


def scatter_tokens(tokens, ids, N, fill, *, _config=None):
    "The eager hot path, as `gather_tokens`."
    try:
        grad = _grad_enabled()
        need_f = grad and fill.requires_grad
        need_grad = need_f or (grad and tokens.requires_grad)
    except AttributeError:
        need_f = need_grad = False
    res = _scatter_fwd(tokens, ids, N, fill, need_f, _config)
    if res is None: return scatter_tokens_ref(tokens, ids, N, fill)   # nothing to launch
    out, inv = res
    if not need_grad: return out
    return _Scatter.apply(tokens, fill, (out, inv, ids, fill.shape, fill.dtype, _config))
