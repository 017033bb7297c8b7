"""ssl_nb.retro (spec §C.10): adapter shapes and parameter counts, the shared frozen head, the mean student's EMA,
one distillation step (what moves and what must not), the code's cross-view term, linear evaluation."""
import copy

import pytest
import torch

from ssl_nb.core import ConfigError
from ssl_nb.mocov2 import MoCoQueue, MoCoV2, build_encoder
from ssl_nb.retro import (DisCoStudent, LinearEval, RetroStudent, StudentBackbone, build_disco_student,
                          build_retro_student, build_teacher, disco_head, distill_step, make_adapter,
                          make_mean_student, param_counts, update_mean_student)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def cpu_setup(seed=0, bn_train=False):
    torch.manual_seed(seed)
    teacher = build_teacher("cifar_resnet18_w32", in_chans=1, bn_train=bn_train)
    student = build_retro_student("cifar_resnet10_w16", teacher.head, in_chans=1)
    return teacher, student, make_mean_student(student), MoCoQueue(64, 128)


def views(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 28, 28, generator=g), torch.randn(b, 1, 28, 28, generator=g)


@pytest.mark.parametrize("s_n,kind,expected", [(1280, "ir", 8_557_056), (512, "ir", 2_638_848),
                                               (512, "simkd", 12_066_816)])
def test_adapter_parameter_counts_and_shapes(s_n, kind, expected):
    a = make_adapter(s_n, 2048, 2, kind)
    assert n_params(a) == expected
    a.eval()
    for h in (1, 7):
        assert a(torch.randn(2, s_n, h, h)).shape == (2, 2048, h, h)


def test_disco_head_count_and_unknown_options():
    assert n_params(disco_head(1280, 2048, 128)) == 2_885_760
    with pytest.raises(ConfigError, match="simkd"):
        make_adapter(512, kind="mlp")
    with pytest.raises(ConfigError, match="timm activation"):
        make_adapter(512, act="no_such_act")
    with pytest.raises(ConfigError, match="Unknown student"):
        StudentBackbone("efficientnet_b7")


@pytest.mark.parametrize("name,s_n,hw", [("efficientnet_b0", 1280, 2), ("mobilenetv3_large_100", 1280, 1),
                                         ("resnet18", 512, 2), ("resnet34", 512, 2)])
def test_timm_students_return_feature_maps_before_pooling(name, s_n, hw):
    b = StudentBackbone(name).eval()
    assert b(torch.randn(1, 3, 64, 64)).shape == (1, s_n, hw, hw) and b.num_features == s_n


def test_retro_student_reuses_the_teachers_head_object():
    teacher, student, mean, _ = cpu_setup()
    assert student.head is teacher.head is mean.head
    assert not any(p.requires_grad for p in student.head.parameters())
    trainable = {n.split(".")[0] for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "adapter"}
    x, _ = views(4)
    assert student.features(x).shape == (4, 256) and student(x).shape == (4, 128)
    torch.testing.assert_close(student.embed(x).norm(dim=1), torch.ones(4))


def test_one_step_moves_backbone_and_adapter_only():
    teacher, student, mean, queue = cpu_setup()
    t0, h0, a0, b0 = snapshot(teacher), snapshot(teacher.head), snapshot(student.adapter), snapshot(student.backbone)
    mb0 = snapshot(mean.backbone)
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    xq, xk = views()
    out = distill_step(xq, xk, student.train(), mean.train(), teacher.train(), queue, m=0.99)
    opt.zero_grad(); out["loss"].backward(); opt.step()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items())      # teacher, BN buffers included
    assert all(torch.equal(v, teacher.head.state_dict()[k]) for k, v in h0.items())
    assert all(p.grad is None for p in teacher.parameters())
    changed = lambda before, m: [k for k, v in m.state_dict().items() if k.endswith("weight") and not torch.equal(v, before[k])]
    assert set(changed(a0, student.adapter)) == {k for k in a0 if k.endswith("weight")}
    assert len(changed(b0, student.backbone)) == len([k for k in b0 if k.endswith("weight")])
    for k, p in mean.backbone.named_parameters():     # the EMA ran before the step, on equal weights: unchanged
        torch.testing.assert_close(p.detach(), mb0[k], rtol=1e-6, atol=1e-7)
    assert torch.equal(queue.queue[:16], out["k"]) and int(queue.ptr) == 16


def test_teacher_bn_train_reproduces_the_codes_drifting_statistics():
    teacher, student, mean, queue = cpu_setup(bn_train=True)
    rm = teacher.encoder.backbone.bn1.running_mean.clone()
    distill_step(*views(), student.train(), mean.train(), teacher.train(), queue)
    assert teacher.encoder.training and not torch.equal(rm, teacher.encoder.backbone.bn1.running_mean)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_ema_touches_the_backbone_only():
    _, student, mean, _ = cpu_setup()
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad: p.add_(0.5)
    a = snapshot(student.adapter); mb = snapshot(mean.backbone)
    update_mean_student(mean, student, 0.9)
    assert all(torch.equal(v, student.adapter.state_dict()[k]) for k, v in a.items())
    for (k, p), s in zip(mean.backbone.named_parameters(), student.backbone.parameters()):
        torch.testing.assert_close(p, 0.9 * mb[k] + 0.1 * s.detach())
    bn = "trunk.bn1.running_mean"
    assert torch.equal(mean.backbone.state_dict()[bn], mb[bn])                      # buffers: not averaged
    disco = build_disco_student("cifar_resnet10_w16", hidden=64, dim=32, in_chans=1)
    dmean = make_mean_student(disco)
    assert isinstance(dmean, DisCoStudent) and dmean.head is not disco.head
    with pytest.raises(ConfigError, match="RetroStudent or a DisCoStudent"):
        make_mean_student(torch.nn.Linear(2, 2))


def test_consistency_term_default_and_cross_view():
    teacher, student, mean, queue = cpu_setup()
    student.eval(); mean.eval()                       # eval mode: the reference recomputation sees the same BN
    xq, xk = views()
    q, sk, tq, tk = student(xq), student(xk), teacher(xq), teacher(xk)
    per_view = distill_step(xq, xk, student, mean, teacher, queue, cons_reduction="sum")["l_cons"]
    torch.testing.assert_close(per_view, ((tq - q) ** 2).sum() + ((tk - sk) ** 2).sum())
    cross = distill_step(xq, xk, student, mean, teacher, queue, cross_view=True, cons_reduction="mean")["l_cons"]
    torch.testing.assert_close(cross, (((tq - q) ** 2).sum() + ((tk - q) ** 2).sum()) / 16)
    with pytest.raises(ConfigError, match="cons_reduction"):
        distill_step(xq, xk, student, mean, teacher, queue, cons_reduction="none")


def test_student_alone_and_disco_steps():
    torch.manual_seed(0)
    teacher = build_teacher("cifar_resnet18_w32", dim=32, in_chans=1)
    disco = build_disco_student("cifar_resnet10_w16", hidden=64, dim=32, in_chans=1)
    mean, queue = make_mean_student(disco), MoCoQueue(32, 32)
    xq, xk = views(8)
    alone = distill_step(xq, xk, disco, mean, None, queue)
    assert alone["l_cons"] == 0 and alone["loss"].requires_grad
    out = distill_step(xq, xk, disco, mean, teacher, queue)
    out["loss"].backward()
    assert all(p.grad is not None for p in disco.parameters()) and out["l_cons"] > 0
    with pytest.raises(ConfigError, match="multiple of the global batch"):
        distill_step(*views(5), disco, mean, teacher, queue)


def test_linear_eval_has_exactly_two_trainable_tensors_and_a_frozen_trunk():
    teacher, student, _, _ = cpu_setup()
    lin = LinearEval(student, num_classes=10)
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    lin.train()
    assert not lin.student.training and not lin.student.adapter.training
    before = snapshot(lin.student)
    opt = torch.optim.SGD([p for p in lin.parameters() if p.requires_grad], lr=1.0, momentum=0.9)
    x, _ = views(8)
    logits, feats = lin(x, return_features=True)
    torch.nn.functional.cross_entropy(logits, torch.arange(8) % 10).backward(); opt.step()
    assert feats.shape == (8, 256) and all(torch.equal(v, lin.student.state_dict()[k]) for k, v in before.items())
    with torch.device("meta"):
        big = LinearEval(build_retro_student("efficientnet_b0", build_teacher("resnet50").head), 1000)
    assert big.num_features == 2048 and sum(p.requires_grad for p in big.parameters()) == 2
    disco = build_disco_student("cifar_resnet10_w16", hidden=64, in_chans=1)
    assert LinearEval(disco, 10).num_features == 128


def test_param_counts_of_the_reference_students():
    with torch.device("meta"):
        teacher = build_teacher("resnet50")
        retro = param_counts(build_retro_student("efficientnet_b0", teacher.head))
        disco = param_counts(build_disco_student("efficientnet_b0"))
    assert retro["adapter"] == 8_557_056 and retro["head"] == 4_458_624
    assert retro["trainable"] == retro["deployed"] == retro["backbone"] + 8_557_056
    assert disco["head"] == 2_885_760 and disco["deployed"] == disco["backbone"] == retro["backbone"]


def test_teacher_from_a_workbook_mocov2_checkpoint(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("cifar_resnet18_w32", in_chans=1)
    path = tmp_path / "last.pt"
    torch.save({"model": MoCoV2(enc, K=64).state_dict()}, path)
    teacher = build_teacher("cifar_resnet18_w32", checkpoint=path, in_chans=1)
    assert teacher.encoder.load_report.source == "workbook"
    x, _ = views(4)
    torch.testing.assert_close(teacher(x), enc.eval().embed(x))
