"""Where the host time of a small fused loss goes, on a CUDA machine.

    python tools/cudaprof.py [--out DIR] [--compiled]

At 448 x 10 the SequenceMatch loss is host-bound: the GPU work is ~0.02 ms, the call ~0.1 ms. This prints the host
time per call (calls issued back to back without a sync; the GPU keeps up, so the loop runs at the host's pace) for
the fused loss and for floors that no wrapper can go under (a bare launch, a trivial `autograd.Function` on CUDA
tensors, which pays the autograd engine's hand-off to its CUDA device thread), then a `torch.profiler` table of the
forward + backward. `hostprof.py` measures the same calls without a GPU (fake driver); this is the real thing.
Writes DIR/cudaprof.txt when --out is given.
"""
from __future__ import annotations

import argparse
import io
import sys
import time

import torch


def per_call_us(fn, calls=2000, batches=7):
    "Min over batches of the mean host time per call, µs; synchronises only between batches."
    for _ in range(100): fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(calls // batches): fn()
        best = min(best, (time.perf_counter() - t) / (calls // batches) * 1e6)
        torch.cuda.synchronize()
    return best


def event_ms(fn, iters=50):
    "anchors.py's method: events around one call and a sync after it; median, ms."
    for _ in range(10): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compiled", action="store_true",
                    help="instead: the GPU kernels of the fused SequenceMatch loss at 32768 x 1000 bf16, eager vs "
                         "called inside torch.compile (its custom op), forward + torch.autograd.grad")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available(): raise SystemExit("cudaprof needs a CUDA GPU (hostprof.py works without one)")
    if a.compiled: return compiled_kernels(a.out)
    import ssl_nb.kernels as K
    from ssl_nb import losses
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    R, C = 448, 10
    zw, zm, zs = (torch.randn(R, C, device=dev, generator=g) * 3 for _ in range(3))
    zm.requires_grad_(); zs.requires_grad_()

    class Trivial(torch.autograd.Function):
        @staticmethod
        def forward(ctx, zm, zs): return zs.new_empty(())

        @staticmethod
        def backward(ctx, g): return None, None

    def backward_of(loss_fn):
        def run():
            zm.grad = zs.grad = None
            loss_fn(zw, zm, zs)[0].backward()
        return run

    def nograd():
        with torch.no_grad(): K.sequencematch_loss(zw, zm, zs)

    zm_c, zs_c = zm.detach().cpu().requires_grad_(), zs.detach().cpu().requires_grad_()
    gm, gs, c0 = torch.randn_like(zm), torch.randn_like(zs), torch.zeros((), device=dev)

    def native_linear():      # a loss built from native ops with the same value and gradient: c + <zm,Gm> + <zs,Gs>
        return torch.autograd.grad(c0 + (zm * gm).sum() + (zs * gs).sum(), [zm, zs])

    def single_threaded(fn):  # the autograd engine runs CUDA backward on the calling thread
        def run():
            with torch.autograd.set_multithreading_enabled(False): fn()
        return run

    one = torch.zeros((), device=dev)
    rows = [
        ("[floor] one launch: zero-dim tensor.add_(1)", lambda: one.add_(1)),
        ("[floor] torch.empty((), device=cuda)", lambda: torch.empty((), device=dev)),
        ("[floor] trivial autograd.Function apply + torch.autograd.grad",
         lambda: torch.autograd.grad(Trivial.apply(zm, zs), [zm, zs], allow_unused=True)),
        ("[floor] trivial autograd.Function apply only", lambda: Trivial.apply(zm, zs)),
        ("[floor] trivial autograd.Function apply + grad, CPU tensors",
         lambda: torch.autograd.grad(Trivial.apply(zm_c, zs_c), [zm_c, zs_c], allow_unused=True)),
        ("[floor] trivial autograd.Function apply + grad, engine single-threaded", single_threaded(
            lambda: torch.autograd.grad(Trivial.apply(zm, zs), [zm, zs], allow_unused=True))),
        ("[alt] native ops c + <zm,Gm> + <zs,Gs>, autograd.grad (no kernel)", native_linear),
        ("[alt] the same, engine single-threaded", single_threaded(native_linear)),
        ("fused SequenceMatch forward", lambda: K.sequencematch_loss(zw, zm, zs)),
        ("fused SequenceMatch forward under no_grad", nograd),
        ("fused SequenceMatch forward + torch.autograd.grad",
         lambda: torch.autograd.grad(K.sequencematch_loss(zw, zm, zs)[0], [zm, zs])),
        ("fused SequenceMatch forward + .backward() (grads reset)", backward_of(K.sequencematch_loss)),
        ("eager ssl_nb.losses forward + .backward() (grads reset)", backward_of(losses.sequencematch_loss)),
        ("fused SequenceMatch forward + .backward(), engine single-threaded",
         single_threaded(backward_of(K.sequencematch_loss))),
        ("eager ssl_nb.losses forward + .backward(), engine single-threaded",
         single_threaded(backward_of(losses.sequencematch_loss))),
    ]
    out = io.StringIO()

    def say(s=""):
        print(s, flush=True); out.write(s + "\n")

    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, python {sys.version.split()[0]}")
    say(f"SequenceMatch loss {R}x{C} fp32. host µs/call (back to back, min over batches) | anchor ms (events + sync)")
    for name, fn in rows:
        say(f"{per_call_us(fn):8.1f} µs | {event_ms(fn):.4f} ms  {name}")
    fused = backward_of(K.sequencematch_loss)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(200): fused()
        torch.cuda.synchronize()
    say("\ntorch.profiler, 200 x fused forward + .backward():")
    say(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if a.out:
        with open(f"{a.out}/cudaprof.txt", "w") as f: f.write(out.getvalue())
    return 0


def compiled_kernels(out_dir=None, R=32768, C=1000, calls=20):
    "torch.profiler's CUDA kernel table of `calls` fused fwd + grad calls, eager and compiled (inductor)."
    import ssl_nb.kernels as K
    g = torch.Generator(device="cuda").manual_seed(0)
    zw, zm, zs = (torch.randn(R, C, device="cuda", generator=g).mul_(3).bfloat16() for _ in range(3))
    zm.requires_grad_(); zs.requires_grad_()
    compiled = torch.compile(K.sequencematch_loss)
    text = io.StringIO()
    for name, fn in (("eager (autograd.Function)", K.sequencematch_loss), ("torch.compile (custom op)", compiled)):
        step = lambda: torch.autograd.grad(fn(zw, zm, zs)[0], [zm, zs])
        for _ in range(3): step()
        torch.cuda.synchronize()
        ms = event_ms(step, iters=20)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls): step()
            torch.cuda.synchronize()
        s = (f"\n== {name}: SequenceMatch {R}x{C} bf16 forward + autograd.grad, anchor {ms:.4f} ms; "
             f"GPU kernels over {calls} calls:\n"
             + prof.key_averages().table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))
        print(s, flush=True); text.write(s)
    if out_dir:
        with open(f"{out_dir}/cudaprof_compiled.txt", "w") as f: f.write(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
