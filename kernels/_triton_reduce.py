"""A sum over the programs of one launch, in that launch: the last program to finish adds the others' partials.

The fused losses sum their rows over many programs. Storing one partial per program and summing them with a second
launch (`part.sum()`) costs a launch on the GPU and a PyTorch call on the host, most of a small loss's time.
`sum_partials` instead has each program store its partial and take a ticket from an atomic counter; the program that
takes the last ticket adds the partials, in index order (so the result does not depend on which program finished
last: deterministic), stores the total and puts the counter back to 0 for the next launch (CUB's single-pass
"last block" reduction). The counters come from `_runtime.ticket_counters` (one ring per device, a new slot per
call). `sum_over_programs` is the mechanism alone, for its tests: many programs, each adding a block of a vector.

Imported lazily (see `_runtime.triton_module`): importing this module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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
