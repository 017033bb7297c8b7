"""Argument checks of the fused losses, the token ops and the MAE loss, shared by the PyTorch and Triton paths.

They run before anything launches: under Triton's interpreter an out-of-bounds read kills the process, so every size
a kernel relies on is checked here. Value checks that would need a host sync on a GPU (ids in range, ids distinct)
run on CPU tensors only; on CUDA the kernels mask out-of-range ids instead of reading out of bounds.
"""
from __future__ import annotations

import numbers

import torch

from ssl_nb.core import ConfigError
from ssl_nb.losses import KL_MASKS, _check_logits, _check_scalars

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_PATCH = 8192    # the fused MAE loss holds one patch (p*p*C values) in registers: 16x16x3 = 768, 32x32x3 = 3072
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # the fused losses' inputs
KL_MODES = {m: i for i, m in enumerate(KL_MASKS)}                # the kernel's KL_MODE: 0 high, 1 low, 2 all


def _tensor(name, t, ndim=None):
    if not isinstance(t, torch.Tensor): raise ConfigError(f"{name} must be a torch.Tensor; got {type(t).__name__}.")
    if ndim is not None and t.ndim != ndim:
        raise ConfigError(f"{name} must be {ndim}-d; got shape {tuple(t.shape)}.")


def _float(name, t):
    if t.dtype not in FLOATS:
        raise ConfigError(f"{name} must be a floating point tensor (float32, bfloat16, float16 or float64); got {t.dtype}.")


def _same_device(**named):
    devs = {k: v.device for k, v in named.items()}
    if len(set(devs.values())) > 1:
        raise ConfigError(f"all tensors must be on one device; got {', '.join(f'{k} on {d}' for k, d in devs.items())}.")


def _int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ConfigError(f"{name} must be a Python int >= {lo}; got {v!r}.")
    return int(v)


def _ids(ids, B, K, N, distinct, values=True):
    if ids.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"ids must be int32 or int64; got {ids.dtype}.")
    if ids.shape[0] != B: raise ConfigError(f"ids must have {B} rows (one per sample); got shape {tuple(ids.shape)}.")
    if values and ids.device.type == "cpu": check_ids_values(ids, N, distinct)


def check_ids_values(ids, N, distinct):
    """ids within [0, N) and (distinct) no repeat within a row. CPU tensors only: free there, a host sync on CUDA.
    Runs on every call with CPU ids (the values change from call to call; shapes are checked once per key)."""
    if not ids.numel(): return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= N: raise ConfigError(f"ids must lie in [0, {N}); got values in [{lo}, {hi}].")
    if distinct and ids.shape[1] > 1 and bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ConfigError("ids must hold distinct indices within each row (as MAE's keep-ids do).")


def check_gather(x, ids, distinct=False, values=True):
    """x [B, N, D], ids [B, K] int32/int64 in [0, N). Returns (B, N, D, K). `values=False`: shapes and dtypes only
    (`_compile.py` traces with fake tensors; the custom op's body checks CPU ids' values when it runs)."""
    _tensor("x", x, 3); _tensor("ids", ids, 2); _float("x", x); _same_device(x=x, ids=ids)
    B, N, D = x.shape
    K = ids.shape[1]
    _ids(ids, B, K, N, distinct, values)
    return B, N, D, K


def check_scatter(tokens, ids, N, fill, values=True):
    "tokens [B, K, D], ids [B, K] distinct in [0, N), fill with D elements. Returns (B, N, D, K). `values`: as above."
    _tensor("tokens", tokens, 3); _tensor("ids", ids, 2); _tensor("fill", fill); _float("tokens", tokens)
    _float("fill", fill); _same_device(tokens=tokens, ids=ids, fill=fill)
    B, K, D = tokens.shape
    N = _int("N", N)
    if N < K: raise ConfigError(f"N={N} slots cannot hold K={K} distinct tokens.")
    if tuple(ids.shape) != (B, K): raise ConfigError(f"ids must have shape {(B, K)}; got {tuple(ids.shape)}.")
    if fill.numel() != D or fill.squeeze().ndim > 1 or (fill.ndim and fill.shape[-1] != D):
        raise ConfigError(f"fill must be a mask-token vector of {D} elements ([D] or MAE's [1, 1, D]); "
                          f"got shape {tuple(fill.shape)}.")
    _ids(ids, B, K, N, True, values)
    return B, N, D, K


def check_mae(pred, imgs, mask, patch_size):
    "pred [B, L, p*p*C], imgs [B, C, H, W] with H, W multiples of p, mask [B, L]. Returns (B, C, H, W, p, L, E)."
    _tensor("pred", pred, 3); _tensor("imgs", imgs, 4); _tensor("mask", mask, 2)
    _float("pred", pred); _float("imgs", imgs); _same_device(pred=pred, imgs=imgs, mask=mask)
    p = _int("patch_size", patch_size)
    B, C, H, W = imgs.shape
    if H % p or W % p: raise ConfigError(f"image size {H}x{W} is not a multiple of patch_size={p}.")
    L, E = (H // p) * (W // p), p * p * C
    if tuple(pred.shape) != (B, L, E):
        raise ConfigError(f"pred must have shape {(B, L, E)} = [B, (H/p)(W/p), p*p*C] for imgs {tuple(imgs.shape)} "
                          f"and patch_size={p}; got {tuple(pred.shape)}.")
    if tuple(mask.shape) != (B, L): raise ConfigError(f"mask must have shape {(B, L)}; got {tuple(mask.shape)}.")
    if mask.is_complex(): raise ConfigError(f"mask must be real (1 = masked); got {mask.dtype}.")
    return B, C, H, W, p, L, E


def _number(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ConfigError(f"{name} must be a Python number for the Triton kernels; got {type(v).__name__}. "
                          f"(A per-row or per-class threshold, as in FlexMatch, goes in `mask`.)")
    return float(v)


def check_losses(named: dict, threshold, T, mask):
    """The fused losses' checks, before anything launches: shapes, dtypes, devices, scalars, the external mask.
    `named`: the logits by argument name. Returns (threshold, T, mask) as float, float, detached float32 or None."""
    for k, v in named.items():
        if not isinstance(v, torch.Tensor):
            raise ConfigError(f"{k} must be a torch.Tensor; got {type(v).__name__}.")
    _check_logits(**named)
    z0 = next(iter(named.values()))
    for k, v in named.items():
        if v.device != z0.device:
            raise ConfigError(f"all logits must be on one device; {k} is on {v.device}, not {z0.device}.")
        if v.dtype not in LOGIT_DTYPES:
            raise ConfigError(f"{k} has dtype {v.dtype}; the Triton kernels take float32, bfloat16 or float16 "
                              f"logits (cast them, or set SSL_NB_KERNELS=torch).")
    R, C = z0.shape
    if R == 0 or C == 0: raise ConfigError(f"logits have shape {(R, C)}; the loss needs at least one row and class.")
    threshold = _number("threshold", threshold)
    T = _number("T", T)
    _check_scalars(threshold=threshold if mask is None else None, T=T)
    if mask is not None:
        if not isinstance(mask, torch.Tensor): raise ConfigError(f"mask must be a tensor; got {type(mask).__name__}.")
        if tuple(mask.shape) != (R,): raise ConfigError(f"mask must have shape {(R,)}; got {tuple(mask.shape)}.")
        if mask.device != z0.device: raise ConfigError(f"mask is on {mask.device} but the logits are on {z0.device}.")
        mask = mask.detach().float()
    return threshold, T, mask


def kl_mode_of(kl_mask) -> int:
    "SequenceMatch's `kl_mask` ('high', 'low', 'all') as the kernel's KL_MODE."
    mode = KL_MODES.get(kl_mask) if isinstance(kl_mask, str) else None
    if mode is None: raise ConfigError(f"kl_mask must be one of {tuple(KL_MODES)}; got {kl_mask!r}.")
    return mode


def check_mae_fused(pred, imgs, mask, patch_size, norm_pix):
    "`check_mae` and the fused kernel's own limits. Returns (B, C, H, W, p, L, E)."
    dims = check_mae(pred, imgs, mask, patch_size)
    p, C, E = dims[4], dims[1], dims[6]
    if E > MAX_PATCH:
        raise ConfigError(f"patches of {p}x{p}x{C} = {E} values exceed the fused kernel's limit of {MAX_PATCH}; "
                          f"use SSL_NB_KERNELS=torch for this loss.")
    if norm_pix and E < 2: raise ConfigError("norm_pix needs patches of at least 2 values (unbiased variance).")
    return dims
