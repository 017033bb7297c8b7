"""Run by `tests/test_train.py` under `torchrun --nproc_per_node=2` (gloo, CPU); not collected by pytest.

usage: _ddp_fit.py OUT_DIR

In one process group it runs
  probe/          a 2-step `fixmatch_probe` run: every rank saves the unlabeled indices it trained on and its final
                  parameters (rank{R}.pt);
  full/           4 uninterrupted fixmatch steps;
  killed/         the same run, killed (a callback raising on every rank) after step 3, then resumed to step 4.
"""
import dataclasses, sys
from pathlib import Path

import torch

from ssl_nb.core import ALGORITHMS, unwrap
from ssl_nb.fixmatch import FixMatch
from ssl_nb.train import fit, make_config


@ALGORITHMS.register("fixmatch_probe")
class FixMatchProbe(FixMatch):
    "FixMatch that remembers which unlabeled samples (positions in the unlabeled set) each step trained on."
    def train_step(self, batch):
        self.seen = getattr(self, "seen", []) + [batch["idx_ulb"].cpu().clone()]
        return super().train_step(batch)


TINY = dict(batch_size=8, uratio=2, eval_limit=64, log_every=1, progress=False, tensorboard=False, device="cpu")


class Killed(Exception): pass


def main(out: Path):
    def dump(step, state):
        if step == 2:
            rank = state["dist"].rank
            torch.save({"idx": state["algorithm"].seen,
                        "params": {n: p.detach().clone() for n, p in unwrap(state["model"]).named_parameters()}},
                       out / "probe" / f"rank{rank}.pt")
    (out / "probe").mkdir(parents=True, exist_ok=True)
    fit(make_config("fixmatch_probe", **TINY, num_iters=2, eval_every=2, run_dir=str(out / "probe")), callbacks=[dump])

    fit(make_config("fixmatch", **TINY, num_iters=4, eval_every=2, run_dir=str(out / "full")))

    def kill(step, state):
        if step == 3: raise Killed
    cfg = make_config("fixmatch", **TINY, num_iters=4, eval_every=2, ckpt_every=2, run_dir=str(out / "killed"))
    try: fit(cfg, callbacks=[kill])
    except Killed: pass
    else: raise AssertionError("the kill callback did not stop the run")
    fit(dataclasses.replace(cfg, resume=True))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
