"""`torch.compile` support: the fused ops as PyTorch custom operators (`torch.ops.ssl_nb.*`).

Eager calls never come here: their host path (`_launch.py`, cached plans, one minimal `autograd.Function`) is shorter
than the dispatcher's. Under `torch.compile`, dynamo cannot trace that path (lazy imports, triton's C launcher,
autograd Functions that carry host state), so the public functions of `ssl_nb.kernels` call these wrappers instead:
they run the same argument checks (on fake tensors, at trace time: a bad call still raises `ConfigError`), then one
custom op per fused op, an opaque node in the graph with a fake implementation for shapes. The ops' bodies are the
eager path's cached launches (no host sync; allocations from the caching allocator), so CUDA graphs
(`mode="reduce-overhead"`) capture them. Backwards are registered with `register_autograd`: for the losses the
gradient the forward wrote times `grad_output`, a multiply traced into the backward graph (inductor fuses it);
for the tokens one more custom op.

Outputs a call does not produce (no gradient, no inverse index) are empty tensors, since a custom op returns a fixed
tuple of tensors; each is its own allocation (outputs may not alias each other or an input). Importing this module
registers the ops and imports no triton: the bodies import the Triton modules on their first call.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import Tensor

from ._runtime import fill_grad, module_for
from ._validate import check_gather, check_losses, check_mae_fused, check_scatter

F32, I32 = torch.float32, torch.int32
calls = Counter()      # op name -> times its body ran (a compiled graph's calls; CUDA-graph replays do not count)


def _absent(like: Tensor, dtype=F32) -> Tensor:
    "The placeholder of an output a call does not produce (a fresh empty tensor)."
    return like.new_empty((0,), dtype=dtype)


def _grad_dtype(z: Tensor):
    "The dtype of a gradient the forward writes: the input's, fp32 for fp16 (see `_triton_losses._make_plan`)."
    return F32 if z.dtype == torch.float16 else z.dtype


# ------------------------------------------------------------------------------------------ consistency losses
@torch.library.custom_op("ssl_nb::consistency_loss", mutates_args=())
def consistency_loss(logits_w: Tensor, logits_m: Optional[Tensor], logits_s: Tensor, mask: Optional[Tensor],
                     threshold: float, T: float, low_conf: bool, kl_mode: int,
                     write_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FixMatch (no `logits_m`, not `low_conf`), ReFixMatch (`low_conf`) or SequenceMatch (`logits_m`): (loss, CE
    mask or empty when `mask` is given, d loss / d logits_m, d loss / d logits_s), gradients empty unless
    `write_grad` (and the medium view's for two-view losses)."""
    calls["consistency_loss"] += 1
    loss, m, gm, gs = module_for(logits_s, "_triton_losses").op_forward(
        logits_w, logits_m, logits_s, mask, threshold, T, low_conf, kl_mode, write_grad)
    return (loss, _absent(logits_s) if m is None else m, _absent(logits_s) if gm is None else gm,
            _absent(logits_s) if gs is None else gs)


@consistency_loss.register_fake
def _(logits_w, logits_m, logits_s, mask, threshold, T, low_conf, kl_mode, write_grad):
    R, C = logits_s.shape
    return (logits_s.new_empty((), dtype=F32), logits_s.new_empty((R,) if mask is None else (0,), dtype=F32),
            logits_m.new_empty((R, C), dtype=_grad_dtype(logits_m)) if write_grad and logits_m is not None
            else _absent(logits_s),
            logits_s.new_empty((R, C), dtype=_grad_dtype(logits_s)) if write_grad else _absent(logits_s))


def _consistency_setup(ctx, inputs, output):
    logits_m, logits_s = inputs[1], inputs[2]
    ctx.save_for_backward(output[2], output[3])
    ctx.dtypes = (None if logits_m is None else logits_m.dtype, logits_s.dtype)
    ctx.mark_non_differentiable(output[1], output[2], output[3])


def _consistency_backward(ctx, g, *_):
    gm, gs = ctx.saved_tensors
    dt_m, dt_s = ctx.dtypes
    need = ctx.needs_input_grad
    return (None, (gm * g).to(dt_m) if need[1] else None, (gs * g).to(dt_s) if need[2] else None,
            None, None, None, None, None, None)


consistency_loss.register_autograd(_consistency_backward, setup_context=_consistency_setup)


def loss(logits_w, logits_m, logits_s, threshold, T, mask, low_conf, kl_mode):
    "The compiled path of the three fused losses: `(loss, mask)` as `ssl_nb.losses`."
    named = dict(logits_w=logits_w, logits_s=logits_s) if logits_m is None else \
        dict(logits_w=logits_w, logits_m=logits_m, logits_s=logits_s)
    threshold, T, ext = check_losses(named, threshold, T, mask)
    write_grad = torch.is_grad_enabled() and (logits_s.requires_grad or
                                              (logits_m is not None and logits_m.requires_grad))
    out, m, _, _ = consistency_loss(logits_w.detach(), logits_m, logits_s, ext, threshold, T, bool(low_conf),
                                    kl_mode, write_grad)
    return out, (m if ext is None else ext)


# ----------------------------------------------------------------------------------------------------- tokens
@torch.library.custom_op("ssl_nb::gather_tokens", mutates_args=())
def gather_tokens_op(x: Tensor, ids: Tensor, write_inv: bool) -> tuple[Tensor, Tensor]:
    "(`out[b, k] = x[b, ids[b, k]]`, the inverse index int32 [B, N] or empty unless `write_inv`)."
    calls["gather_tokens"] += 1
    out, inv, _ = module_for(x, "_triton_tokens")._gather_fwd(x, ids, write_inv, None)
    return out, _absent(ids, I32) if inv is None else inv


@gather_tokens_op.register_fake
def _(x, ids, write_inv):
    B, N, D = x.shape
    return x.new_empty((B, ids.shape[1], D)), (x.new_empty((B, N), dtype=I32) if write_inv else _absent(ids, I32))


@torch.library.custom_op("ssl_nb::gather_tokens_backward", mutates_args=())
def gather_tokens_backward(g: Tensor, inv: Tensor) -> Tensor:
    "`grad_x[b, n] = g[b, inv[b, n]]`, 0 where inv < 0."
    calls["gather_tokens_backward"] += 1
    return module_for(g, "_triton_tokens").gather_backward(g, inv, inv.shape[1])


@gather_tokens_backward.register_fake
def _(g, inv):
    return g.new_empty((g.shape[0], inv.shape[1], g.shape[2]))


def _gather_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _gather_backward(ctx, g, _):
    inv, = ctx.saved_tensors
    return gather_tokens_backward(g, inv), None, None


gather_tokens_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather_tokens(x, ids):
    "The compiled path of `ssl_nb.kernels.gather_tokens`."
    B, N, D, K = check_gather(x, ids, distinct=True, values=False)
    if B * K * D == 0:
        from .reference import gather_tokens_ref
        return gather_tokens_ref(x, ids)
    return gather_tokens_op(x, ids, torch.is_grad_enabled() and x.requires_grad)[0]


@torch.library.custom_op("ssl_nb::scatter_tokens", mutates_args=())
def scatter_tokens_op(tokens: Tensor, ids: Tensor, N: int, fill: Tensor, write_inv: bool) -> tuple[Tensor, Tensor]:
    "(the K tokens in N slots, `fill` elsewhere; the inverse index int32 [B, N] or empty unless `write_inv`)."
    calls["scatter_tokens"] += 1
    out, inv = module_for(tokens, "_triton_tokens")._scatter_fwd(tokens, ids, N, fill, write_inv, None)
    return out, _absent(ids, I32) if inv is None else inv


@scatter_tokens_op.register_fake
def _(tokens, ids, N, fill, write_inv):
    B, K, D = tokens.shape
    return (tokens.new_empty((B, N, D)),
            tokens.new_empty((B, N), dtype=I32) if write_inv else _absent(ids, I32))


@torch.library.custom_op("ssl_nb::scatter_tokens_backward", mutates_args=())
def scatter_tokens_backward(g: Tensor, ids: Tensor, inv: Tensor, need_tokens: bool,
                            need_fill: bool) -> tuple[Tensor, Tensor]:
    "(grad_tokens [B, K, D] or empty, the fill gradient's fp32 per-sample partials [B, D] or empty)."
    calls["scatter_tokens_backward"] += 1
    gt, part = module_for(g, "_triton_tokens").scatter_backward(g, ids, inv, need_tokens, need_fill)
    return _absent(g, g.dtype) if gt is None else gt, _absent(g) if part is None else part


@scatter_tokens_backward.register_fake
def _(g, ids, inv, need_tokens, need_fill):
    B, N, D = g.shape
    return (g.new_empty((B, ids.shape[1], D)) if need_tokens else _absent(g, g.dtype),
            g.new_empty((B, D), dtype=F32) if need_fill else _absent(g))


def _scatter_setup(ctx, inputs, output):
    tokens, ids, N, fill, write_inv = inputs
    ctx.save_for_backward(ids, output[1])
    ctx.fill = (fill.shape, fill.dtype)
    ctx.mark_non_differentiable(output[1])


def _scatter_backward(ctx, g, _):
    ids, inv = ctx.saved_tensors
    need_t, need_f = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if not (need_t or need_f): return None, None, None, None, None
    gt, part = scatter_tokens_backward(g, ids, inv, need_t, need_f)
    gf = None
    if need_f:
        gf = fill_grad(part, *ctx.fill)
    return (gt if need_t else None), None, None, gf, None


scatter_tokens_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def scatter_tokens(tokens, ids, N, fill):
    "The compiled path of `ssl_nb.kernels.scatter_tokens`."
    B, N, D, K = check_scatter(tokens, ids, N, fill, values=False)
    if B * D == 0:
        from .reference import scatter_tokens_ref
        return scatter_tokens_ref(tokens, ids, N, fill)
    grad = torch.is_grad_enabled()
    return scatter_tokens_op(tokens, ids, N, fill, grad and fill.requires_grad)[0]


# ------------------------------------------------------------------------------------------------------- MAE
@torch.library.custom_op("ssl_nb::masked_patch_mse", mutates_args=())
def masked_patch_mse_op(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool,
                        write_grad: bool) -> tuple[Tensor, Tensor]:
    "(MAE's loss, its gradient to `pred` for grad_output = 1 or empty unless `write_grad`)."
    calls["masked_patch_mse"] += 1
    loss, grad = module_for(pred, "_triton_mae").launch(pred, imgs, mask, patch_size, norm_pix, write_grad)
    return loss, _absent(pred) if grad is None else grad


@masked_patch_mse_op.register_fake
def _(pred, imgs, mask, patch_size, norm_pix, write_grad):
    return pred.new_empty((), dtype=F32), (pred.new_empty(pred.shape, dtype=_grad_dtype(pred)) if write_grad
                                           else _absent(pred))


def _mae_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.dtype = inputs[0].dtype
    ctx.mark_non_differentiable(output[1])


def _mae_backward(ctx, g, _):
    grad, = ctx.saved_tensors
    return (grad * g).to(ctx.dtype), None, None, None, None, None


masked_patch_mse_op.register_autograd(_mae_backward, setup_context=_mae_setup)


def masked_patch_mse(pred, imgs, mask, patch_size, norm_pix=True):
    "The compiled path of `ssl_nb.kernels.masked_patch_mse`."
    p = check_mae_fused(pred, imgs, mask, patch_size, norm_pix)[4]
    write_grad = torch.is_grad_enabled() and pred.requires_grad
    return masked_patch_mse_op(pred, imgs.detach(), mask.detach(), p, bool(norm_pix), write_grad)[0]
