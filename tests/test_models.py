"Tests of `ssl_nb.models` that notebooks express badly: every registered model, parameter-count formulas, checkpoints."
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_nb.core import CheckpointError, ConfigError, atomic_save
from ssl_nb.models import (MODELS, EnsembleProjector, ModelWithProjector, TimmModel, WideResNet, create,
                           load_weights, no_weight_decay_names, param_groups)

torch.set_num_threads(2)


def n_params(model): return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Parameter counts, derived from the structure of the source code (TorchSSL models/nets/wrn{,_var}.py, USB
# semilearn/nets/wrn/wrn{,_var}.py, torchvision's ResNet-50, USB's/timm's ViT), independently of ssl_nb's code.

def wrn_formula(depth, widen, num_classes, groups=3, in_chans=3, conv_bias=True):
    "Stem conv, `groups` groups of (depth-4)/6 pre-activation blocks, final BN, linear classifier."
    n, b = (depth - 4) // 6, int(conv_bias)
    widths = [16] + [16 * widen * 2**g for g in range(groups)]
    total = in_chans * 16 * 9 + b * 16
    for g in range(groups):
        for i in range(n):
            cin, cout = (widths[g] if i == 0 else widths[g + 1]), widths[g + 1]
            total += 2 * cin + 9 * cin * cout + b * cout          # bn1, conv1
            total += 2 * cout + 9 * cout * cout + b * cout        # bn2, conv2
            if cin != cout: total += cin * cout + b * cout        # 1x1 shortcut conv
    return total + 2 * widths[-1] + widths[-1] * num_classes + num_classes


def resnet50_formula(num_classes, in_chans=3):
    total, inp = in_chans * 64 * 49 + 2 * 64, 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for i in range(blocks):
            total += inp * planes + 9 * planes * planes + 4 * planes * planes + 2 * (planes + planes + 4 * planes)
            if i == 0: total += inp * 4 * planes + 2 * 4 * planes     # downsample conv + BN
            inp = 4 * planes
    return total + 2048 * num_classes + num_classes


def vit_formula(dim, depth, patch, img, num_classes, in_chans=3):
    tokens = (img // patch) ** 2 + 1
    per_block = 2 * dim + 3 * dim * dim + 3 * dim + dim * dim + dim + 2 * dim + 4 * dim * dim + 4 * dim + 4 * dim * dim + dim
    return (in_chans * patch * patch * dim + dim) + dim + tokens * dim + depth * per_block + 2 * dim \
        + dim * num_classes + num_classes


def test_wrn_28_2_counts():
    assert n_params(create("wrn_28_2", 10)) == wrn_formula(28, 2, 10) == 1_469_642       # TorchSSL, USB's current wrn.py
    # FixMatch's TF model and its PyTorch ports have no conv biases: the 1,467,610 usually quoted for WRN-28-2
    assert n_params(create("wrn_28_2", 10, conv_bias=False)) == wrn_formula(28, 2, 10, conv_bias=False) == 1_467_610


@pytest.mark.parametrize("name,num_classes,kw,formula", [
    ("wrn_28_8", 100, {}, dict(depth=28, widen=8)),
    ("wrn_28_8", 10, {"conv_bias": False}, dict(depth=28, widen=8, conv_bias=False)),
    ("wrn_37_2", 10, {}, dict(depth=28, widen=2, groups=4)),
    ("wrn_37_2", 10, {"conv_bias": False}, dict(depth=28, widen=2, groups=4, conv_bias=False)),
    ("wrn_10_2", 10, {"in_chans": 1}, dict(depth=10, widen=2, in_chans=1)),
])
def test_wrn_counts_match_formula(name, num_classes, kw, formula):
    assert n_params(create(name, num_classes, **kw)) == wrn_formula(num_classes=num_classes, **formula)


def test_wrn_37_2_and_28_8_known_values():
    # derived from the source's structure with the formula above (and checked against semilearn 0.3.2, whose
    # bias-free blocks give 5,929,450 for wrn_var_37_2 and 23,401,028 for wrn_28_8 with 100 classes)
    assert wrn_formula(28, 2, 10, groups=4) == 5_933_770
    assert wrn_formula(28, 2, 10, groups=4, conv_bias=False) + 16 == 5_929_450     # 0.3.2 keeps the stem bias
    assert wrn_formula(28, 8, 100, conv_bias=False) + 16 == 23_401_028


def test_timm_counts_match_formula():
    assert n_params(create("resnet50", 1000)) == resnet50_formula(1000) == 25_557_032     # torchvision's count
    assert n_params(create("vit_tiny_patch2_32", 10)) == vit_formula(192, 12, 2, 32, 10)
    assert n_params(create("vit_small_patch2_32", 100)) == vit_formula(384, 12, 2, 32, 100)
    assert n_params(create("vit_small_patch16_224", 1000)) == vit_formula(384, 12, 16, 224, 1000) == 22_050_664
    assert n_params(create("vit_base_patch16_224", 10)) == vit_formula(768, 12, 16, 224, 10)


# ---------------------------------------------------------------------------------------------------------------------
# Every registered model at its natural input size

NATURAL = {  # name: (input shape without batch, num_features)
    "wrn_28_2": ((3, 32, 32), 128), "wrn_28_8": ((3, 32, 32), 512), "wrn_37_2": ((3, 96, 96), 256),
    "wrn_10_2": ((1, 28, 28), 128), "resnet50": ((3, 224, 224), 2048),
    "vit_tiny_patch2_32": ((3, 32, 32), 192), "vit_small_patch2_32": ((3, 32, 32), 384),
    "vit_small_patch16_224": ((3, 224, 224), 384), "vit_base_patch16_224": ((3, 224, 224), 768),
}


def test_registry_is_covered():
    assert set(MODELS.names()) == set(NATURAL)


@pytest.mark.parametrize("name", sorted(NATURAL))
def test_shapes_features_and_memory_format(name):
    shape, d = NATURAL[name]
    torch.manual_seed(0)
    model = create(name, 7, in_chans=shape[0]).eval()
    assert isinstance(model, WideResNet if name.startswith("wrn") else TimmModel)
    assert model.num_features == d and isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (d, 7)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        assert logits.shape == (2, 7) and feats.shape == (2, d)
        torch.testing.assert_close(model(x), logits)
        torch.testing.assert_close(model.features(x), feats)
        torch.testing.assert_close(model.classifier(feats), logits)
        cl = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[0], logits[1])                   # the two images give different outputs


def test_channels_last_model_and_bf16_autocast():
    model = create("wrn_28_2", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model_cl(x.contiguous(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


# ---------------------------------------------------------------------------------------------------------------------
# WRN details: BN hyper-parameters, init, the two shortcut conventions

def test_bn_momentum_and_eps():
    for name in ("wrn_28_2", "wrn_37_2", "wrn_10_2"):
        bns = [m for m in create(name, 10).modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(m.momentum == 0.001 and m.eps == 0.001 for m in bns)
    bns = [m for m in create("wrn_10_2", 10, bn_momentum=0.1).modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 and m.eps == 0.001 for m in bns)
    # momentum as PyTorch defines it: running = (1 - 0.001) * running + 0.001 * batch statistic
    model, seen = create("wrn_10_2", 10, in_chans=1).train(), []
    model.bn1.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    model(torch.randn(8, 1, 28, 28) * 3 + 5)
    batch_mean = seen[0].mean(dim=(0, 2, 3))
    assert batch_mean.abs().max() > 0.1
    torch.testing.assert_close(model.bn1.running_mean, 0.001 * batch_mean)


def test_wrn_init():
    torch.manual_seed(0)
    model = create("wrn_28_8", 100)
    w = model.block3.layer[1].conv2.weight                       # 512 -> 512, 3x3: fan_out = 512 * 9
    assert abs(w.std().item() / math.sqrt(2 / (512 * 9)) - 1) < 0.02
    c = model.classifier.weight                                  # xavier normal: std = sqrt(2 / (512 + 100))
    assert abs(c.std().item() / math.sqrt(2 / 612) - 1) < 0.05
    assert torch.count_nonzero(model.classifier.bias) == 0
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    act = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert act and all(m.negative_slope == 0.1 for m in act)


def test_wrn_structure():
    model = create("wrn_37_2", 10)
    assert [len(getattr(model, f"block{g}").layer) for g in range(1, 5)] == [4, 4, 4, 4]
    assert model.block1.layer[0].conv1.stride == (2, 2) and model.block2.layer[0].conv1.stride == (2, 2)
    assert [getattr(model, f"block{g}").layer[0].conv2.out_channels for g in range(1, 5)] == [32, 64, 128, 256]
    assert model.block1.layer[1].convShortcut is None and model.block1.layer[0].convShortcut.kernel_size == (1, 1)
    assert create("wrn_28_2", 10).block1.layer[0].conv1.stride == (1, 1)
    with pytest.raises(ConfigError, match="multiple of 6"): WideResNet(depth=20)
    with pytest.raises(ConfigError, match="first_group"): WideResNet(activate_before_residual="some")


@pytest.mark.parametrize("abr,bn1_used", [("first_group", False), ("all", True)])
def test_shortcut_conventions(abr, bn1_used):
    model = create("wrn_10_2", 10, activate_before_residual=abr)
    model(torch.randn(4, 3, 32, 32)).square().sum().backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    expected = set() if bn1_used else {f"block{g}.layer.0.bn1.{w}" for g in (2, 3) for w in ("weight", "bias")}
    assert unused == expected


# ---------------------------------------------------------------------------------------------------------------------
# Weight decay

def test_no_weight_decay_wrn():
    model = create("wrn_28_2", 10)
    names = no_weight_decay_names(model)
    assert names == {n for n, _ in model.named_parameters() if "bn" in n or "bias" in n}
    assert {n for n, p in model.named_parameters() if p.ndim > 1}.isdisjoint(names)
    assert "bn1.weight" in names and "block1.layer.0.convShortcut.bias" in names and "classifier.weight" not in names
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_no_weight_decay_timm():
    names = no_weight_decay_names(create("resnet50", 10))
    assert "trunk.layer1.0.downsample.1.weight" in names          # a BN that the 'bn' rule misses
    assert "trunk.layer1.0.downsample.0.weight" not in names and "trunk.conv1.weight" not in names
    names = no_weight_decay_names(create("vit_tiny_patch2_32", 10))
    assert {"trunk.pos_embed", "trunk.cls_token", "trunk.blocks.0.norm1.weight", "trunk.norm.bias"} <= names
    assert "trunk.blocks.0.attn.qkv.weight" not in names and "classifier.weight" not in names


def test_frozen_params_left_out_of_groups():
    model = create("wrn_10_2", 10)
    model.conv1.requires_grad_(False)
    ids = {id(p) for g in param_groups(model, 1e-4) for p in g["params"]}
    assert id(model.conv1.weight) not in ids and id(model.classifier.weight) in ids


# ---------------------------------------------------------------------------------------------------------------------
# create() and checkpoints

def test_unknown_name_lists_known_models():
    with pytest.raises(ConfigError, match="Known models:.*vit_base_patch16_224.*wrn_10_2"): create("wrn_16_4", 10)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="positive int"): create("wrn_10_2", 0)
    with pytest.raises(ConfigError, match="does not take"): create("wrn_10_2", 10, widen=3)
    with pytest.raises(ConfigError, match="does not take"): create("vit_tiny_patch2_32", 10, not_an_arg=1)
    with pytest.raises(ConfigError, match="checkpoint=<local file>"): create("resnet50", 10, pretrained=True)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_round_trip_and_prefixes(tmp_path):
    torch.manual_seed(0)
    src = create("wrn_10_2", 10, in_chans=1)
    src(torch.randn(4, 1, 28, 28))                                # move the BN statistics away from their init
    sd = src.state_dict()
    variants = {
        "plain": sd,
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "compiled_ddp": {f"module._orig_mod.{k}": v for k, v in sd.items()},
        "model_entry": {"model": {f"model.{k}": v for k, v in sd.items()}, "step": 5},
        "state_dict_entry": {"state_dict": sd, "epoch": 1},
        "ema_entry": {"ema": sd},
        "torchssl_fc": {("fc." + k[len("classifier."):] if k.startswith("classifier.") else k): v for k, v in sd.items()},
    }
    x = torch.randn(2, 1, 28, 28)
    for what, ckpt in variants.items():
        path = atomic_save(ckpt, tmp_path / f"{what}.pt")
        dst = create("wrn_10_2", 10, in_chans=1, checkpoint=path)
        assert _same(src, dst), what
        torch.testing.assert_close(dst.eval()(x), src.eval()(x))


def test_checkpoint_key_selection(tmp_path):
    a, b = create("wrn_10_2", 10), create("wrn_10_2", 10)
    path = atomic_save({"model": a.state_dict(), "ema": b.state_dict()}, tmp_path / "last.pt")
    assert _same(create("wrn_10_2", 10, checkpoint=path), a)                         # 'model' comes first
    assert _same(create("wrn_10_2", 10, checkpoint=path, checkpoint_key="ema"), b)
    with pytest.raises(CheckpointError, match="no 'ema_model' entry"):
        create("wrn_10_2", 10, checkpoint=path, checkpoint_key="ema_model")


def test_other_num_classes_keeps_classifier_init(tmp_path):
    src = create("wrn_10_2", 10)
    path = atomic_save(src.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(1)
    dst = create("wrn_10_2", 3)
    init = dst.classifier.weight.detach().clone()
    result = load_weights(dst, path)
    assert result.missing_keys == ["classifier.weight", "classifier.bias"]
    assert result.ignored_keys == ["classifier.weight", "classifier.bias"]
    assert torch.equal(dst.classifier.weight, init) and torch.equal(dst.conv1.weight, src.conv1.weight)
    # a checkpoint without any classifier (a bare trunk) loads too
    trunk_only = {k: v for k, v in src.state_dict().items() if not k.startswith("classifier.")}
    assert load_weights(create("wrn_10_2", 10), trunk_only).missing_keys == ["classifier.weight", "classifier.bias"]


def test_wrong_keys_raise(tmp_path):
    sd = create("wrn_10_2", 10).state_dict()
    renamed = {k.replace("block2.", "stage2."): v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"missing trunk keys \(\d+\): block2\.layer\.0\.bn1\.weight"):
        create("wrn_10_2", 10, checkpoint=renamed)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): stage2\.layer"):
        create("wrn_10_2", 10, checkpoint=renamed)
    extra = {**sd, "block9.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="unexpected keys .*block9.weight"): create("wrn_10_2", 10, checkpoint=extra)
    with pytest.raises(CheckpointError, match=r"block1\.layer\.0\.conv1\.weight: checkpoint \(32, 16, 3, 3\) vs model \(64,"):
        load_weights(WideResNet(depth=10, widen_factor=4, num_classes=10), sd)
    with pytest.raises(CheckpointError, match="shape mismatches"): create("wrn_28_2", 10, checkpoint=create("wrn_28_8", 10).state_dict())
    with pytest.raises(CheckpointError, match="missing trunk keys"): create("wrn_28_2", 10, checkpoint=sd)


def test_corrupt_missing_and_non_state_dict(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x00not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"): create("wrn_10_2", 10, checkpoint=path)
    with pytest.raises(CheckpointError, match="No checkpoint"): create("wrn_10_2", 10, checkpoint=tmp_path / "none.pt")
    path = atomic_save({"step": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="No state dict"): create("wrn_10_2", 10, checkpoint=path)


def test_pretrained_with_checkpoint_loads(tmp_path):
    src = create("wrn_10_2", 10)
    path = atomic_save(src.state_dict(), tmp_path / "w.pt")
    assert _same(create("wrn_10_2", 10, pretrained=True, checkpoint=path), src)


def test_bare_timm_checkpoint_loads_into_adapter():
    import timm
    torch.manual_seed(0)
    bare = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=2)
    model = create("vit_tiny_patch2_32", 5, checkpoint={f"module.{k}": v for k, v in bare.state_dict().items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(model.eval()(x), bare.eval()(x))    # `head` became `classifier`
    with pytest.raises(CheckpointError, match="trunk.pos_embed: checkpoint"):             # 224 px weights, 32 px model
        create("vit_tiny_patch2_32", 5, checkpoint=timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict())


def test_projector_checkpoint_into_backbone():
    mp = ModelWithProjector(create("wrn_10_2", 10), EnsembleProjector(128, 64))
    sd = {f"module.{k}": v for k, v in mp.state_dict().items()}
    bare = create("wrn_10_2", 10)
    result = load_weights(bare, sd)
    assert _same(bare, mp.backbone) and result.missing_keys == []
    assert len(result.ignored_keys) == 12 and all(".projector." in k for k in result.ignored_keys)
    again = ModelWithProjector(create("wrn_10_2", 10), EnsembleProjector(128, 64))
    load_weights(again, sd)
    assert _same(again, mp)


# ---------------------------------------------------------------------------------------------------------------------
# EnsembleProjector (spec §5.2, §5.6 tests 1-3)

def l2norm(x): return x / x.norm(dim=1, keepdim=True)


def test_single_projector_is_the_baseline():
    torch.manual_seed(0)
    proj, h = EnsembleProjector(32, 16, num_projectors=1), torch.randn(5, 32)
    head = proj.projectors[0]
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (32, 32, 16)
    torch.testing.assert_close(proj(h), l2norm(head(h)))


def test_identical_heads_equal_single_head():
    torch.manual_seed(0)
    proj, h = EnsembleProjector(32, 16, num_projectors=3), torch.randn(5, 32)
    for head in proj.projectors[1:]: head.load_state_dict(proj.projectors[0].state_dict())
    torch.testing.assert_close(proj(h), l2norm(proj.projectors[0](h)))


def test_unit_norm_rows():
    proj = EnsembleProjector(32, 16)
    torch.testing.assert_close(proj(torch.randn(9, 32) * 50).norm(dim=1), torch.ones(9))


def test_mean_before_normalisation():
    torch.manual_seed(0)
    proj, h = EnsembleProjector(32, 16, num_projectors=3), torch.randn(5, 32)
    with torch.no_grad(): proj.projectors[2][2].weight.mul_(10); proj.projectors[2][2].bias.mul_(10)
    raw = torch.stack([head(h) for head in proj.projectors])
    cos = F.cosine_similarity(raw[0], raw[1], dim=1)
    assert (cos.abs() < 0.99).all()                                         # the head outputs are not collinear
    out = proj(h)
    torch.testing.assert_close(out, l2norm(raw.mean(0)))
    unit = raw / raw.norm(dim=2, keepdim=True)
    wrong = l2norm(unit.mean(0))                                            # the mean of normalised outputs
    assert (out - wrong).abs().max() > 0.05


def test_heads_are_independent_and_all_get_gradients():
    proj = EnsembleProjector(32, 16, num_projectors=3)
    ptrs = [{p.data_ptr() for p in head.parameters()} for head in proj.projectors]
    assert all(ptrs[i].isdisjoint(ptrs[j]) for i in range(3) for j in range(i + 1, 3))
    assert len(list(proj.parameters())) == 12
    before = [head(torch.ones(1, 32)).detach() for head in proj.projectors]
    with torch.no_grad(): proj.projectors[0][0].weight.add_(1.0)
    assert torch.equal(proj.projectors[1](torch.ones(1, 32)), before[1])
    (proj(torch.randn(6, 32)) * torch.randn(6, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


def test_projector_bf16_autocast_gives_fp32_unit_vectors():
    proj = EnsembleProjector(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16): out = proj(torch.randn(4, 32))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_num_projectors_validated():
    with pytest.raises(ConfigError, match="num_projectors"): EnsembleProjector(8, 4, num_projectors=0)


# ---------------------------------------------------------------------------------------------------------------------
# ModelWithProjector

@pytest.mark.parametrize("name,shape", [("wrn_10_2", (1, 28, 28)), ("vit_tiny_patch2_32", (3, 32, 32))])
def test_model_with_projector(name, shape):
    torch.manual_seed(0)
    backbone = create(name, 10, in_chans=shape[0])
    model = ModelWithProjector(backbone, EnsembleProjector(backbone.num_features, 64)).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        logits, emb = model(x, return_features=True)
        torch.testing.assert_close(logits, backbone(x))
        torch.testing.assert_close(model(x), logits)
        torch.testing.assert_close(emb, model.projector(backbone.features(x)))
        torch.testing.assert_close(model.classifier(model.features(x)), logits)
    assert emb.shape == (3, 64) and model.num_features == backbone.num_features
    assert model.classifier is backbone.classifier
    assert set(model.state_dict()) == {f"backbone.{k}" for k in backbone.state_dict()} | \
        {f"projector.{k}" for k in model.projector.state_dict()}


def test_model_with_projector_gradients_reach_backbone_and_heads():
    backbone = create("wrn_10_2", 10, in_chans=1, activate_before_residual="all")
    model = ModelWithProjector(backbone, EnsembleProjector(backbone.num_features, 32))
    logits, emb = model(torch.randn(4, 1, 28, 28), return_features=True)
    (logits.logsumexp(1).sum() + (emb * torch.randn_like(emb)).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
