"""PyTorch references of the token and MAE-loss ops, in MAE's own formulation (facebookresearch/mae `models_mae.py`).

The consistency losses have no twin here: their reference is `ssl_nb.losses` itself. These functions are the CPU
path of `ssl_nb.kernels` and the ground truth of its tests and benchmark.
"""
from __future__ import annotations

import torch


def gather_tokens_ref(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    "`out[b, k] = x[b, ids[b, k]]`, as MAE's `random_masking` writes it (materialising a [B, K, D] int64 index)."
    return torch.gather(x, 1, ids.long().unsqueeze(-1).repeat(1, 1, x.shape[-1]))


def scatter_tokens_ref(tokens: torch.Tensor, ids: torch.Tensor, N: int, fill: torch.Tensor) -> torch.Tensor:
    """The inverse of `gather_tokens`: `out[b, ids[b, k]] = tokens[b, k]`, `fill` (cast to tokens' dtype) elsewhere.

    MAE appends `N - K` mask tokens and un-shuffles with `ids_restore`; with only the kept ids this is the same
    scatter into a tensor of mask tokens. `ids[b]` must hold distinct indices."""
    B, K, D = tokens.shape
    base = fill.reshape(D).to(tokens.dtype).expand(B, N, D)
    return torch.scatter(base, 1, ids.long().unsqueeze(-1).repeat(1, 1, D), tokens)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    "[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patches in row-major order, (row, col, channel) inside a patch."
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def masked_patch_mse_ref(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                         norm_pix: bool = True) -> torch.Tensor:
    """MAE's `forward_loss`, computed in fp32: per-patch MSE against the (optionally per-patch normalised) target,
    averaged over the masked patches (`mask` [B, L], 1 = masked). The gradient flows to `pred` only."""
    target = patchify(imgs.detach().float(), patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)          # unbiased, as in MAE
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred.float() - target) ** 2
    loss = loss.mean(dim=-1)                             # [B, L], mean loss per patch
    mask = mask.detach().float()
    return (loss * mask).sum() / mask.sum()              # mean over the masked (removed) patches
