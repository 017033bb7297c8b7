"""Run by `tests/test_retro_tasks.py` under `torchrun --nproc_per_node=2` (gloo, CPU); not collected by pytest.

usage: _ddp_retro.py OUT_DIR

Two processes train Retro (and MoCo v2) for 2 steps on digits: ShuffleBN across processes (`shuffled_embed`), the
student's two forward passes before one backward under DDP, and the shared frozen head inside the DDP-wrapped student.
Every rank saves its parameters and its mean student (rank{R}.pt) after the run.
"""
import sys
from pathlib import Path

import torch

from ssl_nb.core import unwrap
from ssl_nb.train import fit, make_config

TINY = dict(dataset="digits", batch_size=16, K=64, knn_bank=None, eval_limit=64, log_every=1, device="cpu",
            progress=False, tensorboard=False)


def main(out: Path):
    fit(make_config("mocov2", **TINY, net="cifar_resnet18_w32", num_iters=1, eval_every=1, run_dir=str(out / "teacher")))
    def dump(step, state):
        if step == 2:
            task = state["task"]
            assert task.model.module.head is task.teacher.head
            torch.save({"params": {n: p.detach().clone() for n, p in unwrap(state["model"]).named_parameters()},
                        "mean": {k: v.clone() for k, v in task.key_encoder.state_dict().items()},
                        "queue": task.queue.queue.clone()},
                       out / f"rank{state['dist'].rank}.pt")
    fit(make_config("retro", **TINY, teacher=str(out / "teacher" / "last.pt"), num_iters=2, eval_every=2,
                    run_dir=str(out / "retro")), callbacks=[dump])
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
