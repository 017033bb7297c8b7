"""Fused FixMatch / ReFixMatch / SequenceMatch unlabeled losses: one Triton pass over the rows of logits.

Imported lazily by `ssl_nb.kernels` (see `_runtime.triton_module`): importing this module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


from ._launch import Launcher
from ._runtime import (align, is_interpreted, cdiv, first_order_only, next_pow2, second_backward, ticket_counters,
                       ticket_slot)
from ._triton_common import FINAL_BLOCK, scale_, scale_launcher, sum_partials
from ._validate import check_losses, kl_mode_of

NEG = tl.constexpr(-1.0e30)   # padding logit: exp(NEG - max) == 0, and NEG * 0 == 0 (no inf * 0 NaN)
MAX_BLOCK_C = 4096     # wider rows loop over class blocks (two passes: online statistics, then terms + gradients)


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _load_tile(ptr, rows64, s_r, cols, s_c, m2, NEG: tl.constexpr):
    "A [BLOCK_R, BLOCK_C] tile of logits in fp32; padding (rows and classes outside the tensor) is NEG."
    z = tl.load(ptr + rows64[:, None] * s_r + cols.to(tl.int64)[None, :] * s_c, mask=m2, other=0.0)
    return tl.where(m2, z.to(tl.float32), NEG)


@triton.jit
def _online(m, Z, ZT, z, inv_T, SHARP: tl.constexpr):
    "One step of the online softmax: running max m, sum of exp(z - m) and of exp((z - m) / T), rescaled."
    new = tl.maximum(m, tl.max(z, axis=1))
    Z = Z * tl.exp(m - new) + tl.sum(tl.exp(z - new[:, None]), axis=1)
    if SHARP:
        ZT = ZT * tl.exp((m - new) * inv_T) + tl.sum(tl.exp((z - new[:, None]) * inv_T), axis=1)
    return new, Z, ZT


@triton.jit
def _terms(zw, zm, zs, p_s, t_w, p_m, t_m, cols, m2, label, mw, lZwT, mm, lZm, lZmT, ms, lZs,
           g_ce, g_ws, g_wm, g_ms, gm_ptr, gs_ptr, goff, inv_T,
           HAS_M: tl.constexpr, NEED_TW: tl.constexpr, WRITE_GRAD: tl.constexpr, ONE_SUM: tl.constexpr):
    """Per-row partial sums over one class block of CE(s, label), KL(t_w||p_s), KL(t_w||p_m), KL(t_m||p_s), and the
    gradients of the block: d/dz_s = g_ce (p_s - onehot) + g_ws (p_s - t_w) + g_ms (p_s - t_m), d/dz_m = g_wm (p_m - t_w),
    where the g_* are the per-row weights already divided by the row count. The probabilities p_s, t_w = softmax(z_w/T),
    p_m, t_m = softmax(z_m/T) come in (computed once); the log-probabilities are recomputed here (no exp, no log).
    ONE_SUM: one reduction of the weighted terms instead of four, returned as (row loss / R, 0, 0, 0)."""
    logp_s = zs - ms[:, None] - lZs[:, None]
    onehot = cols[None, :] == label[:, None]
    if ONE_SUM:
        el = g_ce[:, None] * tl.where(onehot, -logp_s, 0.0)
    else:
        ce = tl.sum(tl.where(onehot & m2, -logp_s, 0.0), axis=1)
    zero = tl.zeros_like(g_ce)
    kl_ws = zero
    kl_wm = zero
    kl_ms = zero
    gs = g_ce[:, None] * (p_s - tl.where(onehot, 1.0, 0.0))
    if NEED_TW:   # the weak view's sharpened target
        logt_w = (zw - mw[:, None]) * inv_T - lZwT[:, None]
        if ONE_SUM:
            el += g_ws[:, None] * (t_w * (logt_w - logp_s))
        else:
            kl_ws = tl.sum(tl.where(m2, t_w * (logt_w - logp_s), 0.0), axis=1)
        gs += g_ws[:, None] * (p_s - t_w)
        if HAS_M:
            logp_m = zm - mm[:, None] - lZm[:, None]
            logt_m = (zm - mm[:, None]) * inv_T - lZmT[:, None]
            if ONE_SUM:
                el += g_wm[:, None] * (t_w * (logt_w - logp_m)) + g_ms[:, None] * (t_m * (logt_m - logp_s))
            else:
                kl_wm = tl.sum(tl.where(m2, t_w * (logt_w - logp_m), 0.0), axis=1)
                kl_ms = tl.sum(tl.where(m2, t_m * (logt_m - logp_s), 0.0), axis=1)
            gs += g_ms[:, None] * (p_s - t_m)
            if WRITE_GRAD:
                gm = g_wm[:, None] * (p_m - t_w)
                tl.store(gm_ptr + goff, gm.to(gm_ptr.dtype.element_ty), mask=m2)
    if WRITE_GRAD:
        tl.store(gs_ptr + goff, gs.to(gs_ptr.dtype.element_ty), mask=m2)
    if ONE_SUM:
        ce = tl.sum(tl.where(m2, el, 0.0), axis=1)
    return ce, kl_ws, kl_wm, kl_ms


@triton.jit
def _max_label_combine(w0, i0, s0, m0, w1, i1, s1, m1):
    "Row maxima of the three views and the weak view's argmax (the first maximum, as torch.max) in one reduction."
    take = (w1 > w0) | ((w1 == w0) & (i1 < i0))
    return tl.where(take, w1, w0), tl.where(take, i1, i0), tl.maximum(s0, s1), tl.maximum(m0, m1)


@triton.jit
def _sum5(a0, b0, c0, d0, e0, a1, b1, c1, d1, e1):
    return a0 + a1, b0 + b1, c0 + c1, d0 + d1, e0 + e1


@triton.jit
def _sum3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _sum2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _stats_fused(zw, zm, zs, cols, inv_T, HAS_M: tl.constexpr, NEED_TW: tl.constexpr):
    """Every whole-row statistic of a tile in two multi-operand reductions (one cross-warp exchange each, where
    separate tl.max / tl.sum / tl.argmax calls pay one per statistic): the maxima and the weak argmax, then the sums of
    exp at T = 1 and at T. Returns (label, mw, ew, Zw, ewT, ZwT, ms, es, Zs, mm, em, Zm, emT, ZmT)."""
    idx = tl.broadcast_to(cols[None, :], zw.shape)
    mw, label, ms, mm = tl.reduce((zw, idx, zs, zm), 1, _max_label_combine)
    ew = tl.exp(zw - mw[:, None])
    es = tl.exp(zs - ms[:, None])
    ewT, em, emT = ew, es, es
    if HAS_M:
        ewT = tl.exp((zw - mw[:, None]) * inv_T)
        em = tl.exp(zm - mm[:, None])
        emT = tl.exp((zm - mm[:, None]) * inv_T)
        Zw, ZwT, Zs, Zm, ZmT = tl.reduce((ew, ewT, es, em, emT), 1, _sum5)
    elif NEED_TW:
        ewT = tl.exp((zw - mw[:, None]) * inv_T)
        Zw, ZwT, Zs = tl.reduce((ew, ewT, es), 1, _sum3)
        Zm, ZmT = Zs, Zs
    else:
        Zw, Zs = tl.reduce((ew, es), 1, _sum2)
        ZwT, Zm, ZmT = Zw, Zs, Zs
    return label.to(tl.int32), mw, ew, Zw, ewT, ZwT, ms, es, Zs, mm, em, Zm, emT, ZmT


@triton.jit
def _softmax_tile(z, inv_T, SHARP: tl.constexpr):
    "Whole-row statistics of a tile holding complete rows: max, exp(z - max) and its sum, and the same at T."
    m = tl.max(z, axis=1)
    e = tl.exp(z - m[:, None])
    eT = e
    if SHARP:
        eT = tl.exp((z - m[:, None]) * inv_T)
    return m, e, tl.sum(e, axis=1), eT, tl.sum(eT, axis=1)


@triton.jit(do_not_specialize=["R", "C", "slot"])
def _consistency_kernel(zw_ptr, zm_ptr, zs_ptr, s_wr, s_wc, s_mr, s_mc, s_sr, s_sc,
                        mask_ptr, s_mask, gm_ptr, gs_ptr, mask_out_ptr, part_ptr, count_ptr, slot,
                        R, C, threshold, inv_T, inv_R,
                        HAS_M: tl.constexpr, HAS_MASK: tl.constexpr, LOW_CONF: tl.constexpr,
                        NEED_TW: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                        ROW_TILES: tl.constexpr, ONE_BLOCK: tl.constexpr, ALIGN: tl.constexpr,
                        PREFETCH: tl.constexpr, KL_MODE: tl.constexpr, FUSED_REDUCE: tl.constexpr,
                        LAST_PROGRAM_SUMS: tl.constexpr):
    """Rows [pid * ROW_TILES * BLOCK_R, ...): for each tile of BLOCK_R rows, the softmax statistics of every view, the
    pseudo-label, the masks, the row losses and the gradients (written now, scaled by grad_output in backward).
    ALIGN (a power of 2 the host found to divide C and the row strides) lets the compiler see that rows start on
    ALIGN-element boundaries and that the class mask is constant over ALIGN lanes: 16-byte vector loads and stores.
    KL_MODE: which target rows SequenceMatch's three KLD terms keep: 0 confident (the authors' code), 1 unconfident,
    2 all (`kl_mask` 'high' / 'low' / 'all'); the CE mask is the confident one whatever the mode.
    PREFETCH (ONE_BLOCK with ROW_TILES > 1): the loads of the next tile are issued before the current tile is
    computed, so that their memory latency overlaps the arithmetic and reductions of this one.
    FUSED_REDUCE (ONE_BLOCK): the row statistics in two multi-operand reductions and the four loss terms in one
    (`_stats_fused`, `_terms`' ONE_SUM): 3 reductions per row instead of 13, i.e. fewer cross-warp exchanges, each
    a shared-memory round trip between barriers, when a row spans several warps (C ~ 1000).
    LAST_PROGRAM_SUMS (several programs): the loss summed over the programs in this launch (`sum_partials`, with the
    ticket counter count_ptr[slot]; the loss at part[0]) instead of by a second launch over the partials."""
    if ALIGN > 1:   # identities, written so that the compiler's alignment analysis can see them
        C = (C // ALIGN) * ALIGN
        s_wr = (s_wr // ALIGN) * ALIGN
        s_mr = (s_mr // ALIGN) * ALIGN
        s_sr = (s_sr // ALIGN) * ALIGN
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_C)
    if PREFETCH:        # the first tile's views
        rows = pid.to(tl.int64) * ROW_TILES * BLOCK_R + tl.arange(0, BLOCK_R)
        m2 = (rows < R)[:, None] & (cols < C)[None, :]
        next_w = _load_tile(zw_ptr, rows, s_wr, cols, s_wc, m2, NEG)
        next_s = _load_tile(zs_ptr, rows, s_sr, cols, s_sc, m2, NEG)
        next_m = next_s
        if HAS_M:
            next_m = _load_tile(zm_ptr, rows, s_mr, cols, s_mc, m2, NEG)
    for t in range(ROW_TILES):
        rows = (pid.to(tl.int64) * ROW_TILES + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        zero = tl.zeros([BLOCK_R], dtype=tl.float32)
        # ---- pass 1: softmax statistics (max, sums of exp at T = 1 and at T) and the weak view's argmax
        if ONE_BLOCK:    # whole rows in registers: every exp is computed once
            m2 = rmask[:, None] & (cols < C)[None, :]
            if PREFETCH:
                zw, zs, zm = next_w, next_s, next_m
                m2n = ((rows + BLOCK_R) < R)[:, None] & (cols < C)[None, :] & (t + 1 < ROW_TILES)
                next_w = _load_tile(zw_ptr, rows + BLOCK_R, s_wr, cols, s_wc, m2n, NEG)
                next_s = _load_tile(zs_ptr, rows + BLOCK_R, s_sr, cols, s_sc, m2n, NEG)
                next_m = next_s
                if HAS_M:
                    next_m = _load_tile(zm_ptr, rows + BLOCK_R, s_mr, cols, s_mc, m2n, NEG)
            else:
                zw = _load_tile(zw_ptr, rows, s_wr, cols, s_wc, m2, NEG)
                zs = _load_tile(zs_ptr, rows, s_sr, cols, s_sc, m2, NEG)
                zm = zs
                if HAS_M:
                    zm = _load_tile(zm_ptr, rows, s_mr, cols, s_mc, m2, NEG)
            if FUSED_REDUCE:
                label, mw, ew, Zw, ewT, ZwT, ms, es, Zs, mm, em, Zm, emT, ZmT = _stats_fused(
                    zw, zm, zs, cols, inv_T, HAS_M, NEED_TW)
            else:
                label = tl.argmax(zw, axis=1).to(tl.int32)
                mw, ew, Zw, ewT, ZwT = _softmax_tile(zw, inv_T, NEED_TW)
                ms, es, Zs, _e, _z = _softmax_tile(zs, inv_T, False)
                mm, em, Zm, emT, ZmT = ms, es, Zs, es, Zs
                if HAS_M:
                    mm, em, Zm, emT, ZmT = _softmax_tile(zm, inv_T, True)
            p_s = es * (1.0 / Zs)[:, None]
            t_w = ewT * (1.0 / ZwT)[:, None]
            p_m, t_m = p_s, p_s
            if HAS_M:
                p_m = em * (1.0 / Zm)[:, None]
                t_m = emT * (1.0 / ZmT)[:, None]
        else:
            mw, Zw, ZwT = zero + NEG, zero, zero
            ms, Zs = zero + NEG, zero
            mm, Zm, ZmT = zero + NEG, zero, zero
            label = tl.zeros([BLOCK_R], dtype=tl.int32)
            for c0 in range(0, C, BLOCK_C):
                cb = c0 + cols
                m2 = rmask[:, None] & (cb < C)[None, :]
                zw = _load_tile(zw_ptr, rows, s_wr, cb, s_wc, m2, NEG)
                bmax = tl.max(zw, axis=1)
                label = tl.where(bmax > mw, tl.argmax(zw, axis=1).to(tl.int32) + c0, label)   # first max wins
                mw, Zw, ZwT = _online(mw, Zw, ZwT, zw, inv_T, NEED_TW)
                zs = _load_tile(zs_ptr, rows, s_sr, cb, s_sc, m2, NEG)
                ms, Zs, _u = _online(ms, Zs, Zs, zs, inv_T, False)
                if HAS_M:
                    zm = _load_tile(zm_ptr, rows, s_mr, cb, s_mc, m2, NEG)
                    mm, Zm, ZmT = _online(mm, Zm, ZmT, zm, inv_T, True)
        # ---- per-row confidence, masks and term weights
        keep_w = tl.where(1.0 / Zw >= threshold, 1.0, 0.0)
        if HAS_MASK:
            msk = tl.load(mask_ptr + rows * s_mask, mask=rmask, other=0.0).to(tl.float32)
        else:
            msk = keep_w
            tl.store(mask_out_ptr + rows, msk, mask=rmask)
        g_ws = zero
        if LOW_CONF:
            g_ws = 1.0 - msk
        g_wm = zero
        g_ms = zero
        if HAS_M:
            kl_w = keep_w
            kl_m = tl.where(1.0 / Zm >= threshold, 1.0, 0.0)
            if KL_MODE == 1:
                kl_w = 1.0 - kl_w
                kl_m = 1.0 - kl_m
            if KL_MODE == 2:
                kl_w = zero + 1.0
                kl_m = zero + 1.0
            g_ws += kl_w
            g_wm = kl_w
            g_ms = kl_m
        lZwT = tl.log(ZwT)
        lZm = tl.log(Zm)
        lZmT = tl.log(ZmT)
        lZs = tl.log(Zs)
        # ---- pass 2: loss terms and gradients
        if ONE_BLOCK:
            goff = rows[:, None] * C + cols[None, :]
            ce, kl_ws, kl_wm, kl_ms = _terms(zw, zm, zs, p_s, t_w, p_m, t_m, cols, m2, label, mw, lZwT, mm, lZm,
                                             lZmT, ms, lZs,
                                             msk * inv_R, g_ws * inv_R, g_wm * inv_R, g_ms * inv_R,
                                             gm_ptr, gs_ptr, goff, inv_T, HAS_M, NEED_TW, WRITE_GRAD, FUSED_REDUCE)
        else:
            ce, kl_ws, kl_wm, kl_ms = zero, zero, zero, zero
            for c0 in range(0, C, BLOCK_C):
                cb = c0 + cols
                m2 = rmask[:, None] & (cb < C)[None, :]
                zw = _load_tile(zw_ptr, rows, s_wr, cb, s_wc, m2, NEG)
                zs = _load_tile(zs_ptr, rows, s_sr, cb, s_sc, m2, NEG)
                p_s = tl.exp(zs - ms[:, None] - lZs[:, None])
                t_w = p_s
                if NEED_TW:
                    t_w = tl.exp((zw - mw[:, None]) * inv_T - lZwT[:, None])
                zm, p_m, t_m = zs, p_s, p_s
                if HAS_M:
                    zm = _load_tile(zm_ptr, rows, s_mr, cb, s_mc, m2, NEG)
                    p_m = tl.exp(zm - mm[:, None] - lZm[:, None])
                    t_m = tl.exp((zm - mm[:, None]) * inv_T - lZmT[:, None])
                goff = rows[:, None] * C + cb[None, :]
                a, b, c, d = _terms(zw, zm, zs, p_s, t_w, p_m, t_m, cb, m2, label, mw, lZwT, mm, lZm, lZmT, ms, lZs,
                                    msk * inv_R, g_ws * inv_R, g_wm * inv_R, g_ms * inv_R,
                                    gm_ptr, gs_ptr, goff, inv_T, HAS_M, NEED_TW, WRITE_GRAD, False)
                ce += a
                kl_ws += b
                kl_wm += c
                kl_ms += d
        if ONE_BLOCK and FUSED_REDUCE:
            row = ce                         # the weighted row loss, already divided by R (ONE_SUM)
        else:
            row = (msk * ce + g_ws * kl_ws + g_wm * kl_wm + g_ms * kl_ms) * inv_R
        acc += tl.where(rmask, row, 0.0)
    if LAST_PROGRAM_SUMS:
        sum_partials(part_ptr, count_ptr + slot, tl.sum(acc, axis=0), FINAL_BLOCK)
    else:
        tl.store(part_ptr + pid, tl.sum(acc, axis=0))


INTERPRETED = is_interpreted(_consistency_kernel)
F32 = torch.float32
_grad_enabled = torch.is_grad_enabled


# ---------------------------------------------------------------------------------------------------------- launch
def pick_config(R: int, C: int, interpret: bool = INTERPRETED, views: int = 3) -> dict:
    """Block sizes and flags of the loss kernel for R rows of C classes (`views`: 3 for SequenceMatch, 2 otherwise).
    GPU:
    - BLOCK_C = next_pow2(C), at least 16, at most MAX_BLOCK_C (above: two sweeps over class blocks);
    - BLOCK_R = 16 rows per tile for C <= 128 (448 x 10: 28 programs), ~1024 values per tile above, i.e. one row per
      tile from C ~ 1000 up (Liger-Kernel's layout); a batch of at most 4 tiles goes to one program that walks them
      (ROW_TILES); num_warps 4 up to 1024 values per tile, 8 up to 4096, 16 above;
    - SequenceMatch with one row per tile and at least 8192 rows: 16 rows per program, PREFETCH (the next row's loads
      issued before this row's math);
    - LAST_PROGRAM_SUMS (the loss summed by the last program, in the same launch) wherever a program owns more than
      one row; with one row per program a second launch sums the partials (the tickets of many short programs can
      cost more than that launch);
    - FUSED_REDUCE: 3 reductions per row instead of 13.
    The timings of these layouts and of the alternatives (`benchmarks/kernels.py --tune`) on an H100:
    benchmarks/results/kernels-h100.md.
    Interpreter: up to 32768 values per tile, since each program instance costs milliseconds, and the separate
    reductions (the interpreter runs a multi-operand reduction's combine function in Python, element by element)."""
    BLOCK_C = max(16, min(next_pow2(C), MAX_BLOCK_C))
    if interpret:
        BLOCK_R = min(next_pow2(R), max(1, 32768 // BLOCK_C))
        return dict(BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R, ROW_TILES=1, num_warps=4, FUSED_REDUCE=False)
    BLOCK_R = min(next_pow2(R), 16 if BLOCK_C <= 128 else max(1, 1024 // BLOCK_C))
    tiles = cdiv(R, BLOCK_R)
    tile = BLOCK_R * BLOCK_C
    cfg = dict(BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R, ROW_TILES=tiles if tiles <= 4 else 1,
               num_warps=4 if tile <= 1024 else (8 if tile <= 4096 else 16), FUSED_REDUCE=True)
    if views == 3 and BLOCK_R == 1 and R >= 8192 and C <= BLOCK_C:
        # many long rows: 16 rows per program, the next row's loads in flight during this row's math (SequenceMatch
        # only: the two-view kernel spills a register under ptxas with PREFETCH)
        cfg.update(ROW_TILES=16, PREFETCH=True)
    cfg["LAST_PROGRAM_SUMS"] = BLOCK_R > 1 or cfg["ROW_TILES"] > 1
    return cfg


class _Plan:
    "Everything about a call that follows from its key: sizes, strides, grid, meta-parameters, the launcher."
    __slots__ = ("R", "C", "grid", "launcher", "strides", "s_mask", "has_m", "write_grad", "buf", "inv_R", "dev",
                 "dt_m", "dt_s", "part_shape", "scales", "tickets")


_PLANS: dict = {}
MAX_PLANS = 512


def _make_plan(zw, zm, zs, mask, has_m, low_conf, write_grad, config, kl_mode=0, separate=False) -> _Plan:
    "Grid, block sizes, ALIGN and the buffers' layout for one key (validated arguments)."
    R, C = zs.shape
    sw, ss = zw.stride(), zs.stride()
    sm = zm.stride() if has_m else ss
    cfg = dict(pick_config(R, C, views=3 if has_m else 2))
    if config: cfg.update(config)
    BR, BC, RT = cfg["BLOCK_R"], cfg["BLOCK_C"], cfg["ROW_TILES"]
    grid = cdiv(R, BR * RT)
    # the sum over programs in the same launch: needs the device's ticket counters (none while a CUDA graph is being
    # captured before they exist: then the partials are summed by a second launch)
    tickets = ticket_counters(zs.device) if cfg.get("LAST_PROGRAM_SUMS") and grid > 1 else None
    contiguous_cols = sw[1] == sm[1] == ss[1] == 1
    meta = dict(HAS_M=has_m, HAS_MASK=mask is not None, LOW_CONF=low_conf, NEED_TW=has_m or low_conf,
                WRITE_GRAD=write_grad, BLOCK_R=BR, BLOCK_C=BC, ROW_TILES=RT, ONE_BLOCK=C <= BC,
                PREFETCH=bool(cfg.get("PREFETCH", False)) and C <= BC and RT > 1, KL_MODE=kl_mode,
                FUSED_REDUCE=bool(cfg.get("FUSED_REDUCE", False)) and C <= BC, LAST_PROGRAM_SUMS=tickets is not None,
                ALIGN=align(C, sw[0], sm[0], ss[0]) if contiguous_cols else 1, num_warps=cfg["num_warps"])
    p = _Plan()
    p.R, p.C, p.grid, p.tickets = R, C, grid, tickets
    p.launcher = Launcher(_consistency_kernel, (p.grid,), meta)
    p.strides = (sw[0], sw[1], sm[0], sm[1], ss[0], ss[1])
    p.s_mask = mask.stride(0) if mask is not None else 0
    p.has_m, p.write_grad, p.inv_R, p.dev = has_m, write_grad, 1.0 / R, zs.device
    # gradient buffers in the logits' dtype, except fp16: the forward writes gradients for grad_output = 1 (divided
    # by R), which fp16's range flushes to 0 before a large grad_output (a GradScaler's 2^16) could scale them back;
    # fp32 buffers keep them, and autograd casts the returned gradient to fp16 once
    grad_dtype = lambda dt: F32 if dt is torch.float16 else dt
    p.dt_s, p.dt_m = grad_dtype(zs.dtype), (grad_dtype(zm.dtype) if has_m else None)
    # gradients: one [2, R, C] buffer (medium, strong) when the dtypes agree, so that backward is one launch
    p.buf = 0 if not write_grad else (1 if has_m and p.dt_m == p.dt_s and not separate else 2)
    # the partial sums per program; with tickets, the loss first and the partials after it
    p.part_shape = (grid + 1,) if tickets is not None else (grid,) if grid > 1 else ()
    # backward: one in-place scale per gradient tensor (the [2, R, C] buffer, or grad_s and grad_m)
    sizes = [] if not write_grad else [2 * R * C] if p.buf == 1 else [R * C] * (1 + has_m)
    p.scales = tuple(scale_launcher(n) for n in sizes)
    return p


def _execute(p: _Plan, zw, zm, zs, mask, threshold: float, inv_T: float):
    """Allocate the outputs and launch. Returns (loss, mask, grad_m, grad_s, scales): the fp32 loss (0-dim, on
    device), the CE mask (fp32 [R]), the gradients for grad_output = 1 (None unless the plan writes them), and the
    backward's work: (tensor, its `scale_launcher`) for each gradient buffer."""
    dev, R, C = p.dev, p.R, p.C
    buf = gm = gs = None
    if p.buf == 1:
        buf = torch.empty((2, R, C), dtype=p.dt_s, device=dev)
        gm, gs = buf.unbind(0)
    elif p.buf == 2:
        gs = torch.empty((R, C), dtype=p.dt_s, device=dev)
        if p.has_m: gm = torch.empty((R, C), dtype=p.dt_m, device=dev)
    part = torch.empty(p.part_shape, dtype=F32, device=dev)
    if mask is None:
        mask = mask_out = torch.empty(R, dtype=F32, device=dev)
        mask_in = part
    else:
        mask_in, mask_out = mask, part
    tickets = p.tickets
    p.launcher(zw, zm if p.has_m else zs, zs, *p.strides, mask_in, p.s_mask, part if gm is None else gm,
               part if gs is None else gs, mask_out, part, part if tickets is None else tickets,
               0 if tickets is None else ticket_slot(), R, C, threshold, inv_T, p.inv_R)
    if p.buf == 0: grads = ()
    elif p.buf == 1: grads = (buf,)
    else: grads = (gs,) if gm is None else (gs, gm)
    loss = part if p.grid == 1 else part.sum() if tickets is None else part[0]
    return loss, mask, gm, gs, tuple(zip(grads, p.scales))


def launch(zw, zm, zs, mask, threshold, T, has_m, low_conf, write_grad, config=None, kl_mode=0):
    "One uncached launch on validated arguments (used by tools/aot.py): (loss, mask, grad_m, grad_s, scales)."
    p = _make_plan(zw, zm, zs, mask, has_m, low_conf, write_grad, config, kl_mode)
    return _execute(p, zw, zm, zs, mask, float(threshold), 1.0 / T)


class _ConsistencyLoss(torch.autograd.Function):
    """Carries the gradients the forward kernel wrote: backward scales them by grad_output in place (one launch for
    both views). The kernel runs before `apply`; `st` = (loss, scales, grad_m, grad_s). ctx keeps the gradients but
    not the loss: the output held by its own grad_fn would be a reference cycle (freed only by the garbage collector,
    e.g. never for a forward whose backward does not run)."""

    @staticmethod
    def forward(ctx, zm, zs, st):
        ctx.st = st[1:]
        return st[0]

    @staticmethod
    def backward(ctx, g):
        first_order_only("fused consistency loss")
        st = ctx.st
        if st is None: raise second_backward("fused consistency loss")
        ctx.st = None
        scales, gm, gs = st
        for x, launcher in scales: scale_(x, g, launcher)
        return gm, gs, None


# ---------------------------------------------------------------------------------------------------- host path
def _tk(t):
    "The part of a launcher key that one tensor contributes (all that triton specialises on, and validity)."
    return t.shape, t.stride(), t.dtype, t.get_device(), t.data_ptr() & 15


def _plan(has_m, low_conf, zw, zm, zs, threshold, T, mask, config, kl_mode, need_grad, separate):
    """The plan of a call and its checked scalars and mask: (plan, threshold, T, mask). A call whose key (shapes,
    strides, dtypes, devices, 16-byte alignment, flags) was validated before skips validation and reuses its plan;
    anything unusual (non-float scalars, T <= 0, a mask that is not a float32 tensor without grad, tensors that are
    not tensors) takes the checking path, which raises ConfigError. `separate`: one gradient buffer per view
    (`torch.compile`'s custom op, whose outputs may not alias each other) instead of one [2, R, C] buffer."""
    key = None
    try:
        if type(threshold) is float and type(T) is float and T > 0.0:
            mk = None if mask is None else (_tk(mask) if mask.dtype is F32 and not mask.requires_grad else 0)
            key = None if mk == 0 else (has_m, low_conf, kl_mode, need_grad, separate, _tk(zw), _tk(zs),
                                        _tk(zm) if has_m else None, mk, None if config is None else tuple(config.items()))
    except AttributeError:          # not tensors: the checking path says what is wrong
        key = None
    p = _PLANS.get(key) if key is not None else None
    if p is None:
        named = dict(logits_w=zw, logits_m=zm, logits_s=zs) if has_m else dict(logits_w=zw, logits_s=zs)
        threshold, T, mask = check_losses(named, threshold, T, mask)
        p = _make_plan(zw, zm, zs, mask, has_m, low_conf, need_grad, config, kl_mode, separate)
        if key is not None:
            if len(_PLANS) >= MAX_PLANS: _PLANS.clear()
            _PLANS[key] = p
    return p, threshold, T, mask


def _loss(has_m, low_conf, zw, zm, zs, threshold, T, mask, config, kl_mode=0):
    "The eager hot path: the plan, one launch, and the minimal autograd node that carries the gradients."
    try:
        need_grad = (zs.requires_grad or (has_m and zm.requires_grad)) and _grad_enabled()
    except AttributeError:
        need_grad = False           # not tensors: the checks in _plan say what is wrong
    p, threshold, T, mask = _plan(has_m, low_conf, zw, zm, zs, threshold, T, mask, config, kl_mode, need_grad, False)
    loss, mask, gm, gs, scales = _execute(p, zw, zm, zs, mask, threshold, 1.0 / T)
    if p.write_grad:
        loss = _ConsistencyLoss.apply(zm if has_m else None, zs, (loss, scales, gm, gs))
    return loss, mask


def op_forward(zw, zm, zs, mask, threshold, T, low_conf, kl_mode, write_grad):
    """The body of the `ssl_nb::consistency_loss` custom op (`_compile.py`): (loss, CE mask or None when `mask` was
    given, gradient of the medium view or None, gradient of the strong view or None), for grad_output = 1."""
    has_m = zm is not None
    p, threshold, T, mask = _plan(has_m, low_conf, zw, zm, zs, threshold, T, mask, None, kl_mode, write_grad, True)
    loss, mask_out, gm, gs, _ = _execute(p, zw, zm, zs, mask, threshold, 1.0 / T)
    return loss, (mask_out if mask is None else None), gm, gs


# ----------------------------------------------------------------------------------------------------------- API
def fixmatch_loss(logits_w, logits_s, threshold=0.95, mask=None, *, _config=None):
    return _loss(False, False, logits_w, None, logits_s, threshold, 1.0, mask, _config)


def refixmatch_loss(logits_w, logits_s, threshold=0.95, T=0.5, mask=None, *, _config=None):
    return _loss(False, True, logits_w, None, logits_s, threshold, T, mask, _config)


def sequencematch_loss(logits_w, logits_m, logits_s, threshold=0.95, T=0.5, mask=None, low_conf_kl=False,
                       kl_mask="high", *, _config=None):
    return _loss(True, bool(low_conf_kl), logits_w, logits_m, logits_s, threshold, T, mask, _config,
                 kl_mode_of(kl_mask))
