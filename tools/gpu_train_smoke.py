"""End-to-end training steps on a CUDA GPU: bf16 autocast, channels_last, views made on the GPU, the fused Triton
losses (SSL_NB_KERNELS unset) against the PyTorch reference losses (SSL_NB_KERNELS=torch), at the classic batch
(B = 64, mu = 7) with WRN-28-2 on Fashion-MNIST. Writes OUT/train_smoke.json and prints a table.

    python tools/gpu_train_smoke.py OUT DATA_ROOT [STEPS] [DEVICE]
"""
import json, os, sys, time
from pathlib import Path

out, data_root = Path(sys.argv[1]), sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 300
device = sys.argv[4] if len(sys.argv) > 4 else "cuda"      # "cpu" for a dry run
out.mkdir(parents=True, exist_ok=True)
import torch
from ssl_nb.train import make_config, fit, read_metrics

def warm_up():
    "One short throwaway fit first, so that CUDA/cuDNN initialisation is not charged to the first measured run."
    cfg = make_config("fixmatch", net="wrn_28_2", batch_size=64, uratio=7, num_iters=20, eval_every=20, ckpt_every=20,
                      log_every=10, run_dir="/tmp/ssl_nb_smoke/warmup", data_root=data_root, device=device,
                      progress=False, tensorboard=False, eval_limit=512)
    fit(cfg)

warm_up()
rows = []
for algo, order in (("fixmatch", ("torch", "triton")), ("sequencematch", ("triton", "torch"))):
    for backend in order:
        os.environ["SSL_NB_KERNELS"] = "auto" if backend == "triton" else "torch"
        run_dir = Path("/tmp/ssl_nb_smoke") / f"{algo}-{backend}"
        cfg = make_config(algo, net="wrn_28_2", batch_size=64, uratio=7, num_iters=steps, eval_every=steps,
                          ckpt_every=steps, log_every=steps // 3, run_dir=str(run_dir), data_root=data_root,
                          device=device, progress=False, tensorboard=False, eval_limit=2000)
        t0 = time.time()
        try:
            res = fit(cfg)
            train = read_metrics(run_dir, "train")
            rows.append({"algorithm": algo, "losses": backend, "steps": steps, "wall_s": round(time.time() - t0, 1),
                         "ms_per_step_first_third": round(train[0]["ms_per_step"], 2),
                         "ms_per_step_rest": round(sum(r["ms_per_step"] for r in train[1:]) / max(1, len(train) - 1), 2),
                         "last_loss": round(train[-1]["loss"], 4), "top1": round(res.last_top1, 4),
                         "images_per_step": 64 + 448 * (3 if algo == "sequencematch" else 2)})
        except Exception as e:
            rows.append({"algorithm": algo, "losses": backend, "error": f"{type(e).__name__}: {e}"[:500]})
        print(rows[-1], flush=True)
info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
(out / "train_smoke.json").write_text(json.dumps(info, indent=1))
