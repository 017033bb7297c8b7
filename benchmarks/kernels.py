"""Benchmark of every ssl_nb.kernels op: Triton vs eager PyTorch vs torch.compile, forward and forward+backward.

    python benchmarks/kernels.py --out DIR             # on a CUDA GPU; ~2-3 minutes
    python benchmarks/kernels.py --dry-run --out DIR   # CPU smoke test of this script (interpreter, tiny shapes)

Shapes are those of the measured baselines (shared/baselines/anchors.py): SequenceMatch-style losses at 448x10,
448x100 fp32, 1280x1000 fp32, 8192x1000 and 32768x1000 bf16; MAE token gather at B=256, N=196, D=768 bf16 keeping
25% and 50%; plus the inverse scatter, MAE's ViT-B/16 batch-256 loss, and one large gather for bandwidth.

Three timings per row:
  anchor_ms     anchors.py's method: CUDA events around each call, synchronize after each, median of 30 after 5
                warm-ups, L2 not flushed. A host-bound op is measured with its host overhead (the eager baselines of
                the spec were measured this way). fwd+bwd calls `loss.backward()` on leaf inputs, as anchors.py does.
  do_bench_ms   triton.testing.do_bench (L2 flushed before each call, median): close to GPU time, since the host
                enqueues the next call while the GPU clears L2. fwd+bwd uses torch.autograd.grad.
  graph_ms      triton.testing.do_bench_cudagraph (small losses only): the op replayed from a CUDA graph, i.e. with
                no host overhead at all.
`pct_copy_bw` = floor bytes / do_bench time / the device-to-device copy bandwidth measured in the same run. Floor
bytes: fwd = read every input once; fwd+bwd = that + write every input gradient once (losses: the student views).
Writes DIR/bench.jsonl (one line per row, as it goes), bench.csv, bench.md and env.json. Results of the GPU runs:
benchmarks/results/kernels-*.md.

Also imported (by file path) by tests/test_kernel_checks.py and tools/aot.py, for `logits`, `LOSS_SHAPES` and
`tuning_variants`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch

COPY_KEY = "copy_TBps"
# The loss shapes (those of shared/baselines/anchors.py); tests/test_kernel_checks.py also checks them on the GPU.
LOSS_SHAPES = [(448, 10, torch.float32), (448, 100, torch.float32), (1280, 1000, torch.float32),
               (8192, 1000, torch.bfloat16), (32768, 1000, torch.bfloat16)]
# Other layouts of the loss kernel timed at C >= 1000, to tune pick_config: BLOCK_R rows per tile, num_warps,
# ROW_TILES tiles per program, PREFETCH (the next tile's loads issued before this tile's math), FUSED_REDUCE (the row
# statistics in two multi-operand reductions and the loss terms in one: 3 reductions per row instead of 13). Each
# variant names every key itself (`_config` is merged over pick_config's choice for the shape). A row spread over
# the program's warps pays a barrier-separated cross-warp exchange per reduction (tools/aot.py shows warpsPerCTA
# [1, nw] for every BLOCK_R), hence the 2-, 4- and 8-warp variants; one warp per row spills registers under ptxas,
# so 2 warps is the floor.
_V = lambda nw, rt, pf, fr: dict(BLOCK_R=1, num_warps=nw, ROW_TILES=rt, PREFETCH=pf, FUSED_REDUCE=fr)
TUNING_VARIANTS = (_V(4, 16, True, False), _V(4, 1, False, False), _V(4, 1, False, True), _V(2, 1, False, True),
                   _V(2, 16, True, True), _V(8, 1, False, True))
# the two-view kernel (FixMatch, ReFixMatch) with PREFETCH spills a register under ptxas: not timed
TWO_VIEW_VARIANTS = (_V(4, 1, False, False), _V(2, 1, False, True), _V(4, 16, False, True), _V(8, 1, False, True))
SMALL_VARIANTS = (dict(FUSED_REDUCE=False),)     # at C < 1000, merged over pick_config's choice
# at C <= 16 (448 x 10): other rows per tile than pick_config's 16, 2 warps, and the whole batch in one program
# walking 4 tiles
_ROWS = lambda br, nw=4: dict(BLOCK_R=br, ROW_TILES=1, num_warps=nw)
SMALL_LAYOUTS = (_ROWS(8), _ROWS(32), _ROWS(64), _ROWS(16, 2), dict(BLOCK_R=128, ROW_TILES=4, num_warps=8))


def tuning_variants(kind: str, R: int, C: int) -> tuple:
    """The other layouts timed for one loss and shape (`--tune`: every loss; otherwise SequenceMatch only), and, where
    there are several programs, pick_config's layout with the partials summed the other way (LAST_PROGRAM_SUMS: by
    the last program or by a second launch)."""
    from ssl_nb.kernels._triton_losses import pick_config
    cfg = pick_config(R, C, interpret=False, views=3 if kind == "sequencematch" else 2)
    sums = dict(LAST_PROGRAM_SUMS=not cfg["LAST_PROGRAM_SUMS"])
    several = R > cfg["BLOCK_R"] * cfg["ROW_TILES"]
    if C < 1000:
        return SMALL_VARIANTS + ((sums,) if several else ()) + (SMALL_LAYOUTS if cfg["BLOCK_C"] <= 16 else ())
    return (TUNING_VARIANTS if kind == "sequencematch" else TWO_VIEW_VARIANTS) + (sums,)


def logits(R: int, C: int, dtype, device, seed: int) -> torch.Tensor:
    """Seeded [R, C] logits with a spike of random height on a random class, so that confidences cover (0, 1) at any
    C and some rows pass a 0.95 threshold. No row's confidence is within 1e-4 of 0.95, where fp32 rounding (the
    GPU's approximate exp) could flip a mask bit: the max logit of such rows is pushed up. Made on the CPU."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(R, C, generator=g) * 2
    spike = torch.rand(R, generator=g) * 12.0
    z[torch.arange(R), torch.randint(0, C, (R,), generator=g)] += spike
    z = z.to(dtype)
    for _ in range(8):
        conf = z.double().softmax(-1).amax(-1)
        near = (conf - 0.95).abs() < 1e-4
        if not bool(near.any()): break
        z[near, z[near].float().argmax(-1)] += 0.0625
    return z.to(dtype).to(device)


# ---------------------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device, rep_ms=20, graphs=True):
        self.cuda = device == "cuda"
        self.rep_ms, self.graphs = rep_ms, graphs

    def anchor(self, fn, warmup=5, iters=30):
        "anchors.py's bench(): per-call CUDA events with a synchronize after each call; median, ms."
        for _ in range(warmup): fn()
        if not self.cuda:
            ts = []
            for _ in range(max(3, iters // 10)):
                t = time.perf_counter(); fn(); ts.append((time.perf_counter() - t) * 1e3)
            return statistics.median(ts)
        torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
        ts.sort()
        return ts[len(ts) // 2]

    def do_bench(self, fn, grad_to_none=None):
        if not self.cuda: return None
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=self.rep_ms, grad_to_none=grad_to_none, return_mode="median")

    def graph(self, fn, grad_to_none=None):
        if not (self.cuda and self.graphs): return None
        import triton.testing
        return triton.testing.do_bench_cudagraph(fn, rep=self.rep_ms, grad_to_none=grad_to_none, return_mode="median")

    def graph_anchor(self, fn):
        """`fn` captured once in a CUDA graph, then its replay timed by the anchor method (events around
        `replay()`, a sync after each): the host-inclusive time of a step that runs the op from a CUDA graph."""
        if not (self.cuda and self.graphs): return None
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3): fn()            # warm-up (compiles, fills the caches) off the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g): fn()
        return self.anchor(g.replay)


# ------------------------------------------------------------------------------------------------------------ bench
class Bench:
    def __init__(self, args):
        self.a = args
        self.dev = "cpu" if args.dry_run else "cuda"
        self.timer = Timer(self.dev, rep_ms=args.rep_ms, graphs=not args.no_graphs)
        self.rows = []
        self.t0 = time.time()
        self.copy_Bps = None
        os.makedirs(args.out, exist_ok=True)
        self.jsonl = open(os.path.join(args.out, "bench.jsonl"), "w")
        self._compiled = {}

    # ---- bookkeeping
    def left(self):
        return self.a.budget_s - (time.time() - self.t0)

    def log(self, msg):
        print(f"[{time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def emit(self, **row):
        self.rows.append(row)
        self.jsonl.write(json.dumps(row) + "\n"); self.jsonl.flush()
        t = lambda k: f"{row[k]:.4f}" if isinstance(row.get(k), float) else "-"
        self.log(f"{row['op']:<22} {row['shape']:<24} {row['impl']:<22} {row['mode']:<7} anchor {t('anchor_ms')} "
                 f"do_bench {t('do_bench_ms')} graph {t('graph_ms')} ms"
                 + (f"  {row['pct_copy_bw']:.0f}% copy BW" if isinstance(row.get('pct_copy_bw'), float) else "")
                 + (f"  ERROR {row['error'][:200]}" if row.get("error") else ""))

    def measure(self, op, shape, impl, mode, fn, floor_bytes, grad_fn=None, grad_to_none=None, graph=False,
                extra=None):
        """One row. fn: the call timed by the anchor method; grad_fn: the variant for do_bench / CUDA graphs
        (defaults to fn). Never raises: an error is recorded in the row."""
        row = dict(op=op, shape=shape, impl=impl, mode=mode, floor_MB=round(floor_bytes / 1e6, 3), **(extra or {}))
        try:
            row["anchor_ms"] = self.timer.anchor(fn)
            g = grad_fn or fn
            row["do_bench_ms"] = self.timer.do_bench(g, grad_to_none)
            if graph:
                try:
                    row["graph_ms"] = self.timer.graph(g, grad_to_none)
                    row["graph_anchor_ms"] = self.timer.graph_anchor(g)
                except Exception as e:      # capture failures are reported, the row keeps its other timings
                    row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
            t = row["do_bench_ms"] or row["anchor_ms"]
            if self.copy_Bps and t: row["pct_copy_bw"] = 100.0 * floor_bytes / (t * 1e-3) / self.copy_Bps
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
            if self.dev == "cuda":
                try:
                    torch.cuda.synchronize(); torch.cuda.empty_cache()
                except Exception:
                    pass
        self.emit(**row)
        return row

    def compiled(self, key, fn):
        "One torch.compile object per baseline function, reused across shapes (as anchors.py does)."
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, **({} if self.a.compile_backend == "inductor" else
                                                       dict(backend=self.a.compile_backend)))
        return self._compiled[key]

    def compile_ok(self, what):
        if self.a.no_compile: return False
        if self.left() < self.a.compile_reserve_s:
            self.log(f"skip torch.compile of {what}: {self.left():.0f}s of the time budget left")
            return False
        return True

    # ---- sections
    def env(self):
        e = dict(date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 torch=torch.__version__, python=sys.version.split()[0], device=self.dev)
        try:
            import triton; e["triton"] = triton.__version__
        except Exception as ex: e["triton"] = f"not importable: {ex}"
        if self.dev == "cuda":
            p = torch.cuda.get_device_properties(0)
            e.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                     sms=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
            try:
                e["nvidia_smi"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,power.limit",
                     "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
            except Exception as ex: e["nvidia_smi"] = f"unavailable: {ex}"
        self.envd = e
        json.dump(e, open(os.path.join(self.a.out, "env.json"), "w"), indent=1)
        self.log(f"env: {e}")

    def copy_bandwidth(self):
        "Device-to-device copy of 2 GiB bf16 (1 GiB on smaller GPUs), anchors.py's method: read + write bytes / time."
        try:
            n = (1 << 30) if self.dev == "cuda" else (1 << 22)
            if self.dev == "cuda" and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30: n //= 2
            x = torch.randn(n, device=self.dev, dtype=torch.bfloat16); y = torch.empty_like(x)
            ms = self.timer.anchor(lambda: y.copy_(x), 3, 20)
            self.copy_Bps = 2 * x.numel() * 2 / (ms * 1e-3)
            self.emit(op="copy", shape=f"{n}", impl="torch", mode="copy", anchor_ms=ms, floor_MB=4 * n / 1e6,
                      **{COPY_KEY: self.copy_Bps / 1e12})
            del x, y
        except Exception as e:
            self.emit(op="copy", shape="", impl="torch", mode="copy", error=f"{type(e).__name__}: {e}")

    # -- losses
    def loss_shapes(self):
        if self.a.dry_run: return [(48, 10, torch.float32), (16, 1000, torch.bfloat16)]
        return LOSS_SHAPES

    def losses(self, compiled_only=False, kinds=("sequencematch", "fixmatch", "refixmatch")):
        import ssl_nb.kernels as K
        from ssl_nb import losses as L
        for kind in kinds:
            for (R, C, dt) in self.loss_shapes():
                views = 3 if kind == "sequencematch" else 2
                zs = [logits(R, C, dt, self.dev, seed=i) for i in range(views)]
                ins = [zs[0]] + [z.detach().clone().requires_grad_() for z in zs[1:]]
                studs = ins[1:]
                es = torch.tensor([], dtype=dt).element_size()
                fwd_floor, grad_floor = views * R * C * es, (views - 1) * R * C * es
                shape = f"{R}x{C} {str(dt)[6:]}"
                impls = [("triton", getattr(K, f"{kind}_loss")), ("eager", getattr(L, f"{kind}_loss"))]
                if kind == "sequencematch": impls.append(("eager_anchors_formula", _anchors_seqmatch))
                variants = set()
                if (kind == "sequencematch" or self.a.tune) and not self.a.dry_run and not compiled_only:
                    # other layouts than pick_config's, to tune it on this GPU
                    from ssl_nb.kernels import _triton_losses as TL
                    for cfg in tuning_variants(kind, R, C):
                        name = [k if v is True else f"{k}={v}" for k, v in cfg.items() if v is not False]
                        name += [f"no {k}" for k in ("FUSED_REDUCE", "LAST_PROGRAM_SUMS") if cfg.get(k) is False]
                        variants.add(f"triton[{','.join(name)}]")
                        impls.append((f"triton[{','.join(name)}]", lambda *a, cfg=cfg, f=getattr(TL, f"{kind}_loss"):
                                      f(*a, _config=cfg)))
                if compiled_only:
                    if not self.compile_ok(f"{kind} {shape}"): continue
                    # the eager formula compiled, and the Triton op inside a compiled function (its custom op,
                    # `_compile.py`: what a compiled training step runs)
                    impls = [("compiled", self.compiled(kind, getattr(L, f"{kind}_loss"))),
                             ("triton[torch.compile]", self.compiled(f"triton_{kind}", getattr(K, f"{kind}_loss")))]
                small = R * C <= 1280 * 1000
                for name, fn in impls:
                    # CUDA graphs (GPU time without the host's noise): Triton vs eager at the small shapes, and
                    # every layout variant
                    graph = (small and name in ("triton", "eager")) or name in variants or (name == "triton"
                                                                                          and bool(variants))
                    if compiled_only and name != "compiled" and not self.compile_ok(f"triton {kind} {shape}"): break
                    f = lambda fn=fn: _first(fn(*ins))
                    self.measure(f"{kind}_loss", shape, name, "fwd", f, fwd_floor, graph=graph)

                    def fb(fn=fn):
                        _first(fn(*ins)).backward()
                    def fb_grad(fn=fn):
                        torch.autograd.grad(_first(fn(*ins)), studs)
                    self.measure(f"{kind}_loss", shape, name, "fwd+bwd", fb, fwd_floor + grad_floor, grad_fn=fb_grad,
                                 graph=graph)
                    for z in studs: z.grad = None
                if kind == "sequencematch" and (R, C, dt) == self.loss_shapes()[0] and not compiled_only:
                    # the same Triton op with every launch through triton's kernel[grid](...) (host-overhead share)
                    fn = getattr(K, f"{kind}_loss")
                    with _triton_launch_path():
                        self.measure(f"{kind}_loss", shape, "triton[no direct launch]", "fwd",
                                     lambda: _first(fn(*ins)), fwd_floor)
                        self.measure(f"{kind}_loss", shape, "triton[no direct launch]", "fwd+bwd",
                                     lambda: _first(fn(*ins)).backward(), fwd_floor + grad_floor,
                                     grad_fn=lambda: torch.autograd.grad(_first(fn(*ins)), studs))
                    for z in studs: z.grad = None
                del zs, ins, studs

    # -- tokens
    def tokens(self, compiled_only=False):
        import ssl_nb.kernels as K
        from ssl_nb.kernels.reference import gather_tokens_ref
        B, N, D = (256, 196, 768) if not self.a.dry_run else (4, 196, 64)
        shapes = [(B, N, D, 0.25), (B, N, D, 0.5)]
        if not self.a.dry_run: shapes.append((1024, 196, 768, 0.5))    # large: bandwidth
        bf16 = torch.bfloat16
        for (B, N, D, keep) in shapes:
            K_ = int(N * keep)
            large = B > 256
            g = torch.Generator(device=self.dev).manual_seed(0)
            x = torch.randn(B, N, D, device=self.dev, dtype=bf16, generator=g).requires_grad_()
            noise = torch.rand(B, N, device=self.dev, generator=g)
            ids_shuffle = torch.argsort(noise, 1)
            ids_keep = ids_shuffle[:, :K_]
            ids_restore = torch.argsort(ids_shuffle, 1)
            gout = torch.randn(B, K_, D, device=self.dev, dtype=bf16, generator=g)
            ar = torch.arange(B, device=self.dev)[:, None]
            shape = f"{B}x{N}x{D} keep{keep}"
            es = 2
            f_floor, fb_floor = 2 * B * K_ * D * es, (3 * B * K_ + B * N) * D * es
            mae = lambda: gather_tokens_ref(x, ids_keep)
            impls = [("triton", lambda: K.gather_tokens(x, ids_keep)), ("eager_mae_repeat_gather", mae),
                     ("eager_advanced_index", lambda: x[ar, ids_keep])]
            if compiled_only:
                if large or not self.compile_ok(f"gather {shape}"): impls = []
                else: impls = [("compiled_mae", self.compiled("gather", gather_tokens_ref)),
                               ("triton[torch.compile]", self.compiled("triton_gather", K.gather_tokens))]
            for name, fn in impls:
                fn2 = fn if not compiled_only else (lambda fn=fn: fn(x, ids_keep))
                # CUDA-graph replay (GPU time without any host overhead) for the target's shape, Triton vs MAE
                graph = keep == 0.25 and not large and name in ("triton", "eager_mae_repeat_gather")
                self.measure("gather_tokens", shape, name, "fwd", fn2, f_floor, graph=graph)
                self.measure("gather_tokens", shape, name, "fwd+bwd",
                             lambda fn2=fn2: torch.autograd.grad(fn2(), x, gout), fb_floor, graph=graph)
            if not compiled_only and keep == 0.25 and not large:
                with _triton_launch_path():     # every launch through triton's kernel[grid](...), for comparison
                    self.measure("gather_tokens", shape, "triton[no direct launch]", "fwd+bwd",
                                 lambda: torch.autograd.grad(K.gather_tokens(x, ids_keep), x, gout), fb_floor)
            if large: continue
            # scatter_tokens: the MAE decoder's "append mask tokens + unshuffle", at the same sizes
            tok = torch.randn(B, K_, D, device=self.dev, dtype=bf16, generator=g).requires_grad_()
            fill = torch.zeros(1, 1, D, device=self.dev, dtype=bf16).requires_grad_()
            gsc = torch.randn(B, N, D, device=self.dev, dtype=bf16, generator=g)
            s_floor, sb_floor = (B * K_ + B * N) * D * es, (2 * B * K_ + 2 * B * N) * D * es

            def mae_unshuffle(tok, fill, ids_restore):
                full = torch.cat([tok, fill.expand(tok.shape[0], ids_restore.shape[1] - tok.shape[1], -1)], dim=1)
                return torch.gather(full, 1, ids_restore.unsqueeze(-1).repeat(1, 1, tok.shape[2]))
            impls = [("triton", lambda: K.scatter_tokens(tok, ids_keep, N, fill)),
                     ("eager_mae_cat_gather", lambda: mae_unshuffle(tok, fill, ids_restore))]
            if compiled_only:
                if not self.compile_ok(f"scatter {shape}"): continue
                cm = self.compiled("scatter", mae_unshuffle)
                impls = [("compiled_mae", lambda cm=cm: cm(tok, fill, ids_restore))]
            for name, fn in impls:
                self.measure("scatter_tokens", shape, name, "fwd", fn, s_floor)
                self.measure("scatter_tokens", shape, name, "fwd+bwd",
                             lambda fn=fn: torch.autograd.grad(fn(), [tok, fill], gsc), sb_floor)
            del x, tok, gsc, gout

    # -- MAE loss
    def mae(self, compiled_only=False):
        import ssl_nb.kernels as K
        from ssl_nb.kernels.reference import masked_patch_mse_ref
        B, H, p = (256, 224, 16) if not self.a.dry_run else (2, 64, 16)
        Lp, E = (H // p) ** 2, p * p * 3
        g = torch.Generator(device=self.dev).manual_seed(0)
        imgs = torch.randn(B, 3, H, H, device=self.dev, generator=g)
        mask = (torch.rand(B, Lp, device=self.dev, generator=g) < 0.75).float()
        for dt in (torch.float32, torch.bfloat16):
            pred = torch.randn(B, Lp, E, device=self.dev, generator=g).to(dt).requires_grad_()
            es = pred.element_size()
            f_floor = B * Lp * E * es + imgs.numel() * 4
            fb_floor = f_floor + B * Lp * E * es
            shape = f"B{B} {H}px p{p} pred {str(dt)[6:]}"
            impls = [("triton", lambda: K.masked_patch_mse(pred, imgs, mask, p)),
                     ("eager_mae", lambda: masked_patch_mse_ref(pred, imgs, mask, p))]
            if compiled_only:
                if not self.compile_ok(f"mae {shape}"): continue
                cm = self.compiled("mae", masked_patch_mse_ref)
                impls = [("compiled_mae", lambda cm=cm: cm(pred, imgs, mask, p))]
            for name, fn in impls:
                self.measure("masked_patch_mse", shape, name, "fwd", fn, f_floor)
                self.measure("masked_patch_mse", shape, name, "fwd+bwd", lambda fn=fn: fn().backward(), fb_floor,
                             grad_fn=lambda fn=fn: torch.autograd.grad(fn(), pred))
                pred.grad = None
            del pred

    def launch_counts(self):
        "Kernel launches of one SequenceMatch fwd+bwd at 448x10 (torch.profiler), for Triton, eager and compiled."
        if self.dev != "cuda" or self.left() < 15: return
        import ssl_nb.kernels as K
        from ssl_nb import losses as L
        from torch.profiler import ProfilerActivity, profile
        zs = [logits(448, 10, torch.float32, self.dev, seed=i) for i in range(3)]
        ins = [zs[0]] + [z.detach().clone().requires_grad_() for z in zs[1:]]
        impls = [("triton", K.sequencematch_loss), ("eager", L.sequencematch_loss)]
        if "sequencematch" in self._compiled: impls.append(("compiled", self._compiled["sequencematch"]))
        if "triton_sequencematch" in self._compiled:
            impls.append(("triton[torch.compile]", self._compiled["triton_sequencematch"]))
        for name, fn in impls:
            try:
                for _ in range(3): torch.autograd.grad(_first(fn(*ins)), ins[1:])
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    torch.autograd.grad(_first(fn(*ins)), ins[1:]); torch.cuda.synchronize()
                n = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
                self.emit(op="sequencematch_loss", shape="448x10 float32", impl=name, mode="launches", launches=n)
            except Exception as e:
                self.emit(op="sequencematch_loss", shape="448x10 float32", impl=name, mode="launches",
                          error=f"{type(e).__name__}: {e}"[:300])

    # ---- output
    def write(self):
        out = self.a.out
        keys = ["op", "shape", "impl", "mode", "anchor_ms", "do_bench_ms", "graph_ms", "graph_anchor_ms", "floor_MB",
                "pct_copy_bw",
                "launches", COPY_KEY, "error", "graph_error"]
        with open(os.path.join(out, "bench.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore"); w.writeheader()
            for r in self.rows: w.writerow(r)
        open(os.path.join(out, "bench.md"), "w").write(self.markdown())
        self.log(f"wrote {out}/bench.md, bench.csv, bench.jsonl, env.json")

    def markdown(self):
        e = self.envd
        f = lambda v, d=3: "–" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))
        lines = [f"# ssl_nb.kernels benchmark", "",
                 f"GPU: **{e.get('gpu', e['device'])}** (sm {e.get('capability', '-')}, {e.get('sms', '-')} SMs, "
                 f"{e.get('memory_GiB', '-')} GiB; nvidia-smi: {e.get('nvidia_smi', '-')}), torch {e['torch']}, "
                 f"triton {e['triton']}, CUDA {e.get('cuda', '-')}, {e['date_utc']}.", ""]
        cp = [r for r in self.rows if r["op"] == "copy" and COPY_KEY in r]
        if cp: lines += [f"Device-to-device copy: **{cp[0][COPY_KEY]:.2f} TB/s** (read + write bytes / time).", ""]
        lines += ["Times in ms (median). anchor = CUDA events around each call with a sync after it, as in "
                  "shared/baselines/anchors.py (includes host overhead); do_bench = triton.testing.do_bench (L2 "
                  "flushed, ~GPU time); graph = replayed from a CUDA graph (do_bench_cudagraph: GPU time only); "
                  "graph+host = one replay of the captured call timed as anchor (events around `replay()`, sync "
                  "after each: what a step run from a CUDA graph pays). Speed-up = eager / triton on the same "
                  "method. %BW = floor bytes / do_bench time / copy bandwidth.", ""]
        lines += self.targets() + self.tuning_summary()
        by = {}
        for r in self.rows:
            if r["op"] == "copy" or r["mode"] == "launches": continue
            by.setdefault((r["op"], r["shape"]), []).append(r)
        for (op, shape), rs in by.items():
            lines += [f"### {op} — {shape}", "",
                      "| impl | mode | anchor ms | do_bench ms | graph ms | graph+host ms | ×eager (anchor) | "
                      "×eager (do_bench) | %BW |",
                      "|---|---|---|---|---|---|---|---|---|"]
            base = {}
            for r in rs:      # the first eager implementation listed is the baseline (MAE's own formulation)
                if r["impl"].startswith("eager") and "formula" not in r["impl"]: base.setdefault(r["mode"], r)
            for r in rs:
                b = base.get(r["mode"], {})
                sp = lambda k: f(b.get(k) / r[k], 1) + "×" if b.get(k) and r.get(k) else "–"
                err = f" ERROR: {r['error'][:120]}" if r.get("error") else ""
                lines.append(f"| {r['impl']}{err} | {r['mode']} | {f(r.get('anchor_ms'), 4)} | "
                             f"{f(r.get('do_bench_ms'), 4)} | {f(r.get('graph_ms'), 4)} | "
                             f"{f(r.get('graph_anchor_ms'), 4)} | {sp('anchor_ms')} | "
                             f"{sp('do_bench_ms')} | {f(r.get('pct_copy_bw'), 0)} |")
            lines.append("")
        lc = [r for r in self.rows if r["mode"] == "launches"]
        if lc:
            lines += ["Kernel launches, SequenceMatch fwd+bwd at 448×10: " +
                      ", ".join(f"{r['impl']} {r.get('launches', r.get('error'))}" for r in lc), ""]
        lines += [f"Total benchmark time: {time.time() - self.t0:.0f} s.", ""]
        return "\n".join(lines)

    def targets(self):
        "The issue's targets, read from the rows (no number here is typed in by hand)."
        def get(op, shape, impl, mode, key):
            for r in self.rows:
                if (r["op"], r["shape"], r["impl"], r["mode"]) == (op, shape, impl, mode): return r.get(key)
        out = ["Targets (H100): ", ""]
        for shape, target, anchor in [("448x10 float32", 10, 0.598), ("32768x1000 bfloat16", 5, 1.665)]:
            for key in ("anchor_ms", "do_bench_ms"):
                t = get("sequencematch_loss", shape, "triton", "fwd+bwd", key)
                e = get("sequencematch_loss", shape, "eager", "fwd+bwd", key)
                ea = get("sequencematch_loss", shape, "eager_anchors_formula", "fwd+bwd", key)
                out.append(f"- SequenceMatch fwd+bwd {shape} ({key}): triton {t and f'{t:.4f}'} ms; "
                           f"×{e / t:.1f} vs eager ssl_nb.losses ({e:.4f} ms)" if t and e else
                           f"- SequenceMatch fwd+bwd {shape} ({key}): not measured")
                if t and ea: out[-1] += f"; ×{ea / t:.1f} vs eager anchors.py formula ({ea:.4f} ms)"
                if t: out[-1] += f"; ×{anchor / t:.1f} vs the spec's H100 eager anchor ({anchor} ms); target ≥ {target}×"
            # the same call replayed from a CUDA graph, host included (a graph-captured step); 448x10 only
            t = get("sequencematch_loss", shape, "triton", "fwd+bwd", "graph_anchor_ms")
            e = get("sequencematch_loss", shape, "eager", "fwd+bwd", "graph_anchor_ms")
            if t and e:
                out.append(f"- SequenceMatch fwd+bwd {shape} replayed from a CUDA graph, host included (graph+host): "
                           f"triton {t:.4f} ms; ×{e / t:.1f} vs eager replayed the same way ({e:.4f} ms); "
                           f"×{anchor / t:.1f} vs the spec's H100 eager anchor ({anchor} ms); target ≥ {target}×")
            t = get("sequencematch_loss", shape, "triton[torch.compile]", "fwd+bwd", "anchor_ms")
            e = get("sequencematch_loss", shape, "compiled", "fwd+bwd", "anchor_ms")
            if t and e:
                out.append(f"- SequenceMatch fwd+bwd {shape} inside torch.compile (anchor_ms): triton custom op "
                           f"{t:.4f} ms; ×{e / t:.1f} vs the compiled eager formula ({e:.4f} ms)")
        for key in ("anchor_ms", "do_bench_ms", "graph_ms"):
            t = get("gather_tokens", "256x196x768 keep0.25", "triton", "fwd+bwd", key)
            e = get("gather_tokens", "256x196x768 keep0.25", "eager_mae_repeat_gather", "fwd+bwd", key)
            spec = f", ×{0.223 / t:.1f} vs the spec's anchor" if t and key != "graph_ms" else ""
            out.append(f"- gather_tokens fwd+bwd 256×196×768 keep 0.25 ({key}): " +
                       (f"triton {t:.4f} ms, ×{e / t:.1f} vs MAE repeat-gather ({e:.4f} ms; spec H100: 0.223 ms)"
                        f"{spec}; target ≥ 3×" if t and e else "not measured"))
        for shape in ("256x196x768 keep0.5", "1024x196x768 keep0.5"):
            p = get("gather_tokens", shape, "triton", "fwd", "pct_copy_bw")
            out.append(f"- gather_tokens fwd {shape}: " + (f"{p:.0f}% of copy bandwidth; target ≥ 70% on large "
                                                          f"shapes" if p else "not measured"))
        return out + [""]

    def tuning_summary(self):
        """Per loss and shape with layout variants: the fastest in GPU time (graph ms, fwd+bwd) against pick_config's
        layout (the `triton` row) and eager, to tune pick_config from one run."""
        graph = {}      # (op, shape) -> {impl: graph ms of fwd+bwd}
        for r in self.rows:
            if r["mode"] == "fwd+bwd" and r.get("graph_ms"):
                graph.setdefault((r["op"], r["shape"]), {})[r["impl"]] = r["graph_ms"]
        out = []
        for (op, shape), g in graph.items():
            layouts = {k: v for k, v in g.items() if k == "triton" or k.startswith("triton[")}
            if not any(k.startswith("triton[") for k in layouts): continue
            best = min(layouts, key=layouts.get)
            base, eager = g.get("triton"), g.get("eager")
            line = f"- {op} {shape}: fastest {best} {layouts[best]:.4f} ms"
            if base:
                line += f"; pick_config's layout {base:.4f} ms ({100 * (layouts[best] / base - 1):+.0f}%)"
                if eager: line += (f"; eager {eager:.4f} ms (fastest ×{eager / layouts[best]:.1f}, pick_config "
                                   f"×{eager / base:.1f})")
            out.append(line)
        return ["Layouts (GPU time of fwd+bwd replayed from a CUDA graph, `graph ms`):", ""] + out + [""] if out else []


@contextlib.contextmanager
def _triton_launch_path():
    "ssl_nb.kernels' Triton ops with the direct launch path off (`_launch.ENABLED`), their plan caches cleared."
    from ssl_nb.kernels import _launch, _triton_losses as TL, _triton_tokens as TT
    old = _launch.ENABLED
    _launch.ENABLED = False
    TL._PLANS.clear(); TT._CACHE.clear()
    try:
        yield
    finally:
        _launch.ENABLED = old
        TL._PLANS.clear(); TT._CACHE.clear()


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _anchors_seqmatch(lw, lm, ls):
    "The consistency loss that shared/baselines/anchors.py timed (tau 0.95, T = 1), for calibration against it."
    import torch.nn.functional as F
    tau, T = 0.95, 1.0
    pw = torch.softmax(lw.detach() / T, -1)
    maxp, pl = pw.max(-1); mask = (maxp >= tau).float()
    ce = (F.cross_entropy(ls, pl, reduction="none") * mask).mean()
    pm = torch.softmax(lm, -1)
    kl1 = F.kl_div(F.log_softmax(lm, -1), pw, reduction="batchmean")
    kl2 = F.kl_div(F.log_softmax(ls, -1), pm.detach(), reduction="batchmean")
    return ce + kl1 + kl2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/kernels_bench", help="folder for bench.md/.csv/.jsonl and env.json")
    ap.add_argument("--only", default="losses,tokens,mae", help="comma-separated sections")
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="time budget: torch.compile rows are skipped when less than --compile-reserve-s is left")
    ap.add_argument("--compile-reserve-s", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=20.0, help="do_bench / do_bench_cudagraph rep (ms)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--tune", action="store_true",
                    help="time the other kernel layouts (tuning_variants) for every loss, not SequenceMatch only")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU smoke test: interpreter, tiny shapes, torch.compile rows with the aot_eager backend")
    a = ap.parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["SSL_NB_KERNELS"] = "triton"
        a.compile_backend = "aot_eager"        # no C++ build on the CPU
        import warnings; warnings.filterwarnings("ignore", category=RuntimeWarning)
    elif not torch.cuda.is_available():
        print("No CUDA GPU: use --dry-run for a CPU smoke test.", flush=True); return 2
    b = Bench(a)
    sections = [s.strip() for s in a.only.split(",") if s.strip()]
    b.env()
    b.copy_bandwidth()
    order = [s for s in ("losses", "tokens", "mae") if s in sections]
    for s in order:                     # Triton + eager first: they are cheap and they are what the targets need
        b.log(f"== {s}")
        getattr(b, s)()
    # then the torch.compile baselines, most important first, while the time budget lasts
    for s, kw in [("losses", dict(kinds=("sequencematch",))), ("tokens", {}), ("mae", {}),
                  ("losses", dict(kinds=("fixmatch", "refixmatch")))]:
        if s in order:
            b.log(f"== {s} (torch.compile) {kw or ''}")
            getattr(b, s)(compiled_only=True, **kw)
    b.launch_counts()
    b.write()
    print(b.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
