"""ssl_nb.losses on hand-made logits: values, masks, normalisation and where the gradients go."""
import math
from collections import Counter

import pytest
import torch

from ssl_nb.core import ConfigError
from ssl_nb.losses import (FlexMatchThreshold, fixmatch_loss, kl_from_logits, low_confidence_kl, masked_kl,
                           refixmatch_loss, sequencematch_loss)

CONF = 12.0   # a logit gap that makes softmax confident (> 0.9999) for 3 classes


def onehot_logits(labels, C=3, gap=CONF):
    z = torch.zeros(len(labels), C)
    z[torch.arange(len(labels)), torch.tensor(labels)] = gap
    return z


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True)


# ---------------------------------------------------------------- FixMatch
def test_fixmatch_all_confident_is_mean_ce_to_argmax():
    zw = onehot_logits([0, 2, 1])
    zs = torch.randn(3, 3)
    loss, mask = fixmatch_loss(zw, zs)
    assert torch.equal(mask, torch.ones(3))
    expected = -zs.log_softmax(-1)[torch.arange(3), torch.tensor([0, 2, 1])].mean()
    torch.testing.assert_close(loss, expected)


def test_fixmatch_none_confident_is_zero_with_zero_gradient():
    zw = torch.zeros(4, 3)
    zs = torch.randn(4, 3, requires_grad=True)
    loss, mask = fixmatch_loss(zw, zs)
    assert loss.item() == 0 and mask.sum() == 0
    (g,) = grads(loss, zs)
    assert torch.equal(g, torch.zeros_like(g))


def test_fixmatch_gradient_only_to_strong_and_only_masked_rows():
    zw = torch.cat([onehot_logits([1]), torch.zeros(1, 3)]).requires_grad_()
    zs = torch.randn(2, 3, requires_grad=True)
    loss, _ = fixmatch_loss(zw, zs)
    gw, gs = grads(loss, zw, zs)
    assert gw is None
    assert gs[0].abs().sum() > 0 and torch.equal(gs[1], torch.zeros(3))
    # d/dz of CE(z, y)/n = (softmax(z) - onehot(y)) / n, with n = 2 rows
    torch.testing.assert_close(gs[0], (zs[0].softmax(-1) - torch.tensor([0., 1, 0])) / 2)


def test_fixmatch_mean_over_all_rows():
    zw, zs = onehot_logits([0, 1]), torch.randn(2, 3)
    loss, _ = fixmatch_loss(zw, zs)
    loss2, _ = fixmatch_loss(torch.cat([zw, torch.zeros(2, 3)]), torch.cat([zs, torch.randn(2, 3)]))
    torch.testing.assert_close(loss2, loss / 2)     # two masked-out rows double the denominator


def test_fixmatch_external_mask_overrides_threshold():
    zw, zs = torch.zeros(2, 3), torch.randn(2, 3)
    loss, mask = fixmatch_loss(zw, zs, mask=torch.tensor([1., 0.]))
    assert torch.equal(mask, torch.tensor([1., 0.]))
    torch.testing.assert_close(loss, -zs.log_softmax(-1)[0, 0] / 2)   # argmax of uniform is class 0


def test_fixmatch_threshold_boundary_is_inclusive():
    zw = torch.tensor([[math.log(3.0), 0.0]])        # softmax = [0.75, 0.25]
    assert fixmatch_loss(zw, zw, threshold=0.75)[1].item() == 1.0
    assert fixmatch_loss(zw, zw, threshold=0.76)[1].item() == 0.0


def test_bf16_logits_are_computed_in_fp32():
    zw, zs = torch.randn(8, 10) * 4, torch.randn(8, 10)
    lb, _ = fixmatch_loss(zw.bfloat16(), zs.bfloat16(), threshold=0.5)
    lf, _ = fixmatch_loss(zw.bfloat16().float(), zs.bfloat16().float(), threshold=0.5)
    assert lb.dtype == torch.float32
    torch.testing.assert_close(lb, lf)


@pytest.mark.parametrize("bad", [dict(logits_w=torch.zeros(3), logits_s=torch.zeros(3)),
                                 dict(logits_w=torch.zeros(2, 3), logits_s=torch.zeros(2, 4)),
                                 dict(logits_w=torch.zeros(2, 3, dtype=torch.long), logits_s=torch.zeros(2, 3))])
def test_bad_shapes_and_dtypes_are_config_errors(bad):
    with pytest.raises(ConfigError):
        fixmatch_loss(**bad)


# ---------------------------------------------------------------- ReFixMatch
def test_refixmatch_equals_fixmatch_when_all_confident():
    zw, zs = onehot_logits([2, 0, 1]), torch.randn(3, 3, requires_grad=True)
    a, _ = refixmatch_loss(zw, zs)
    b, _ = fixmatch_loss(zw, zs)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(grads(a, zs)[0], grads(b, zs)[0])


def test_refixmatch_none_confident_is_sharpened_kl():
    zw = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 0.0]])
    zs = torch.randn(2, 3)
    loss, mask = refixmatch_loss(zw, zs, T=0.5)
    assert mask.sum() == 0
    t = (zw / 0.5).softmax(-1)
    expected = (t * (t.log() - zs.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(loss, expected)


def test_refixmatch_each_row_in_exactly_one_branch():
    zw = torch.cat([onehot_logits([1]), torch.tensor([[0.3, 0.0, 0.1]])])
    zs = torch.randn(2, 3)
    loss, mask = refixmatch_loss(zw, zs)
    hi = fixmatch_loss(zw, zs)[0]
    lo = low_confidence_kl(zw, zs, mask, 0.5)
    torch.testing.assert_close(loss, hi + lo)
    # row 0 only in the CE branch, row 1 only in the KL branch
    torch.testing.assert_close(hi, -zs.log_softmax(-1)[0, 1] / 2)
    t = (zw[1] / 0.5).softmax(-1)
    torch.testing.assert_close(lo, (t * (t.log() - zs[1].log_softmax(-1))).sum() / 2)


def test_refixmatch_low_term_zero_when_student_matches_sharpened_target():
    zw = torch.tensor([[0.4, 0.1, -0.2]])
    zs = zw / 0.5 + 7.0                              # same softmax as zw / T
    loss, mask = refixmatch_loss(zw, zs, T=0.5)
    assert mask.item() == 0
    assert abs(loss.item()) < 1e-6


def test_refixmatch_no_gradient_to_weak():
    zw = torch.randn(4, 5, requires_grad=True)
    zs = torch.randn(4, 5, requires_grad=True)
    gw, gs = grads(refixmatch_loss(zw, zs)[0], zw, zs)
    assert gw is None and gs.abs().sum() > 0


# ---------------------------------------------------------------- SequenceMatch
def test_sequencematch_identical_views_T1_equals_fixmatch():
    z = torch.cat([onehot_logits([0, 2]), torch.randn(2, 3)])
    torch.testing.assert_close(sequencematch_loss(z, z, z, T=1.0)[0], fixmatch_loss(z, z)[0])


def test_sequencematch_hand_computed_terms():
    # weak confident on class 0, medium unconfident, strong uniform
    zw, zm, zs = onehot_logits([0]), torch.tensor([[0.5, 0.0, 0.0]]), torch.zeros(1, 3)
    loss, mask = sequencematch_loss(zw, zm, zs, T=0.5)
    tw = (zw / 0.5).softmax(-1)
    kl = lambda t, z: (t * (t.clamp_min(1e-30).log() - z.log_softmax(-1))).sum()
    expected = math.log(3) + kl(tw, zm) + 0.0 + kl(tw, zs)     # CE + KLD(m<-w) + KLD(s<-m)=0 (m unconfident) + KLD(s<-w)
    torch.testing.assert_close(loss, expected)
    assert mask.item() == 1


def test_sequencematch_mask_source_is_the_target_view():
    zw = onehot_logits([1, 1])
    zm = torch.zeros(2, 3)                            # medium unconfident
    zs = torch.randn(2, 3)
    assert masked_kl(zs, zm).item() == 0              # L_sm masked by the MEDIUM view's confidence
    assert masked_kl(zs, zw).item() > 0               # L_sw by the weak view's
    loss, _ = sequencematch_loss(zw, zm, zs)
    torch.testing.assert_close(loss, fixmatch_loss(zw, zs)[0] + masked_kl(zm, zw) + masked_kl(zs, zw))


def test_sequencematch_gradient_table():
    zw = onehot_logits([0, 1, 2]).requires_grad_()
    zm = (onehot_logits([0, 1, 0]) + torch.randn(3, 3)).requires_grad_()
    zs = torch.randn(3, 3, requires_grad=True)
    loss, _ = sequencematch_loss(zw, zm, zs)
    gw, gm, gs = grads(loss, zw, zm, zs)
    assert gw is None                                  # weak: teacher only
    torch.testing.assert_close(gm, grads(masked_kl(zm, zw), zm)[0])   # medium: student of weak only
    gs_ref = grads(fixmatch_loss(zw, zs)[0] + masked_kl(zs, zm) + masked_kl(zs, zw), zs)[0]
    torch.testing.assert_close(gs, gs_ref)


def test_sequencematch_mean_over_all_rows():
    zw, zm, zs = onehot_logits([0, 1]), onehot_logits([0, 1]), torch.randn(2, 3)
    a, _ = sequencematch_loss(zw, zm, zs)
    pad = torch.zeros(2, 3)                            # unconfident rows: masked out of every term
    b, _ = sequencematch_loss(torch.cat([zw, pad]), torch.cat([zm, pad]), torch.cat([zs, torch.randn(2, 3)]))
    torch.testing.assert_close(b, a / 2)


def test_kl_and_soft_ce_have_the_same_gradient():
    t = torch.tensor([[0.7, 0.2, 0.1]])
    z = torch.randn(1, 3, requires_grad=True)
    g_kl = grads(kl_from_logits(z, t).sum(), z)[0]
    g_ce = grads(-(t * z.log_softmax(-1)).sum(), z)[0]
    torch.testing.assert_close(g_kl, g_ce)


def test_sequencematch_low_conf_kl_adds_refixmatch_term():
    zw = torch.cat([onehot_logits([2]), torch.tensor([[0.2, 0.1, 0.0]])])
    zm, zs = torch.randn(2, 3), torch.randn(2, 3)
    a, mask = sequencematch_loss(zw, zm, zs, low_conf_kl=True)
    b, _ = sequencematch_loss(zw, zm, zs)
    torch.testing.assert_close(a - b, low_confidence_kl(zw, zs, mask, 0.5))
    assert (a - b).item() > 0


def test_sequencematch_external_mask_only_changes_ce_term():
    zw, zm, zs = torch.zeros(2, 3), torch.zeros(2, 3), torch.randn(2, 3)
    flexmask = torch.tensor([1.0, 1.0])
    loss, mask = sequencematch_loss(zw, zm, zs, mask=flexmask)
    assert torch.equal(mask, flexmask)
    torch.testing.assert_close(loss, fixmatch_loss(zw, zs, mask=flexmask)[0])   # KL terms stay masked by fixed tau


# ---------------------------------------------------------------- FlexMatch
def usb_flexmatch_reference(selected, probs, idx, tau, num_classes, warmup):
    """USB's FlexMatchThresholdingHook with Python Counters (the host-syncing original), for comparison."""
    counter = Counter(selected.tolist())
    acc = torch.zeros(num_classes)
    if max(counter.values()) < len(selected):
        denom = max(counter.values()) if warmup else max(v for k, v in counter.items() if k != -1)
        for c in range(num_classes): acc[c] = counter[c] / denom
    return acc


def test_flexmatch_threshold_is_zero_at_start_of_warmup():
    flex = FlexMatchThreshold(num_unlabeled=100, num_classes=10)
    uniform = torch.full((5, 10), 0.1)
    assert torch.equal(flex(uniform, torch.arange(5)), torch.ones(5))
    assert torch.equal(flex.classwise_acc, torch.zeros(10))     # nothing recorded: beta stays 0


@pytest.mark.parametrize("warmup", [True, False])
def test_flexmatch_matches_usb_counter_reference_over_many_steps(warmup):
    g = torch.Generator().manual_seed(0)
    N, C, tau = 30, 4, 0.6
    flex = FlexMatchThreshold(N, C, tau, warmup)
    sel = torch.full((N,), -1)
    acc = torch.zeros(C)
    for _ in range(25):
        idx = torch.randperm(N, generator=g)[:6]
        probs = (torch.randn(6, C, generator=g) * 2).softmax(-1)
        conf, lab = probs.max(-1)
        expected_mask = (conf >= tau * acc[lab] / (2 - acc[lab])).float()     # beta BEFORE this batch's update
        assert torch.equal(flex(probs, idx), expected_mask)
        sel[idx[conf >= tau]] = lab[conf >= tau]
        acc = usb_flexmatch_reference(sel, probs, idx, tau, C, warmup) if Counter(sel.tolist()).most_common(1)[0][1] < N else acc
        assert torch.equal(flex.selected_label, sel)
        torch.testing.assert_close(flex.classwise_acc, acc)


def test_flexmatch_state_survives_state_dict_round_trip():
    a = FlexMatchThreshold(10, 3)
    a(torch.tensor([[0.99, 0.005, 0.005]]), torch.tensor([4]))
    b = FlexMatchThreshold(10, 3)
    b.load_state_dict(a.state_dict())
    probs, idx = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.7, 0.1]]), torch.tensor([1, 2])
    assert torch.equal(a(probs, idx), b(probs, idx))
    assert torch.equal(a.selected_label, b.selected_label)


def test_flexmatch_bad_input():
    flex = FlexMatchThreshold(10, 3)
    with pytest.raises(ConfigError, match="expects probs"):
        flex(torch.rand(2, 4), torch.arange(2))
    with pytest.raises(ConfigError, match="threshold"):
        FlexMatchThreshold(10, 3, threshold=1.5)


# ---------------------------------------------------------------- self-supervised and distillation losses
import torch.nn.functional as F  # noqa: E402
from ssl_nb.losses import embedding_distill_loss, moco_loss, moco_v3_loss, seed_loss  # noqa: E402


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_moco_loss_equals_the_reference_formula():
    q, k, Q = torch.randn(7, 32), torch.randn(7, 32), unit(50, 32)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    pos, neg = (qn * kn).sum(1, keepdim=True), qn @ Q.T                 # builder.py: einsum('nc,nc->n'), ('nc,ck->nk')
    ref = F.cross_entropy(torch.cat([pos, neg], 1) / 0.07, torch.zeros(7, dtype=torch.long))
    torch.testing.assert_close(moco_loss(q, k, Q, T=0.07), ref)


def test_moco_v3_loss_with_gathered_keys_equals_the_local_one_when_the_others_are_orthogonal():
    q = torch.eye(8)[:4] * 5                                            # 4 local queries
    k_all = torch.cat([torch.eye(8)[4:], torch.eye(8)[:4]])             # rank 1 of 2: own keys at rows 4..7
    torch.testing.assert_close(moco_v3_loss(q, k_all, 0.2, offset=4),
                               2 * 0.2 * F.cross_entropy(torch.eye(4, 8) / 0.2, torch.arange(4)))


def test_embedding_distill_loss_range_cross_view_and_autocast():
    B = 16
    sq, sk, tq, tk = (torch.randn(B, 8) for _ in range(4))
    loss = embedding_distill_loss(sq, sk, tq, tk)
    assert 0 <= loss <= 8 * B
    n = lambda t: F.normalize(t, dim=1)
    cross = embedding_distill_loss(sq, sq, tq, tk)                       # Retro's code: the query view in both terms
    torch.testing.assert_close(cross, ((n(tq) - n(sq)) ** 2).sum() + ((n(tk) - n(sq)) ** 2).sum())
    torch.testing.assert_close(embedding_distill_loss(sq, sk, tq, tk, "mean") * B, loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = embedding_distill_loss(sq.bfloat16(), sk.bfloat16(), tq, tk)
    assert out.dtype == torch.float32


def test_seed_loss_targets_and_gradients():
    s, t, D = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True), unit(40, 16)
    tn = F.normalize(t.detach(), dim=1)
    zt = torch.cat([(tn * tn).sum(1, keepdim=True), tn @ D.T], 1) / 0.5
    sn = F.normalize(s, dim=1)
    zs = torch.cat([(sn * tn).sum(1, keepdim=True), sn @ D.T], 1) / 0.3
    ref = -(zt.softmax(1) * zs.log_softmax(1)).sum(1).mean()
    loss = seed_loss(s, t, D, T_s=0.3, T_t=0.5)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ConfigError, match="queue"):
        seed_loss(s, t, D.T)


def test_queue_losses_survive_an_in_place_enqueue_before_backward():
    "MoCo enqueues the keys after the loss and before backward; the losses keep their own copy of the queue."
    for loss_fn in (moco_loss, seed_loss):
        q, k, Q = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8), unit(16, 8)
        loss = loss_fn(q, k, Q)
        expected = torch.autograd.grad(loss_fn(q, k, Q.clone()), q)[0]
        Q[:4] = F.normalize(k, dim=1)                                     # the in-place push
        loss.backward()
        torch.testing.assert_close(q.grad, expected)
