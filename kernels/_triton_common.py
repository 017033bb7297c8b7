"""Triton pieces the fused ops share: a sum over the programs of one launch, in that launch; the backward's in-place
scale of a gradient the forward wrote.

**One-launch sum.** The fused losses sum their rows over many programs. Storing one partial per program and summing
them with a second launch (`part.sum()`) costs a launch on the GPU and a PyTorch call on the host, most of a small
loss's time. `sum_partials` instead has each program store its partial and take a ticket from an atomic counter; the
program that takes the last ticket adds the partials, in index order (so the result does not depend on which program
finished last: deterministic), stores the total and puts the counter back to 0 for the next launch (CUB's
single-pass "last block" reduction). The counters come from `_runtime.ticket_counters` (one ring per device, a new
slot per call). `sum_over_programs` is the mechanism alone, for its tests: many programs, each adding a block.

**Backward scale.** The fused ops write their gradients during the forward, for grad_output = 1; backward multiplies
them by grad_output in place (`scale_`): one launch that reads the 0-dim grad_output on the device (no host sync),
16-byte loads and stores, fp32 math and one rounding (`x.mul_(g)` with a 0-dim CUDA `g` runs PyTorch's generic
broadcast kernel, unvectorised).

Imported lazily (see `_runtime.triton_module`): importing this module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launcher
from ._runtime import cdiv, is_interpreted, ticket_counters, ticket_slot

FINAL_BLOCK = tl.constexpr(1024)     # partials the last program loads at once (it loops over more)


@triton.jit
def sum_partials(part_ptr, count_ptr, total, BLOCK: tl.constexpr):
    """Store this program's partial `total` at part_ptr[1 + pid]; the program that takes the last ticket of *count_ptr
    stores the sum of all partials at part_ptr[0] and resets *count_ptr to 0. The ticket is acquire-release at GPU
    scope: a program's partial is visible before its ticket, and the last program sees every partial after its own
    (the same thread stores the partial and takes the ticket; the loads bypass L1)."""
    n = tl.num_programs(0)
    tl.store(part_ptr + 1 + tl.program_id(0), total)
    ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == n - 1:
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n, BLOCK):
            acc += tl.load(part_ptr + 1 + i + offs, mask=i + offs < n, other=0.0, volatile=True)
        tl.store(part_ptr, tl.sum(acc, axis=0))
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _sum_blocks_kernel(x_ptr, n, part_ptr, count_ptr, slot, BLOCK: tl.constexpr):
    "Program i adds x[i * BLOCK : (i + 1) * BLOCK] (fp32); the launch's total lands in part[0]."
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    sum_partials(part_ptr, count_ptr + slot, tl.sum(x, axis=0), FINAL_BLOCK)


INTERPRETED = is_interpreted(_sum_blocks_kernel)


def sum_over_programs(x: torch.Tensor, block: int) -> torch.Tensor:
    """[total, partial_0, partial_1, ...] of a contiguous 1-d `x` added by cdiv(len(x), block) programs in one launch
    (the mechanism's test: many programs racing for their tickets)."""
    grid = cdiv(x.numel(), block)
    part = torch.empty(grid + 1, dtype=torch.float32, device=x.device)
    _sum_blocks_kernel[(grid,)](x, x.numel(), part, ticket_counters(x.device), ticket_slot(), BLOCK=block)
    return part


@triton.jit
def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    "x *= g in place, g a 0-dim tensor read on the device; fp32 math, one rounding to x's dtype (as `x.mul_(g)`)."
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=m)
    tl.store(x_ptr + offs, (x.to(tl.float32) * g).to(x.dtype), mask=m)


SCALE_BLOCK = 65536 if INTERPRETED else 4096


def scale_launcher(n: int) -> Launcher:
    """The launch of `_scale_kernel` over n elements, for one gradient buffer (the caller keys it on the buffer's
    dtype too; buffers fresh from the caching allocator are 512-byte aligned)."""
    return Launcher(_scale_kernel, (cdiv(n, SCALE_BLOCK),), dict(BLOCK=SCALE_BLOCK, num_warps=4))


def scale_(x: torch.Tensor, g: torch.Tensor, launcher: Launcher) -> torch.Tensor:
    """x *= g in place (x contiguous, g the 0-dim grad_output on x's device) with `launcher`, from
    `scale_launcher(x.numel())`; `mul_` for a g that is not a 16-byte aligned fp32 tensor (the launchers are
    specialised on one)."""
    if g.data_ptr() & 15 or g.dtype is not torch.float32: return x.mul_(g)
    launcher(x, g, x.numel())
    return x
