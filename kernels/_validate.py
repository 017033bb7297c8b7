"""Argument checks of the token and MAE-loss ops, shared by the PyTorch and Triton paths.

They run before anything launches: under Triton's interpreter an out-of-bounds read kills the process, so every size
a kernel relies on is checked here. Value checks that would need a host sync on a GPU (ids in range, ids distinct)
run on CPU tensors only; on CUDA the kernels mask out-of-range ids instead of reading out of bounds.
"""
from __future__ import annotations

import numbers

import torch

from ssl_nb.core import ConfigError

FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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


def _ids(ids, B, K, N, distinct):
    if ids.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"ids must be int32 or int64; got {ids.dtype}.")
    if ids.shape[0] != B: raise ConfigError(f"ids must have {B} rows (one per sample); got shape {tuple(ids.shape)}.")
    if ids.device.type == "cpu": check_ids_values(ids, N, distinct)


def check_ids_values(ids, N, distinct):
    """ids within [0, N) and (distinct) no repeat within a row. CPU tensors only: free there, a host sync on CUDA.
    Runs on every call with CPU ids (the values change from call to call; shapes are checked once per key)."""
    if not ids.numel(): return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= N: raise ConfigError(f"ids must lie in [0, {N}); got values in [{lo}, {hi}].")
    if distinct and ids.shape[1] > 1 and bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ConfigError("ids must hold distinct indices within each row (as MAE's keep-ids do).")


def check_gather(x, ids, distinct=False):
    "x [B, N, D], ids [B, K] int32/int64 in [0, N). Returns (B, N, D, K)."
    _tensor("x", x, 3); _tensor("ids", ids, 2); _float("x", x); _same_device(x=x, ids=ids)
    B, N, D = x.shape
    K = ids.shape[1]
    _ids(ids, B, K, N, distinct)
    return B, N, D, K


def check_scatter(tokens, ids, N, fill):
    "tokens [B, K, D], ids [B, K] distinct in [0, N), fill with D elements. Returns (B, N, D, K)."
    _tensor("tokens", tokens, 3); _tensor("ids", ids, 2); _tensor("fill", fill); _float("tokens", tokens)
    _float("fill", fill); _same_device(tokens=tokens, ids=ids, fill=fill)
    B, K, D = tokens.shape
    N = _int("N", N)
    if N < K: raise ConfigError(f"N={N} slots cannot hold K={K} distinct tokens.")
    if tuple(ids.shape) != (B, K): raise ConfigError(f"ids must have shape {(B, K)}; got {tuple(ids.shape)}.")
    if fill.numel() != D or fill.squeeze().ndim > 1 or (fill.ndim and fill.shape[-1] != D):
        raise ConfigError(f"fill must be a mask-token vector of {D} elements ([D] or MAE's [1, 1, D]); "
                          f"got shape {tuple(fill.shape)}.")
    _ids(ids, B, K, N, True)
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
