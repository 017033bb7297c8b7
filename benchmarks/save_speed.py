"""SAVE's speed on a GPU: a ViT-B training step and inference frames/s at 256 and at 1024 px (the paper's claim that
the 256-px input trains and infers faster).

    python benchmarks/save_speed.py --out benchmarks/results/save_speed-<card>.md
    python benchmarks/save_speed.py --dry-run --out /tmp/speed.md      # CPU, tiny SAM at 64 and 128 px: checks the script

Random weights (SAM ViT-B with SAVE's adapters and audio path, built by `ssl_nb.save.build_save`): speed does not
depend on the values. A training step is forward + backward + AdamW over the trained parameters (adapters, audio
path, decoder; the encoder frozen), under bf16 autocast with channels-last activations, on random frames and masks
and 128-d audio features (VGGish embeddings precomputed, as GAVS caches them; --vggish adds a frozen VGGish forward on
the log-mel per frame). Inference runs the same model under `torch.inference_mode`. Each time is the median over
--steps after --warmup iterations, measured with CUDA synchronisation; peak memory is the allocator's peak.
Writes a markdown table with the card, the date and the command to --out.
"""
from __future__ import annotations

import argparse, contextlib, platform, shlex, statistics, sys, time
from pathlib import Path


def timed(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup): fn()
    sync(); ts = []
    for _ in range(steps):
        t = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure(arch: str, size: int, batch_train: int, batch_infer: int, steps: int, warmup: int, device, amp: bool,
            vggish: bool, compile_: bool) -> dict:
    import torch
    from ssl_nb.audio import create_audio_encoder
    from ssl_nb.save import build_save, mask_loss
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model = build_save(arch, size).to(device, memory_format=torch.channels_last)
    audio_net = create_audio_encoder("vggish_tiny" if not cuda else "vggish").to(device).eval().requires_grad_(False) \
        if vggish else None
    fwd = torch.compile(model) if compile_ else model
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)) if cuda else contextlib.nullcontext
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def inputs(b):
        x = torch.randn(b, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = (torch.rand(b, 1, size, size, device=device) > 0.5).float()
        lm = torch.randn(b, 1, 96, 64, device=device)
        return x, y, lm

    def feats(lm):
        if audio_net is None: return feats_cache[lm.shape[0]]
        with torch.no_grad(): return audio_net(lm).float()
    feats_cache = {b: torch.randn(b, 128, device=device) for b in (batch_train, batch_infer)}

    x, y, lm = inputs(batch_train)
    def train_step():
        with ctx(): loss, _ = mask_loss(fwd(x, feats(lm)), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if cuda: torch.cuda.reset_peak_memory_stats()
    t_train = timed(train_step, steps, warmup, sync)
    mem_train = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    model.eval(); xi, _, lmi = inputs(batch_infer)
    def infer():
        with torch.inference_mode(), ctx(): fwd(xi, feats(lmi))
    if cuda: torch.cuda.reset_peak_memory_stats()
    t_inf = timed(infer, steps, warmup, sync)
    mem_inf = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    del model, opt
    if cuda: torch.cuda.empty_cache()
    return {"size": size, "batch_train": batch_train, "train_ms": 1000 * t_train, "train_img_s": batch_train / t_train,
            "train_gb": mem_train, "batch_infer": batch_infer, "infer_ms": 1000 * t_inf, "infer_fps": batch_infer / t_inf,
            "infer_gb": mem_inf, "params_m": total / 1e6, "trained_m": trained / 1e6}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--batch-train", type=int, default=4, help="training batch (SAMA-AVS: 2 per GPU)")
    p.add_argument("--batch-infer", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    p.add_argument("--vggish", action="store_true", help="include a frozen VGGish forward per frame")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny SAM at 64 and 128 px, 1 step: checks the script only")
    a = p.parse_args(argv)

    import torch
    if a.dry_run:
        device, arch, sizes, bt, bi, steps, warmup = torch.device("cpu"), "tiny", [64, 128], 2, 2, 1, 1
    else:
        if not torch.cuda.is_available(): sys.exit("save_speed.py: no CUDA device here (use --dry-run to check the script on the CPU)")
        device, arch, sizes, bt, bi, steps, warmup = torch.device("cuda"), "vit_b", a.sizes, a.batch_train, a.batch_infer, a.steps, a.warmup
        torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
    rows = [measure(arch, s, bt, bi, steps, warmup, device, not a.no_amp, a.vggish, a.compile) for s in sizes]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    lines = [f"# SAVE speed: SAM {arch} with adapters, {'dry run (CPU, tiny SAM: checks the script, not a measurement)' if a.dry_run else card}",
             "", f"Command: `python {shlex.join(['benchmarks/save_speed.py', *argv])}`", "",
             f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; torch {torch.__version__}; "
             f"{'bf16 autocast' if device.type == 'cuda' and not a.no_amp else 'fp32'}, channels-last"
             f"{', torch.compile' if a.compile else ''}; audio: {'frozen VGGish forward included' if a.vggish else '128-d features precomputed'}; "
             f"median of {steps} after {warmup} warm-up iterations.", "",
             "| input | params (trained) M | train step ms (batch) | train images/s | train peak GB | inference frames/s (batch) | inference ms | inference peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} px | {r['params_m']:.1f} ({r['trained_m']:.1f}) | {r['train_ms']:.1f} ({r['batch_train']}) | "
                     f"{r['train_img_s']:.1f} | {r['train_gb']:.2f} | {r['infer_fps']:.1f} ({r['batch_infer']}) | "
                     f"{r['infer_ms']:.1f} | {r['infer_gb']:.2f} |")
    if len(rows) == 2:
        lines += ["", f"{rows[0]['size']} px vs {rows[1]['size']} px: training step ×{rows[1]['train_ms'] / rows[0]['train_ms']:.1f} "
                      f"faster, inference ×{rows[0]['infer_fps'] / rows[1]['infer_fps']:.1f} more frames/s."]
    out = Path(a.out); out.parent.mkdir(parents=True, exist_ok=True); out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
