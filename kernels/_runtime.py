"""Backend choice (`SSL_NB_KERNELS`) and the lazy, mode-checked import of the Triton modules.

Nothing here imports triton. The Triton modules (`_triton_losses`, `_triton_tokens`, `_triton_mae`) are imported
the first time a Triton path is taken, so that `TRITON_INTERPRET=1` can still be set before their `@triton.jit`
decorators run (triton decides interpreter vs compiled mode per decorated function, at decoration time).
"""
from __future__ import annotations

import importlib
import itertools
import os
import sys

import torch

from ssl_nb.core import ConfigError

ENV = "SSL_NB_KERNELS"
_loaded: dict = {}


def backend(t: torch.Tensor) -> str:
    "`'triton'` or `'torch'` for an op whose tensors live where `t` lives: CUDA -> Triton, CPU -> PyTorch, unless forced."
    mode = os.environ.get(ENV)
    if mode: mode = mode.strip().lower()
    if not mode or mode == "auto": return "triton" if t.is_cuda else "torch"
    if mode in ("torch", "triton"): return mode
    raise ConfigError(f"{ENV}={os.environ[ENV]!r} is not a kernel backend; use 'torch', 'triton' or 'auto' "
                      f"(or unset it: CUDA tensors use Triton, CPU tensors PyTorch).")


def triton_module(name: str, device: torch.device):
    "Import `ssl_nb.kernels.<name>` (which defines the Triton kernels), in the mode `device` needs."
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"The Triton kernels run on CUDA tensors (or on CPU tensors through Triton's interpreter); "
                          f"got a tensor on {device}. Move it to 'cuda' or set {ENV}=torch.")
    mod = _loaded.get(name)
    if mod is None:
        if device.type == "cpu" and "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
            if torch.cuda.is_available():
                raise ConfigError(
                    f"{ENV}=triton with CPU tensors on a machine that has CUDA: running Triton on the CPU needs its "
                    f"interpreter, which applies to the whole process. Either move the tensors to 'cuda', use "
                    f"{ENV}=torch for CPU tensors, or start Python with TRITON_INTERPRET=1 set.")
            # No GPU: the interpreter is the only way to run Triton here. It must be on before triton is imported:
            # every @triton.jit function, triton's own tl.max / tl.sum / tl.argmax included, picks its mode when it
            # is defined. An explicit TRITON_INTERPRET=0 is respected (and then gives the error below).
            os.environ["TRITON_INTERPRET"] = "1"
        mod = importlib.import_module(f".{name}", __package__)
        _loaded[name] = mod
    if device.type == "cpu" and not mod.INTERPRETED:
        raise ConfigError(
            f"triton was imported in compiled (GPU) mode in this process (before TRITON_INTERPRET=1 was set, or with "
            f"TRITON_INTERPRET=0), so ssl_nb.kernels' Triton kernels cannot run on CPU tensors. Restart Python (the "
            f"notebook kernel) with TRITON_INTERPRET=1 set before anything imports triton (e.g. `TRITON_INTERPRET=1 "
            f"jupyter lab`, or `os.environ['TRITON_INTERPRET'] = '1'` in the first cell), or use {ENV}=torch for CPU "
            f"tensors.")
    return mod


def module_for(t: torch.Tensor, name: str):
    "`triton_module(name, t.device)`, without the checks once the module is loaded and `t` is a CUDA tensor."
    mod = _loaded.get(name)
    if mod is not None and t.is_cuda: return mod
    return triton_module(name, t.device)


def first_order_only(op: str):
    """Called first in the backward of every fused op: their gradients were written by the forward kernel and are
    constants to autograd, so a backward with `create_graph=True` (gradient penalties, double backward) would
    silently lose the second-order terms. Raise instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"ssl_nb.kernels' {op} computes first-order gradients only (no create_graph=True / "
                           f"double backward); set SSL_NB_KERNELS=torch for higher-order gradients.")


def second_backward(op: str) -> RuntimeError:
    "The error of a second backward through a fused op whose gradient buffer the first backward scaled in place."
    return RuntimeError(f"ssl_nb.kernels' {op} supports one backward pass per forward (its gradient buffer is scaled "
                        f"in place); recompute the loss instead of using retain_graph=True.")


def fill_grad(part: torch.Tensor, shape, dtype) -> torch.Tensor:
    "`scatter_tokens`' fill-token gradient from its fp32 per-sample partials [B, D], in the fill's dtype and shape."
    return part.sum(0).to(dtype).view(shape)


def is_interpreted(kernel) -> bool:
    "True when `kernel` and triton's own library functions (tl.max, tl.sum, ...) all run in the interpreter."
    import triton.language as tl
    return all(type(f).__name__ == "InterpretedFunction" for f in (kernel, tl.standard.max))


TICKET_RING = 1024      # ticket counters per device: launches in flight at once on different streams, at most
_tickets: dict = {}
_next_slot = itertools.count()


def ticket_counters(device: torch.device):
    """The device's ring of int32 ticket counters (zeros) for kernels whose last program sums the others' partials
    (`_triton_common.sum_partials`), or None while a CUDA graph is being captured and the ring does not exist yet
    (the caller then takes its two-launch path). A ticket counter goes back to 0 at the end of every launch that used
    it, so the ring is allocated once, on a stream of its own: a CUDA graph's memory pool (torch.compile's CUDA graphs,
    in warm-up and in capture) takes only the allocations of the graph's own stream, and its blocks may be handed out
    again when the graph's pool state is restored."""
    key = (device.type, device.index)
    t = _tickets.get(key)
    if t is None:
        if device.type != "cuda":
            t = torch.zeros(TICKET_RING, dtype=torch.int32, device=device)
        else:
            if torch.cuda.is_current_stream_capturing(): return None
            side = torch.cuda.Stream(device)
            with torch.cuda.stream(side):
                t = torch.zeros(TICKET_RING, dtype=torch.int32, device=device)
            side.synchronize()          # once per process and device: zeros before any stream's first launch
        _tickets[key] = t
    return t


def ticket_slot() -> int:
    """The ticket counter of the next launch: a new one per call, so that launches running at once on different
    streams do not share one. A CUDA graph replays the slot it captured: an eager launch a multiple of 1024 calls
    later, running on another stream at the very moment the graph replays, would share it (not guarded: that would
    cost a capture check on every call)."""
    return next(_next_slot) % TICKET_RING


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def align(*ints: int, cap: int = 16) -> int:
    "The largest power of 2 (<= cap) dividing every int: a constexpr alignment hint for the kernels."
    a = cap
    while a > 1 and any(int(i) % a for i in ints): a //= 2
    return a
