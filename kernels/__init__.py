"""Compiled Triton kernels for ssl_nb, each with its PyTorch reference, autograd wrapper, tests and a benchmark row.

CUDA tensors run the Triton kernels, CPU tensors the PyTorch reference. `SSL_NB_KERNELS=torch|triton` forces one
(Triton on CPU tensors runs Triton's interpreter). Importing this package does not import triton: the Triton modules
are imported the first time a Triton path is taken. See kernels/README.md.
"""
from __future__ import annotations

import torch

from ssl_nb import losses as _L

from . import _compile
from ._runtime import backend, module_for
from ._validate import kl_mode_of
from .reference import gather_tokens_ref, masked_patch_mse_ref, patchify, scatter_tokens_ref

_compiling = torch.compiler.is_compiling   # under torch.compile the Triton paths go through torch.ops.ssl_nb (_compile.py)

__all__ = ["fixmatch_loss", "refixmatch_loss", "sequencematch_loss", "gather_tokens", "scatter_tokens",
           "masked_patch_mse", "backend", "gather_tokens_ref", "scatter_tokens_ref", "masked_patch_mse_ref",
           "patchify"]


def fixmatch_loss(logits_w: torch.Tensor, logits_s: torch.Tensor, threshold: float = 0.95,
                  mask: torch.Tensor | None = None):
    "`ssl_nb.losses.fixmatch_loss`, fused in one Triton kernel on CUDA. Returns `(loss, mask)`."
    if backend(logits_s) == "torch": return _L.fixmatch_loss(logits_w, logits_s, threshold, mask)
    if _compiling(): return _compile.loss(logits_w, None, logits_s, threshold, 1.0, mask, False, 0)
    return module_for(logits_s, "_triton_losses").fixmatch_loss(logits_w, logits_s, threshold, mask)


def refixmatch_loss(logits_w: torch.Tensor, logits_s: torch.Tensor, threshold: float = 0.95, T: float = 0.5,
                    mask: torch.Tensor | None = None):
    "`ssl_nb.losses.refixmatch_loss`, fused in one Triton kernel on CUDA. Returns `(loss, mask)`."
    if backend(logits_s) == "torch": return _L.refixmatch_loss(logits_w, logits_s, threshold, T, mask)
    if _compiling(): return _compile.loss(logits_w, None, logits_s, threshold, T, mask, True, 0)
    return module_for(logits_s, "_triton_losses").refixmatch_loss(logits_w, logits_s, threshold, T, mask)


def sequencematch_loss(logits_w: torch.Tensor, logits_m: torch.Tensor, logits_s: torch.Tensor,
                       threshold: float = 0.95, T: float = 0.5, mask: torch.Tensor | None = None,
                       low_conf_kl: bool = False, kl_mask: str = "high"):
    "`ssl_nb.losses.sequencematch_loss`, fused in one Triton kernel on CUDA. Returns `(loss, mask)`."
    if backend(logits_s) == "torch":
        return _L.sequencematch_loss(logits_w, logits_m, logits_s, threshold, T, mask, low_conf_kl, kl_mask)
    if _compiling():
        return _compile.loss(logits_w, logits_m, logits_s, threshold, T, mask, bool(low_conf_kl), kl_mode_of(kl_mask))
    return module_for(logits_s, "_triton_losses").sequencematch_loss(
        logits_w, logits_m, logits_s, threshold, T, mask, low_conf_kl, kl_mask)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`out[b, k] = x[b, ids[b, k]]` for x [B, N, D] and ids [B, K] (int32/int64), with backward to `x`.

    Replaces MAE's `gather(x, 1, ids.unsqueeze(-1).repeat(1, 1, D))` without the [B, K, D] index. The backward
    assumes the ids of a row are distinct (MAE's keep-ids are), as the forward of `scatter_tokens` does."""
    if backend(x) == "torch":
        from ._validate import check_gather
        check_gather(x, ids)
        return gather_tokens_ref(x, ids)
    if _compiling(): return _compile.gather_tokens(x, ids)
    return module_for(x, "_triton_tokens").gather_tokens(x, ids)


def scatter_tokens(tokens: torch.Tensor, ids: torch.Tensor, N: int, fill: torch.Tensor) -> torch.Tensor:
    """The inverse of `gather_tokens`: [B, K, D] tokens back into N slots (`out[b, ids[b, k]] = tokens[b, k]`), the
    mask token `fill` ([D], or MAE's [1, 1, D] parameter; cast to tokens' dtype) everywhere else. Backward to
    `tokens` and to `fill`. `ids[b]` must hold distinct indices in [0, N)."""
    if backend(tokens) == "torch":
        from ._validate import check_scatter
        check_scatter(tokens, ids, N, fill)
        return scatter_tokens_ref(tokens, ids, N, fill)
    if _compiling(): return _compile.scatter_tokens(tokens, ids, N, fill)
    return module_for(tokens, "_triton_tokens").scatter_tokens(tokens, ids, N, fill)


def masked_patch_mse(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                     norm_pix: bool = True) -> torch.Tensor:
    """MAE's reconstruction loss, fused: patchify `imgs` [B, C, H, W] in MAE's order, normalise each target patch
    (mean, unbiased variance, eps 1e-6) when `norm_pix`, per-patch MSE against `pred` [B, L, p*p*C], mean over the
    masked patches (`mask` [B, L], 1 = masked). Gradient to `pred` only. Computed in fp32."""
    if backend(pred) == "torch":
        from ._validate import check_mae
        check_mae(pred, imgs, mask, patch_size)
        return masked_patch_mse_ref(pred, imgs, mask, patch_size, norm_pix)
    if _compiling(): return _compile.masked_patch_mse(pred, imgs, mask, patch_size, norm_pix)
    return module_for(pred, "_triton_mae").masked_patch_mse(pred, imgs, mask, patch_size, norm_pix)
