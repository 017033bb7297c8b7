"""SimMatch, CoMatch and the EPASS ensemble projector: projector, bank, queue, graph, soft targets, gradients,
one training step, and checkpoint/resume of the banks and queues (spec §5.6)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ssl_nb.comatch as comatch_mod
from ssl_nb.comatch import CoMatch, CoMatchQueue
from ssl_nb.core import ConfigError
from ssl_nb.losses import (DistAlignQueue, comatch_graph, comatch_loss, comatch_queue_push, comatch_smooth,
                           dist_align_queue, simmatch_bank_update, simmatch_loss)
from ssl_nb.models import EnsembleProjector
from ssl_nb.simmatch import SimMatch, SimMatchBank
from ssl_nb.train import make_config

C, D = 10, 16   # classes and embedding size of the toy setups


def toy_batch(n_lb=4, n_ulb=8, seed=0, strong=("x_ulb_s",)):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(n, 1, 28, 28, generator=g)
    b = {"x_lb": x(n_lb), "y_lb": torch.randint(0, C, (n_lb,), generator=g),
         "idx_lb": torch.randperm(12, generator=g)[:n_lb], "x_ulb_w": x(n_ulb),
         "y_ulb": torch.randint(0, C, (n_ulb,), generator=g), "idx_ulb": torch.arange(n_ulb)}
    for k in strong: b[k] = x(n_ulb)
    return b


def make_algo(name, seed=0, **kw):
    torch.manual_seed(seed)
    cls = {"simmatch": SimMatch, "comatch": CoMatch}[name]
    return cls(make_config(name, proj_size=D, **kw), num_classes=C, num_lb=12, num_ulb=100, in_chans=1)


STRONG = {"simmatch": ("x_ulb_s",), "comatch": ("x_ulb_s0", "x_ulb_s1")}


# ------------------------------------------------------------------ ensemble projector (EPASS)
def test_one_projector_is_the_single_projector_baseline():
    torch.manual_seed(0)
    h = torch.randn(5, 12)
    ens = EnsembleProjector(12, 6, num_projectors=1)
    torch.testing.assert_close(ens(h), F.normalize(ens.projectors[0](h), dim=1))
    assert len(ens.projectors) == 1


def test_identical_heads_equal_one_head():
    torch.manual_seed(0)
    h = torch.randn(5, 12)
    ens = EnsembleProjector(12, 6, num_projectors=3)
    for p in ens.projectors[1:]: p.load_state_dict(ens.projectors[0].state_dict())
    torch.testing.assert_close(ens(h), F.normalize(ens.projectors[0](h), dim=1))


def test_mean_of_raw_outputs_is_normalised_once():
    torch.manual_seed(0)
    h = torch.randn(7, 12)
    ens = EnsembleProjector(12, 6, num_projectors=3)
    with torch.no_grad(): ens.projectors[2][2].weight.mul_(4); ens.projectors[2][2].bias.mul_(4)
    raw = torch.stack([p(h) for p in ens.projectors])
    out = ens(h)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(out, F.normalize(raw.mean(0), dim=1))
    mean_of_unit = F.normalize(F.normalize(raw, dim=2).mean(0), dim=1)
    assert ((out - mean_of_unit).norm(dim=1) > 1e-2).all()                   # heads of unequal norms: the order matters


def test_num_projectors_reaches_the_model():
    for n in (1, 3):
        algo = make_algo("simmatch", num_projectors=n)
        assert len(algo.model.projector.projectors) == n
        assert algo.model.projector.projectors[0][2].out_features == D


# ------------------------------------------------------------------ distribution alignment
def test_dist_align_rows_sum_to_one_and_uniform_history_is_identity():
    torch.manual_seed(0)
    p = torch.randn(6, C).softmax(-1)
    hist = torch.rand(32, C)
    torch.testing.assert_close(dist_align_queue(p, hist).sum(-1), torch.ones(6))
    torch.testing.assert_close(dist_align_queue(p, torch.full((32, C), 1 / C)), p)
    skewed = torch.tensor([0.5] + [0.5 / (C - 1)] * (C - 1))
    assert dist_align_queue(p, skewed)[:, 0].sum() < p[:, 0].sum()          # over-predicted class is pushed down


def test_dist_align_queue_module_history_and_pointer():
    da = DistAlignQueue(3, da_len=3)
    batches = [torch.tensor([[1., 0, 0]]), torch.tensor([[0., 1, 0]]), torch.tensor([[0., 0, 1]]), torch.tensor([[.5, .5, 0]])]
    for b in batches: out = da(b)
    torch.testing.assert_close(da.p_model, torch.tensor([[.5, .5, 0], [0., 1, 0], [0., 0, 1]]))   # row 0 overwritten
    assert int(da.ptr) == 1
    torch.testing.assert_close(out.sum(-1), torch.ones(1))


# ------------------------------------------------------------------ SimMatch pieces
def _sim_inputs(n=6, K=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(D, K, generator=g), dim=0)
    labels = torch.randint(0, C, (K,), generator=g)
    fw = F.normalize(torch.randn(n, D, generator=g), dim=1)
    fs = F.normalize(torch.randn(n, D, generator=g), dim=1)
    pw = torch.randn(n, C, generator=g).softmax(-1)
    zs = torch.randn(n, C, generator=g)
    return zs, fw, fs, pw, bank, labels


def test_simmatch_soft_targets_sum_to_one_and_factor_gathers_class_columns():
    zs, fw, fs, pw, bank, labels = _sim_inputs()
    _, _, aux = simmatch_loss(zs, fw, fs, pw, bank, labels, T=0.1, alpha=0.9, p_cutoff=0.0)
    for k in ("s_t", "t_in", "agg", "p_hat"):
        torch.testing.assert_close(aux[k].sum(1), torch.ones(6), msg=k)
    s_t = (fw @ bank / 0.1).softmax(1)
    factor = torch.stack([pw[:, labels[k]] for k in range(bank.shape[1])], 1)          # column k <- class y_k
    torch.testing.assert_close(aux["t_in"], s_t * factor / (s_t * factor).sum(1, keepdim=True))
    agg = torch.stack([s_t[:, labels == c].sum(1) for c in range(C)], 1)
    torch.testing.assert_close(aux["agg"], agg)
    torch.testing.assert_close(aux["p_hat"], 0.9 * pw + 0.1 * agg)


def test_simmatch_losses_values_and_first_epoch():
    zs, fw, fs, pw, bank, labels = _sim_inputs()
    lu, lin, aux = simmatch_loss(zs, fw, fs, pw, bank, labels, T=0.1, p_cutoff=0.0)
    torch.testing.assert_close(lu, -(aux["p_hat"] * zs.log_softmax(-1)).sum(1).mean())
    torch.testing.assert_close(lin, -(aux["t_in"] * (fs @ bank / 0.1).log_softmax(1)).sum(1).mean())
    lu0, lin0, aux0 = simmatch_loss(zs, fw, fs, pw, bank, labels, T=0.1, p_cutoff=0.0, first_epoch=True)
    assert lin0.item() == 0.0 and lin.item() > 0
    torch.testing.assert_close(aux0["p_hat"], pw)
    torch.testing.assert_close(lu0, -(pw * zs.log_softmax(-1)).sum(1).mean())


def test_simmatch_mask_is_on_p_hat_and_mean_over_all_rows():
    zs, fw, fs, pw, bank, labels = _sim_inputs()
    pw = torch.cat([F.one_hot(torch.tensor([2, 5, 7]), C).float() * 0.999 + 0.0001, torch.full((3, C), 1 / C)])
    lu, _, aux = simmatch_loss(zs, fw, fs, pw, bank, labels, T=0.1, p_cutoff=0.8)
    assert torch.equal(aux["mask"], torch.tensor([1., 1, 1, 0, 0, 0]))
    ce = -(aux["p_hat"] * zs.log_softmax(-1)).sum(1)
    torch.testing.assert_close(lu, ce[:3].sum() / 6)


def test_simmatch_no_gradient_into_bank_or_teacher():
    zs, fw, fs, pw, bank, labels = _sim_inputs()
    bank.requires_grad_(); fw.requires_grad_(); pw.requires_grad_(); fs.requires_grad_(); zs.requires_grad_()
    lu, lin, _ = simmatch_loss(zs, fw, fs, pw, bank, labels, T=0.1, p_cutoff=0.0)
    (lu + lin).backward()
    assert bank.grad is None and fw.grad is None and pw.grad is None
    assert fs.grad.abs().sum() > 0 and zs.grad.abs().sum() > 0


@pytest.mark.parametrize("renorm", ["code", "per_embedding"])
def test_simmatch_bank_update_rows_changed_and_normalisation(renorm):
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(D, 10, generator=g), dim=0)
    labels = torch.zeros(10, dtype=torch.long)
    idx = torch.tensor([7, 2, 5])
    k = F.normalize(torch.randn(3, D, generator=g), dim=1)
    y = torch.tensor([4, 9, 1])
    bank_in = bank.clone()
    nb, nl = simmatch_bank_update(bank, labels, idx, k, y, bank_renorm=renorm)
    changed = (nb != bank).any(0)
    assert changed.nonzero().flatten().tolist() == [2, 5, 7]
    assert nl.tolist() == [0, 0, 9, 0, 0, 1, 0, 4, 0, 0]
    mixed = 0.7 * bank[:, idx] + 0.3 * k.t()
    if renorm == "code":     # the released code: F.normalize default dim=1 on the [d, B] slice
        torch.testing.assert_close(nb[:, idx], F.normalize(mixed, dim=1))
        torch.testing.assert_close(nb[:, idx].norm(dim=1), torch.ones(D))
        assert (nb[:, idx].norm(dim=0) - 1).abs().max() > 1e-2                    # columns are NOT unit
    else:
        torch.testing.assert_close(nb[:, idx], F.normalize(mixed, dim=0))
        torch.testing.assert_close(nb[:, idx].norm(dim=0), torch.ones(3))
    assert torch.equal(bank, bank_in) and not labels.any()                      # the inputs were not modified


def test_simmatch_bank_replace_and_duplicates():
    bank = F.normalize(torch.randn(D, 6), dim=0)
    k = F.normalize(torch.randn(3, D), dim=1)
    nb, nl = simmatch_bank_update(bank, torch.zeros(6, dtype=torch.long), torch.tensor([4, 1, 4]), k,
                                  torch.tensor([2, 3, 5]), replace=True)
    torch.testing.assert_close(nb[:, 1], k[1]); torch.testing.assert_close(nb[:, 4], k[2])   # last occurrence wins
    assert nl[4] == 5 and nl[1] == 3
    torch.testing.assert_close(nb[:, [0, 2, 3, 5]], bank[:, [0, 2, 3, 5]])


def test_simmatch_bank_module_gathers_and_keeps_buffers():
    bank = SimMatchBank(D, 12)
    torch.testing.assert_close(bank.bank.norm(dim=0), torch.ones(12))
    assert sorted(dict(bank.named_buffers())) == ["bank", "labels"]
    old = bank.bank
    bank.update(torch.tensor([3]), F.normalize(torch.randn(1, D), dim=1), torch.tensor([6]))
    assert bank.bank is not old and bank.labels[3] == 6 and sorted(dict(bank.named_buffers())) == ["bank", "labels"]


# ------------------------------------------------------------------ CoMatch pieces
def test_comatch_graph_threshold_self_loops_and_rows():
    torch.manual_seed(0)
    p = torch.randn(7, C).mul(3).softmax(-1)
    for cutoff in (0.0, 0.3, 0.8, 1.0):
        G = comatch_graph(p, cutoff)
        raw = p @ p.t(); raw.fill_diagonal_(1)
        assert torch.equal(G > 0, raw >= cutoff)                              # exactly the edges >= cutoff survive
        assert (torch.diagonal(G) > 0).all()
        torch.testing.assert_close(G.sum(1), torch.ones(7))
    assert torch.equal(comatch_graph(p, 1.0), torch.eye(7))                   # only self-loops at cutoff 1


def test_comatch_loss_values():
    torch.manual_seed(0)
    p = torch.randn(5, C).mul(4).softmax(-1)
    z0 = torch.randn(5, C, requires_grad=True)
    f0 = F.normalize(torch.randn(5, D), dim=1).requires_grad_()
    f1 = F.normalize(torch.randn(5, D), dim=1).requires_grad_()
    lu, lc, aux = comatch_loss(z0, f0, f1, p, T=0.2, contrast_p_cutoff=0.8, p_cutoff=0.7)
    mask = (p.max(1).values >= 0.7).float()
    assert torch.equal(aux["mask"], mask)
    torch.testing.assert_close(lu, (mask * -(p * z0.log_softmax(-1)).sum(1)).mean())
    G = comatch_graph(p, 0.8)
    sim = torch.exp(f0 @ f1.t() / 0.2); sim = sim / sim.sum(1, keepdim=True)
    torch.testing.assert_close(lc, -(torch.log(sim + 1e-7) * G).sum(1).mean())
    p.requires_grad_()
    lu, lc, _ = comatch_loss(z0, f0, f1, p, T=0.2)
    (lu + lc).backward()
    assert p.grad is None and f0.grad.abs().sum() > 0 and f1.grad.abs().sum() > 0


def test_comatch_smooth_rows_sum_to_one_and_ignore_gradients():
    torch.manual_seed(0)
    p = torch.randn(4, C).softmax(-1)
    qf = F.normalize(torch.randn(20, D), dim=1).requires_grad_()
    qp = torch.randn(20, C).softmax(-1).requires_grad_()
    fw = F.normalize(torch.randn(4, D), dim=1)
    out = comatch_smooth(p, fw, qf, qp, T=0.2, alpha=0.9)
    torch.testing.assert_close(out.sum(1), torch.ones(4))
    A = (fw @ qf.detach().t() / 0.2).softmax(1)
    torch.testing.assert_close(out, 0.9 * p + 0.1 * A @ qp.detach())
    assert not out.requires_grad


def test_comatch_queue_wraps_and_truncates():
    qf, qp, ptr = torch.zeros(7, 2), torch.zeros(7, 3), torch.tensor(0)
    seen = []
    for i in range(4):   # pushes of 3 rows into 7 slots: 0 -> 3 -> 6 -> (1 row written, 2 dropped) 9 % 7 = 2 -> 5
        rows = torch.arange(3 * i, 3 * i + 3, dtype=torch.float)[:, None].repeat(1, 2)
        qf2, qp2, ptr = comatch_queue_push(qf, qp, ptr, rows, torch.ones(3, 3))
        assert torch.equal(qf, qf2) is False
        qf, qp = qf2, qp2
        seen.append(int(ptr))
    assert seen == [3, 6, 2, 5]                     # the pointer wraps modulo Q, as USB/EPASS's (ptr + n) % Q
    assert qf[:, 0].tolist() == [0, 1, 9, 10, 11, 5, 6]
    # a push larger than the queue is truncated to the queue size
    qf, _, ptr = comatch_queue_push(torch.zeros(2, 1), torch.zeros(2, 1), 0, torch.tensor([[1.], [2.], [3.]]), torch.ones(3, 1))
    assert qf[:, 0].tolist() == [1, 2] and int(ptr) == 1


# ------------------------------------------------------------------ algorithms: one step
@pytest.mark.parametrize("name", ["simmatch", "comatch"])
@pytest.mark.parametrize("num_projectors", [1, 3])
def test_one_step_changes_the_weights(name, num_projectors):
    algo = make_algo(name, num_projectors=num_projectors, p_cutoff=0.0)
    algo.step = 5000
    out = algo.train_step(toy_batch(strong=STRONG[name]))
    assert torch.isfinite(out["loss"]) and out["unsup_loss"] > 0 and out["mask_ratio"] == 1
    assert (out["in_loss"] if name == "simmatch" else out["contrast_loss"]) > 0
    before = {n: p.detach().clone() for n, p in algo.model.named_parameters()}
    opt = torch.optim.SGD(algo.model.parameters(), lr=0.1)
    opt.zero_grad(); out["loss"].backward(); opt.step()
    moved = {n for n, p in algo.model.named_parameters() if not torch.equal(before[n], p)}
    for i in range(num_projectors):
        assert {f"projector.projectors.{i}.0.weight", f"projector.projectors.{i}.2.weight"} <= moved
    assert "backbone.classifier.weight" in moved and any(n.startswith("backbone.") and "conv" in n for n in moved)
    for m in algo.state_modules().values():
        for b in m.buffers(): assert not b.requires_grad and b.grad is None


def test_simmatch_step_updates_only_labeled_columns_after_the_loss(monkeypatch):
    algo = make_algo("simmatch", p_cutoff=0.0)
    algo.step = 5000
    b = toy_batch()
    used = {}
    real = __import__("ssl_nb.simmatch", fromlist=["simmatch_loss"]).simmatch_loss
    def spy(*a, **kw):
        used["bank"] = a[4].clone()
        return real(*a, **kw)
    monkeypatch.setattr("ssl_nb.simmatch.simmatch_loss", spy)
    bank0 = algo.bank.bank.clone()
    algo.train_step(b)
    assert torch.equal(used["bank"], bank0)                                   # the loss sees the bank before the update
    changed = (algo.bank.bank != bank0).any(0).nonzero().flatten()
    assert changed.tolist() == sorted(b["idx_lb"].tolist())
    assert torch.equal(algo.bank.labels[b["idx_lb"]], b["y_lb"])


def test_simmatch_first_epoch_switch():
    algo = make_algo("simmatch", p_cutoff=0.0, instance_warmup_iters=10)
    algo.step = 9
    assert algo.train_step(toy_batch())["in_loss"].item() == 0.0
    algo.step = 10
    assert algo.train_step(toy_batch())["in_loss"].item() > 0.0


def test_comatch_queue_stores_p_orig_and_one_hot_labels(monkeypatch):
    algo = make_algo("comatch", p_cutoff=0.0, smoothing_warmup_iters=0, queue_size=40)
    b = toy_batch(strong=STRONG["comatch"])
    algo.step = 0
    algo.train_step(b)                                     # fills rows 0..11 (smoothing off at step 0: step <= queue_batch)
    calls = []
    def spy(probs, *a, **kw):
        out = comatch_smooth(probs, *a, **kw)
        calls.append((probs.clone(), out.clone()))
        return out
    monkeypatch.setattr(comatch_mod, "comatch_smooth", spy)
    algo.step = 100
    algo.train_step(toy_batch(seed=1, strong=STRONG["comatch"]))
    assert len(calls) == 1
    p_orig, p_smooth = calls[0]
    assert (p_orig - p_smooth).abs().max() > 1e-4                             # smoothing did change p
    torch.testing.assert_close(algo.queue.probs[12:20], p_orig)               # the queue holds p_orig ...
    assert not torch.allclose(algo.queue.probs[12:20], p_smooth)              # ... not the smoothed p
    y = toy_batch(seed=1)["y_lb"]
    assert torch.equal(algo.queue.probs[20:24], F.one_hot(y, C).float())      # labeled rows: one-hot
    torch.testing.assert_close(algo.queue.feats[12:24].norm(dim=1), torch.ones(12))
    assert int(algo.queue.ptr) == 24


def test_comatch_smoothing_waits_for_warmup_and_queue(monkeypatch):
    algo = make_algo("comatch", smoothing_warmup_iters=50)                   # queue_batch = 5
    hits = []
    monkeypatch.setattr(comatch_mod, "comatch_smooth", lambda *a, **kw: hits.append(algo.step) or comatch_smooth(*a, **kw))
    for step in (0, 5, 49, 50):
        algo.step = step
        algo.train_step(toy_batch(strong=STRONG["comatch"]))
    assert hits == [50]
    algo2 = make_algo("comatch", smoothing_warmup_iters=0)
    hits.clear()
    monkeypatch.setattr(comatch_mod, "comatch_smooth", lambda *a, **kw: hits.append(algo2.step) or comatch_smooth(*a, **kw))
    for step in (0, 5, 6):
        algo2.step = step
        algo2.train_step(toy_batch(strong=STRONG["comatch"]))
    assert hits == [6]                                                        # needs step > queue_batch


# ------------------------------------------------------------------ checkpoints: banks and queues survive a resume
@pytest.mark.parametrize("name", ["simmatch", "comatch"])
def test_state_dict_round_trip_equals_uninterrupted(name, tmp_path):
    kw = dict(p_cutoff=0.0, **({"instance_warmup_iters": 1} if name == "simmatch" else {"smoothing_warmup_iters": 0, "queue_size": 30}))
    batches = [toy_batch(seed=s, strong=STRONG[name]) for s in range(4)]

    def run(algo, steps):
        for s in steps:
            algo.step = s
            algo.train_step(batches[s])

    a = make_algo(name, **kw); run(a, range(4))
    b = make_algo(name, **kw); run(b, range(3))
    torch.save({"model": b.model.state_dict(), "algorithm": b.state_dict()}, tmp_path / "ck.pt")
    c = make_algo(name, seed=123, **kw)                                       # different initial bank/weights
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    c.model.load_state_dict(ck["model"]); c.load_state_dict(ck["algorithm"])
    run(c, [3])
    sa, sc = a.state_dict(), c.state_dict()
    assert sorted(sa) == sorted(sc)
    for mod in sa:
        for k in sa[mod]: assert torch.equal(sa[mod][k], sc[mod][k]), (mod, k)
    fresh = make_algo(name, seed=123, **kw).state_dict()
    assert any(not torch.equal(sa[m][k], fresh[m][k]) for m in sa for k in sa[m])   # the test can fail


def test_load_state_dict_rejects_other_algorithm():
    sim, co = make_algo("simmatch"), make_algo("comatch")
    with pytest.raises(Exception, match="task state"):
        co.load_state_dict(sim.state_dict())


@pytest.mark.parametrize("name", ["simmatch", "comatch"])
def test_fit_resume_restores_bank_and_queue_exactly(name, tmp_path, monkeypatch):
    """End to end through `fit` on a tiny dataset: a run interrupted after its step-2 checkpoint and resumed ends with
    the same bank/queue, DA history and EMA accuracy as an uninterrupted one."""
    import ssl_nb.classify as classify, ssl_nb.train as train
    from ssl_nb.data import ImageDataset
    g = torch.Generator().manual_seed(0)
    imgs = lambda n: torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    classes = [str(i) for i in range(C)]
    lb = ImageDataset(imgs(20), torch.arange(20) % C, classes, (0.5,), (0.25,), "toy")
    ulb = ImageDataset(imgs(60), torch.arange(60) % C, classes, (0.5,), (0.25,), "toy")
    test = ImageDataset(imgs(20), torch.arange(20) % C, classes, (0.5,), (0.25,), "toy")
    monkeypatch.setattr(classify, "prepare_data", lambda cfg: classify.RunData(lb, ulb, test, C, 1, 28, (0.5,), (0.25,)))

    class Stop(Exception): pass
    def stop_at_2(step, state):
        if step == 2: raise Stop

    extra = ({"instance_warmup_iters": 1} if name == "simmatch" else
             {"smoothing_warmup_iters": 0, "queue_batch": 1, "queue_size": 30})   # 12 rows per step: 0 -> 12 -> 24 -> 6 -> 18
    def cfg(run_dir, resume=False):
        return make_config(name, num_iters=4, batch_size=4, uratio=2, eval_every=100, ckpt_every=2, log_every=1,
                           proj_size=8, progress=False, tensorboard=False, run_dir=str(run_dir), resume=resume, **extra)
    full = train.fit(cfg(tmp_path / "full"))
    with pytest.raises(Stop): train.fit(cfg(tmp_path / "cut"), callbacks=[stop_at_2])
    resumed = train.fit(cfg(tmp_path / "cut", resume=True))
    a = train.load_checkpoint(tmp_path / "full" / "last.pt")["task"]
    b = train.load_checkpoint(tmp_path / "cut" / "last.pt")["task"]
    for mod in a:
        for k in a[mod]: assert torch.equal(a[mod][k], b[mod][k]), (mod, k)
    assert train.load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 4
    if name == "comatch": assert int(a["queue"]["ptr"]) == 18 and a["queue"]["probs"].sum(1).allclose(torch.ones(30))
    else: assert not torch.equal(a["bank"]["labels"], torch.zeros_like(a["bank"]["labels"]))
    assert full.last_top1 == resumed.last_top1


def test_config_validation():
    with pytest.raises(ConfigError, match="num_projectors must be >= 1"): make_config("simmatch", num_projectors=0)
    with pytest.raises(ConfigError, match="queue_size must be >= 1"): make_config("comatch", queue_size=0)
    with pytest.raises(ConfigError, match="smoothing_alpha"): make_config("comatch", smoothing_alpha=1.5)


# ------------------------------------------------------------------ no host syncs in the step
class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,kw", [("simmatch", {}), ("simmatch", {"use_ema_teacher": True}),
                                     ("comatch", {"smoothing_warmup_iters": 0})])
def test_train_step_reads_nothing_back_to_the_host(name, kw):
    """`.item()`, `bool(tensor)` and boolean-mask indexing all dispatch `_local_scalar_dense`/`nonzero`/`masked_select`."""
    import copy
    algo = make_algo(name, **kw)
    algo.ema_model = copy.deepcopy(algo.model).eval()
    algo.step = 50                                                     # past every warm-up: all branches run
    batch = toy_batch(strong=STRONG[name])
    with _RecordOps() as rec:
        out = algo.train_step(batch)
        out["loss"].backward()
    assert len(rec.ops) > 100
    bad = {o for o in rec.ops if any(s in o for s in ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero"))}
    assert not bad, bad


# ------------------------------------------------------------------ DDP: every process holds the same bank and queue
_DDP_WORKER = r'''
import sys
from pathlib import Path
import torch
from ssl_nb.core import ALGORITHMS
from ssl_nb.simmatch import SimMatch
from ssl_nb.comatch import CoMatch
from ssl_nb.train import fit, make_config

def probe(cls):
    class Probe(cls):
        def train_step(self, batch):
            if not hasattr(self, "seen"):
                self.seen, self.init = [], {f"{m}.{k}": v.clone() for m, sd in self.state_dict().items() for k, v in sd.items()}
            self.seen.append((batch["idx_lb"].clone(), batch["y_lb"].clone()))
            return super().train_step(batch)
    return Probe

ALGORITHMS.register("simmatch_probe")(probe(SimMatch))
ALGORITHMS.register("comatch_probe")(probe(CoMatch))
out = Path(sys.argv[1])
tiny = dict(batch_size=8, uratio=2, eval_limit=64, num_iters=3, eval_every=3, proj_size=8, progress=False,
            tensorboard=False, device="cpu")
for name, extra in (("simmatch_probe", {"instance_warmup_iters": 1}),
                    ("comatch_probe", {"smoothing_warmup_iters": 0, "queue_batch": 1, "queue_size": 100})):
    def dump(step, state, name=name):
        if step == 3:
            a = state["algorithm"]
            torch.save({"state": a.state_dict(), "init": a.init, "seen": a.seen}, out / f"{name}-rank{state['dist'].rank}.pt")
    fit(make_config(name, **tiny, **extra, run_dir=str(out / name)), callbacks=[dump])
torch.distributed.destroy_process_group()
'''


@pytest.mark.timeout(400)
def test_ddp_ranks_hold_identical_banks_and_queues(tmp_path):
    import os, subprocess, sys
    from pathlib import Path
    (tmp_path / "worker.py").write_text(_DDP_WORKER)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    r = subprocess.run([str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node=2", str(tmp_path / "worker.py"),
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=360)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("simmatch_probe", "comatch_probe"):
        r0, r1 = (torch.load(tmp_path / f"{name}-rank{i}.pt", weights_only=False) for i in range(2))
        for mod in r0["state"]:
            for k in r0["state"][mod]:
                assert torch.equal(r0["state"][mod][k], r1["state"][mod][k]), (name, mod, k)
        idx = torch.cat([i for rr in (r0, r1) for i, _ in rr["seen"]])
        ys = torch.cat([y for rr in (r0, r1) for _, y in rr["seen"]])
        assert not set(r0["seen"][0][0].tolist()) <= set(r1["seen"][0][0].tolist())   # the ranks saw different labels
        if name == "simmatch_probe":
            bank, init = r0["state"]["bank"]["bank"], r0["init"]["bank.bank"]
            changed = (bank != init).any(0).nonzero().flatten().tolist()
            assert changed == sorted(set(idx.tolist()))                    # both ranks' labeled samples, and only those
            lab = r0["state"]["bank"]["labels"]
            assert all(lab[i] == y for i, y in zip(idx.tolist(), ys.tolist()))
        else:
            q = r0["state"]["queue"]
            assert int(q["ptr"]) == 3 * (8 + 16)                              # global rows per step: B + mu*B
            onehot = (q["probs"][:72] == 1).any(1)
            assert int(onehot.sum()) == 24                                    # 4 labeled rows per rank per step
