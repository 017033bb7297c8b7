"""Row gather / scatter of tokens ([B, N, D] <-> [B, K, D] by per-sample ids), with backward. Imports triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import align, is_interpreted, cdiv, next_pow2
from ._validate import check_gather, check_scatter
from .reference import gather_tokens_ref, scatter_tokens_ref


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["B", "N", "K", "D"])
def _gather_kernel(x_ptr, ids_ptr, out_ptr, B, N, K, D, sxb, sxn, sxd, sib, sik,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """out[r] = x[b, ids[b, k]] for the flat output rows r = b * K + k of this program, columns of one D block.
    Out-of-range ids (never produced by the checked CPU path) give zeros instead of an out-of-bounds read.
    ALIGN: a power of 2 dividing D and the row strides (see _triton_losses): 16-byte vector loads and stores."""
    if ALIGN > 1:
        D = (D // ALIGN) * ALIGN
        sxb = (sxb // ALIGN) * ALIGN
        sxn = (sxn // ALIGN) * ALIGN
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < B * K
    b = r // K
    k = r - b * K
    idx = tl.load(ids_ptr + b * sib + k * sik, mask=rmask, other=-1).to(tl.int64)
    ok = rmask & (idx >= 0) & (idx < N)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    d64 = d.to(tl.int64)
    v = tl.load(x_ptr + (b * sxb + idx * sxn)[:, None] + d64[None, :] * sxd, mask=ok[:, None] & dmask[None, :],
                other=0.0)
    tl.store(out_ptr + r[:, None] * D + d64[None, :], v, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _match(ids_ptr, b, sib, sik, n, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    "For each slot n of row b: the k with ids[b, k] == n (the largest such k), or -1 when n was not kept."
    kk = tl.full([ROWS], -1, dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kv = k0 + tl.arange(0, BLOCK_K)
        idk = tl.load(ids_ptr + b * sib + kv.to(tl.int64) * sik, mask=kv < K, other=-1).to(tl.int64)
        hit = idk[None, :] == n[:, None]
        kk = tl.maximum(kk, tl.max(tl.where(hit, kv[None, :], -1), axis=1))
    return kk


@triton.jit(do_not_specialize=["N", "K", "D"])
def _scatter_kernel(tok_ptr, ids_ptr, fill_ptr, out_ptr, N, K, D, stb, stk, std, sib, sik, sf,
                    HAS_FILL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                    ALIGN: tl.constexpr):
    """out[b, n] = tokens[b, k] where ids[b, k] == n, else fill (or 0): every output element is written exactly once,
    so no zero-fill pass and no atomics. A program owns ROWS slots of one sample and one D block."""
    if ALIGN > 1:
        D = (D // ALIGN) * ALIGN
        stb = (stb // ALIGN) * ALIGN
        stk = (stk // ALIGN) * ALIGN
    n_tiles = tl.cdiv(N, ROWS)
    pid = tl.program_id(0)
    b = (pid // n_tiles).to(tl.int64)
    n = (pid % n_tiles).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    nmask = n < N
    kk = _match(ids_ptr, b, sib, sik, n, K, ROWS, BLOCK_K)
    found = kk >= 0
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    d64 = d.to(tl.int64)
    v = tl.load(tok_ptr + (b * stb + kk.to(tl.int64) * stk)[:, None] + d64[None, :] * std,
                mask=found[:, None] & dmask[None, :], other=0.0)
    if HAS_FILL:
        f = tl.load(fill_ptr + d64 * sf, mask=dmask, other=0.0).to(v.dtype)
        v = tl.where(found[:, None], v, f[None, :])
    tl.store(out_ptr + (b * N + n)[:, None] * D + d64[None, :], v, mask=nmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["N", "K", "D"])
def _fill_grad_kernel(g_ptr, ids_ptr, part_ptr, N, K, D, sgb, sgn, sgd, sib, sik,
                      ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr):
    "part[b, d] = sum of g[b, n, d] over the slots n of sample b that hold the fill token (fp32)."
    if ALIGN > 1:
        D = (D // ALIGN) * ALIGN
        sgb = (sgb // ALIGN) * ALIGN
        sgn = (sgn // ALIGN) * ALIGN
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    d64 = d.to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, ROWS):
        n = n0 + tl.arange(0, ROWS).to(tl.int64)
        kk = _match(ids_ptr, b, sib, sik, n, K, ROWS, BLOCK_K)
        free = (n < N) & (kk < 0)
        g = tl.load(g_ptr + (b * sgb + n * sgn)[:, None] + d64[None, :] * sgd, mask=free[:, None] & dmask[None, :],
                    other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(part_ptr + b * D + d64, acc, mask=dmask)


INTERPRETED = is_interpreted(_gather_kernel)


# ---------------------------------------------------------------------------------------------------------- launch
def pick_config(D: int, elem_size: int, interpret: bool = INTERPRETED) -> dict:
    """GPU: D blocks of <= 1024 columns that divide D when possible (768 -> 3 x 256, no masked lanes) and ~16 KB per
    program; interpreter: the whole row and many rows per program (each program instance costs milliseconds)."""
    if interpret:
        return dict(BLOCK_D=next_pow2(D), ROWS=max(1, min(256, 65536 // next_pow2(D))), BLOCK_K=256, num_warps=4)
    BLOCK_D = next((c for c in (1024, 512, 256, 128) if D % c == 0), min(next_pow2(D), 1024))
    ROWS = max(1, min(64, 16384 // (BLOCK_D * elem_size)))
    return dict(BLOCK_D=BLOCK_D, ROWS=ROWS, BLOCK_K=64, num_warps=8 if ROWS * BLOCK_D >= 8192 else 4)


def _align(D, t):
    "ALIGN hint for a [B, rows, D] tensor: only when its last dimension is contiguous."
    return align(D, t.stride(0), t.stride(1)) if t.stride(2) == 1 else 1


def _cfg(D, elem_size, config):
    cfg = pick_config(D, elem_size)
    if config: cfg = {**cfg, **config}
    return cfg


def gather(x, ids, config=None):
    B, N, D = x.shape
    K = ids.shape[1]
    out = torch.empty((B, K, D), dtype=x.dtype, device=x.device)
    c = _cfg(D, x.element_size(), config)
    grid = (cdiv(B * K, c["ROWS"]), cdiv(D, c["BLOCK_D"]))
    _gather_kernel[grid](x, ids, out, B, N, K, D, *x.stride(), *ids.stride(),
                         ROWS=c["ROWS"], BLOCK_D=c["BLOCK_D"], ALIGN=_align(D, x), num_warps=c["num_warps"])
    return out


def scatter(tokens, ids, N, fill, config=None):
    "fill: a [D] tensor or None (zeros)."
    B, K, D = tokens.shape
    out = torch.empty((B, N, D), dtype=tokens.dtype, device=tokens.device)
    c = _cfg(D, tokens.element_size(), config)
    BLOCK_K = min(c["BLOCK_K"], max(16, next_pow2(K)))
    grid = (B * cdiv(N, c["ROWS"]), cdiv(D, c["BLOCK_D"]))
    _scatter_kernel[grid](tokens, ids, fill if fill is not None else out, out, N, K, D, *tokens.stride(),
                          *ids.stride(), fill.stride(0) if fill is not None else 0, HAS_FILL=fill is not None,
                          ROWS=c["ROWS"], BLOCK_D=c["BLOCK_D"], BLOCK_K=BLOCK_K, ALIGN=_align(D, tokens),
                          num_warps=c["num_warps"])
    return out


def fill_grad(g, ids, config=None):
    "Gradient of scatter_tokens w.r.t. fill: the sum of g over the fill slots, fp32 [D]."
    B, N, D = g.shape
    K = ids.shape[1]
    part = torch.empty((B, D), dtype=torch.float32, device=g.device)
    c = _cfg(D, g.element_size(), config)
    BLOCK_K = min(c["BLOCK_K"], max(16, next_pow2(K)))
    ROWS = min(c["ROWS"], max(1, next_pow2(N)))
    _fill_grad_kernel[(B, cdiv(D, c["BLOCK_D"]))](g, ids, part, N, K, D, *g.stride(), *ids.stride(), ROWS=ROWS,
                                                  BLOCK_D=c["BLOCK_D"], BLOCK_K=BLOCK_K, ALIGN=_align(D, g),
                                                  num_warps=c["num_warps"])
    return part.sum(0)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, config):
        ctx.save_for_backward(ids)
        ctx.N, ctx.config = x.shape[1], config
        return gather(x, ids, config)

    @staticmethod
    def backward(ctx, g):
        ids, = ctx.saved_tensors
        return scatter(g, ids, ctx.N, None, ctx.config), None, None     # zeros where nothing was gathered


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, ids, N, fill, config):
        ctx.save_for_backward(ids)
        ctx.config, ctx.fill_shape, ctx.fill_dtype = config, fill.shape, fill.dtype
        return scatter(tokens, ids, N, fill.reshape(-1), config)

    @staticmethod
    def backward(ctx, g):
        ids, = ctx.saved_tensors
        gt = gather(g, ids, ctx.config) if ctx.needs_input_grad[0] else None
        gf = fill_grad(g, ids, ctx.config).to(ctx.fill_dtype).reshape(ctx.fill_shape) \
            if ctx.needs_input_grad[3] else None
        return gt, None, None, gf, None


def gather_tokens(x, ids, *, _config=None):
    B, N, D, K = check_gather(x, ids, distinct=True)
    if B * K * D == 0: return gather_tokens_ref(x, ids)          # nothing to launch
    return _Gather.apply(x, ids, _config)


def scatter_tokens(tokens, ids, N, fill, *, _config=None):
    B, N, D, K = check_scatter(tokens, ids, N, fill)
    if B * D == 0: return scatter_tokens_ref(tokens, ids, N, fill)   # nothing to launch
    return _Scatter.apply(tokens, ids, N, fill, _config)
