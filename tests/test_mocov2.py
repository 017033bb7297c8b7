"""ssl_nb.mocov2: torchvision-layout trunks, the MoCo-v2 head, the queue, the momentum encoder and checkpoint loading
(official MoCo-v2 layout made from torchvision's ResNet, the workbook's own layout, and the errors)."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from ssl_nb.core import CheckpointError, ConfigError
from ssl_nb.losses import moco_loss
from ssl_nb.mocov2 import (MoCoEncoder, MoCoQueue, MoCoV2, build_encoder, create_trunk, encoder_state_dict,
                           load_encoder, momentum_update, mocov2_head)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def official_checkpoint(tv: nn.Module, K=32):
    "A MoCo-v2 checkpoint as `main_moco.py` saves it (DDP prefix, encoder_k copy, queue [dim, K], queue_ptr)."
    sd = {f"module.encoder_q.{k}": v for k, v in tv.state_dict().items()}
    sd |= {f"module.encoder_k.{k}": v.clone() for k, v in tv.state_dict().items()}
    sd |= {"module.queue": torch.randn(128, K), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    return {"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}}}


def moco_resnet18():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=128)
    tv.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), tv.fc)
    return tv.eval()


@pytest.mark.parametrize("arch,expected", [("resnet50", 23_508_032), ("resnet101", 42_500_160),
                                           ("resnet152", 58_143_808)])
def test_teacher_trunks_have_torchvisions_parameter_counts(arch, expected):
    with torch.device("meta"):
        trunk, ref = create_trunk(arch), getattr(torchvision.models, arch)()
    assert n_params(trunk) == expected == n_params(ref) - n_params(ref.fc)
    assert trunk.num_features == 2048
    ref.fc = nn.Identity()
    assert list(trunk.state_dict()) == list(ref.state_dict())


def test_cpu_teacher_is_wider_and_deeper_than_the_cpu_student():
    t, s = create_trunk("cifar_resnet18_w32", in_chans=1), create_trunk("cifar_resnet10_w16", in_chans=1)
    assert n_params(t) > 8 * n_params(s)
    x = torch.randn(2, 1, 28, 28)
    assert t.forward_features(x).shape == (2, 256, 4, 4) and s.forward_features(x).shape == (2, 128, 4, 4)
    assert t(torch.randn(2, 1, 32, 32)).shape == (2, 256)


def test_head_parameter_count_and_encoder_outputs():
    assert n_params(mocov2_head(2048, 128)) == 4_458_624
    enc = build_encoder("cifar_resnet10_w16", dim=32, in_chans=1)
    x = torch.randn(3, 1, 28, 28)
    assert enc.features(x).shape == (3, 128) and enc(x).shape == (3, 32)
    torch.testing.assert_close(enc.embed(x).norm(dim=1), torch.ones(3))


def test_queue_wraps_and_rejects_batches_that_do_not_divide_K():
    q = MoCoQueue(12, 4)
    keys = [torch.full((4, 4), float(i)) for i in range(5)]
    for i, k in enumerate(keys):
        q.push(k)
        assert int(q.ptr) == 4 * (i + 1) % 12
    assert torch.equal(q.queue, torch.cat([keys[3], keys[4], keys[2]]))      # the two oldest batches overwritten
    with pytest.raises(ConfigError, match="multiple of the global batch 5"):
        q.push(torch.zeros(5, 4))
    with pytest.raises(ConfigError, match=r"keys \[B, 4\]"):
        q.push(torch.zeros(4, 3))
    r = MoCoQueue(12, 4)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.queue, q.queue) and torch.equal(r.ptr, q.ptr)


def test_momentum_update_formula_skips_shared_tensors_and_buffers():
    src = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    dst = copy.deepcopy(src)
    with torch.no_grad():
        for p in src.parameters(): p.add_(torch.randn_like(p))
    src[1].running_mean.fill_(5.0)
    before = {k: v.detach().clone() for k, v in dst.state_dict().items()}
    momentum_update(dst, src, 0.99)
    for (k, p), s in zip(dst.named_parameters(), src.parameters()):
        torch.testing.assert_close(p.detach(), 0.99 * before[k] + 0.01 * s.detach())
    assert torch.equal(dst[1].running_mean, before["1.running_mean"])
    shared = nn.Module(); shared.a = src[0]; shared.b = nn.Linear(2, 2)
    copy_ = nn.Module(); copy_.a = src[0]; copy_.b = copy.deepcopy(shared.b)
    w = src[0].weight.detach().clone()
    momentum_update(copy_, shared, 0.0)
    assert torch.equal(src[0].weight.detach(), w)
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        momentum_update(dst, src, 1.5)


def test_mocov2_step_gradients_reach_the_query_encoder_only():
    torch.manual_seed(0)
    model = MoCoV2(build_encoder("cifar_resnet10_w16", dim=16, in_chans=1), K=16, m=0.9, shuffle_groups=2)
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    xq, xk = torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28)
    q, k = model(xq, xk, torch.Generator().manual_seed(0))
    loss = moco_loss(q, k, model.queue.queue, 0.2)
    loss.backward()
    model.queue.push(k)
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert int(model.queue.ptr) == 8 and torch.equal(model.queue.queue[:8], k)
    # keys came from the encoder after the momentum update (0.9 old + 0.1 query), with identical weights at the start
    for p, b, s in zip(model.encoder_k.parameters(), k_before, model.encoder_q.parameters()):
        torch.testing.assert_close(p, 0.9 * b + 0.1 * s.detach())
    with pytest.raises(ConfigError, match="shuffle_groups"):
        model.keys(torch.randn(7, 1, 28, 28))


def test_official_moco_checkpoint_loads_and_reports(tmp_path):
    tv = moco_resnet18()
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save(official_checkpoint(tv), path)
    enc = build_encoder("resnet18", checkpoint=path).eval()
    rep = enc.load_report
    assert rep.source == "moco" and rep.loaded == len(tv.state_dict())
    assert rep.dropped == {"encoder_k": len(tv.state_dict()), "queue": 2}
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(enc(x), tv(x))
    assert enc.head[0].weight.data_ptr() != tv.fc[0].weight.data_ptr()       # copied, not aliased


def test_workbook_and_bare_encoder_checkpoints_load(tmp_path):
    enc = build_encoder("cifar_resnet10_w16", dim=16, in_chans=1).eval()
    model = MoCoV2(enc, K=32)
    x = torch.randn(2, 1, 28, 28)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "step": 10}, path)
    for ckpt, source in ((path, "workbook"), (enc.state_dict(), "encoder")):
        out = build_encoder("cifar_resnet10_w16", dim=16, in_chans=1, checkpoint=ckpt).eval()
        assert out.load_report.source == source
        torch.testing.assert_close(out(x), enc(x))
    m = encoder_state_dict({"model": model.state_dict()})
    assert m.source == "workbook" and set(m.dropped) == {"encoder_k", "queue"} and set(m.state_dict) == set(enc.state_dict())
    assert m.origin["head.0.weight"] == "encoder_q.head.0.weight"


def test_checkpoint_errors_are_clear():
    ckpt = official_checkpoint(moco_resnet18())
    with pytest.raises(CheckpointError, match="build it with arch='resnet18'"):
        build_encoder("resnet50", checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="missing keys .*unexpected keys|another architecture"):
        load_encoder(build_encoder("resnet34"), ckpt)                       # no `arch` check without the argument
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_encoder(build_encoder("resnet18", in_chans=1), ckpt)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): module.encoder_q.predictor.weight"):
        load_encoder(build_encoder("resnet18"), {**ckpt["state_dict"], "module.encoder_q.predictor.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="No checkpoint at"):
        build_encoder("resnet18", checkpoint="/nonexistent/moco.pth.tar")
    sd = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith("num_batches_tracked")}   # older files
    rep = load_encoder(build_encoder("resnet18"), sd)
    assert rep.dropped["num_batches_tracked (kept as initialised)"] == 20
