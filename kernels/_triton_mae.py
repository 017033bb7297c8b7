"""MAE's masked-patch reconstruction loss, fused (patchify + norm_pix + MSE + masked mean + gradient). Imports triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import align, is_interpreted, cdiv, first_order_only, next_pow2, second_backward
from ._triton_common import scale_, scale_launcher
from ._validate import check_mae_fused


@triton.jit(do_not_specialize=["R", "L", "Wp", "E"])
def _mae_kernel(pred_ptr, img_ptr, mask_ptr, den_ptr, grad_ptr, part_ptr,
                R, L, Wp, E, spb, spl, spe, sib, sic, sih, siw, smb, sml,
                P: tl.constexpr, CH: tl.constexpr, NORM: tl.constexpr, WRITE_GRAD: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_E: tl.constexpr, ALIGN: tl.constexpr):
    """ROWS consecutive patches r = b * L + l. Element e of a patch is (row e // (P*CH), column e // CH % P,
    channel e % CH), MAE's 'nchpwq->nhwpqc' order. Patches with mask 0 read nothing: their loss and gradient are 0.
    ALIGN: a power of 2 dividing E and pred's strides (vector loads of pred, vector stores of the gradient)."""
    if ALIGN > 1:
        E = (E // ALIGN) * ALIGN
        spb = (spb // ALIGN) * ALIGN
        spl = (spl // ALIGN) * ALIGN
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < R
    b = r // L
    l = r - b * L
    hi = l // Wp
    wi = l - hi * Wp
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    pr = e // (P * CH)
    pc = (e // CH) % P
    c = e % CH
    mrow = tl.load(mask_ptr + b * smb + l * sml, mask=rmask, other=0.0).to(tl.float32)
    active = rmask & (mrow != 0.0)
    m2 = active[:, None] & emask[None, :]
    yy = (hi * P)[:, None] + pr[None, :]
    xx = (wi * P)[:, None] + pc[None, :]
    t = tl.load(img_ptr + (b * sib)[:, None] + c.to(tl.int64)[None, :] * sic + yy * sih + xx * siw,
                mask=m2, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(t, axis=1) / E
        dlt = tl.where(m2, t - mean[:, None], 0.0)
        var = tl.sum(dlt * dlt, axis=1) / (E - 1)                  # unbiased, as torch.var
        t = dlt / tl.sqrt_rn(var + 1e-6)[:, None]
    x = tl.load(pred_ptr + (b * spb + l * spl)[:, None] + e.to(tl.int64)[None, :] * spe,
                mask=m2, other=0.0).to(tl.float32)
    diff = tl.where(m2, x - t, 0.0)
    den = tl.load(den_ptr)
    row = tl.where(active, mrow * (tl.sum(diff * diff, axis=1) / E), 0.0)
    tl.store(part_ptr + pid, tl.sum(row, axis=0) / den)
    if WRITE_GRAD:
        coef = mrow * 2.0 / (E * den)
        tl.store(grad_ptr + r[:, None] * E + e[None, :], (diff * coef[:, None]).to(grad_ptr.dtype.element_ty),
                 mask=rmask[:, None] & emask[None, :])


INTERPRETED = is_interpreted(_mae_kernel)


def pick_config(R: int, E: int, interpret: bool = INTERPRETED) -> dict:
    BLOCK_E = next_pow2(E)
    if interpret:
        return dict(ROWS=min(next_pow2(R), max(1, 65536 // BLOCK_E)), num_warps=4)
    ROWS = min(next_pow2(R), max(1, 2048 // BLOCK_E))
    return dict(ROWS=ROWS, num_warps=4 if ROWS * BLOCK_E <= 1024 else 8)


def launch(pred, imgs, mask, p, norm_pix, write_grad, config=None):
    B, C, H, W = imgs.shape
    L, E = pred.shape[1], pred.shape[2]
    R = B * L
    cfg = pick_config(R, E)
    if config: cfg.update(config)
    if not mask.dtype.is_floating_point: mask = mask.float()
    den = mask.sum(dtype=torch.float32)
    grid = cdiv(R, cfg["ROWS"])
    part = torch.empty((), dtype=torch.float32, device=pred.device) if grid == 1 else \
        torch.empty(grid, dtype=torch.float32, device=pred.device)
    # fp16 gradients are kept in fp32 until backward has scaled them (see _triton_losses: fp16's range would flush the
    # small per-element gradients before a GradScaler's grad_output scales them back)
    gdt = torch.float32 if pred.dtype is torch.float16 else pred.dtype
    grad = torch.empty((B, L, E), dtype=gdt, device=pred.device) if write_grad else None
    _mae_kernel[(grid,)](pred, imgs, mask, den, grad if write_grad else part, part,
                         R, L, W // p, E, *pred.stride(), *imgs.stride(), *mask.stride(),
                         P=p, CH=C, NORM=bool(norm_pix), WRITE_GRAD=write_grad, ROWS=cfg["ROWS"],
                         BLOCK_E=next_pow2(E), ALIGN=align(E, *pred.stride()[:2]) if pred.stride(2) == 1 else 1,
                         num_warps=cfg["num_warps"])
    return (part if grid == 1 else part.sum()), grad


_SCALES: dict = {}      # (numel, dtype, device) -> the backward's scale launcher


class _MaskedPatchMSE(torch.autograd.Function):
    "Carries the gradient the kernel wrote; backward scales it by grad_output in place (`_triton_common.scale_`)."

    @staticmethod
    def forward(ctx, pred, imgs, mask, p, norm_pix, config):
        loss, ctx.grad = launch(pred, imgs, mask, p, norm_pix, True, config)
        return loss

    @staticmethod
    def backward(ctx, g):
        first_order_only("masked_patch_mse")
        grad, ctx.grad = ctx.grad, None
        if grad is None: raise second_backward("masked_patch_mse")
        key = (grad.numel(), grad.dtype, grad.get_device())
        launcher = _SCALES.get(key)
        if launcher is None:
            if len(_SCALES) >= 64: _SCALES.clear()
            launcher = _SCALES[key] = scale_launcher(grad.numel())
        return scale_(grad, g, launcher), None, None, None, None, None


def masked_patch_mse(pred, imgs, mask, patch_size, norm_pix=True, *, _config=None):
    p = check_mae_fused(pred, imgs, mask, patch_size, norm_pix)[4]
    imgs, mask = imgs.detach(), mask.detach()
    if torch.is_grad_enabled() and pred.requires_grad:
        return _MaskedPatchMSE.apply(pred, imgs, mask, p, bool(norm_pix), _config)
    return launch(pred.detach(), imgs, mask, p, norm_pix, False, _config)[0]
