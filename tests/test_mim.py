"""Tests of `ssl_nb.mim` that notebooks express badly: matrices of grids and ratios, exact equivalences with MAE's
formulation and timm's ViT, parameter counts from the layer definitions, checkpoint fixtures in tmp_path."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import ssl_nb.kernels
from ssl_nb.core import CheckpointError, ConfigError
from ssl_nb.mim import (MIM_MODELS, MAEDecoder, MaskedAutoencoder, SimMIM, SimMIMEncoder, ViTEncoder, checkerboard,
                        checkerboard_count, checkerboard_masking, create_encoder, create_mae, create_simmim,
                        interpolate_pos_embed, load_mim_checkpoint, mask_to_ids, masked_image, mim_config,
                        mocov3_predictor, mocov3_projector, patchify, random_masking, show_masks,
                        show_reconstruction, simmim_l1_loss, simmim_masking, sincos_pos_embed, unpatchify)

torch.set_num_threads(2)


def n_params(m): return sum(p.numel() for p in m.parameters())
def gen(seed=0): return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# SymMIM's checkerboards (spec A.2 table, A.9 tests 1-2)

def test_spec_table_14x14():
    M1, M2 = checkerboard(14, 14), checkerboard(14, 14, k=2)
    assert [int(checkerboard(14, 14, 1, ph).sum()) for ph in (0, 1)] == [98, 98]
    assert [int(checkerboard(14, 14, 2, ph).sum()) for ph in (0, 1)] == [96, 100]
    assert torch.equal(M1.flip(1), ~M1) and torch.equal(M2.flip(1), M2)           # horizontal flip
    assert torch.equal(M1.flip(0), ~M1) and torch.equal(M2.flip(0), M2)           # vertical flip, same story
    assert torch.equal(M1.rot90(2), M1) and torch.equal(M2.rot90(2), M2)          # 180 degrees
    assert not (M1[1:] & M1[:-1]).any() and not (M1[:, 1:] & M1[:, :-1]).any()   # no masked 4-neighbours
    assert [int((M1 & checkerboard(14, 14, 2, ph)).sum()) for ph in (0, 1)] == [48, 50]
    assert int(M2.reshape(7, 2, 7, 2).all(dim=(1, 3)).sum()) == 24                # 24 of 49 cells


def test_formula_by_hand():
    i, j = torch.meshgrid(torch.arange(6), torch.arange(10), indexing="ij")
    for k in (1, 2, 3):
        for ph in (0, 1):
            assert torch.equal(checkerboard(6, 10, k, ph), ((i // k + j // k + ph) % 2) == 1)


@pytest.mark.parametrize("g,k", [(4, 1), (4, 2), (8, 1), (8, 2), (8, 4), (16, 1), (16, 2), (16, 4), (16, 8)])
def test_even_grids_split_in_half(g, k):
    for ph in (0, 1): assert int(checkerboard(g, g, k, ph).sum()) == g * g // 2


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (7, 7), (14, 14), (6, 9)])
def test_host_count_equals_mask(h, w):
    for k in (1, 2, 3):
        for ph in (0, 1):
            for off in [(a, b) for a in range(k) for b in range(k)]:
                assert checkerboard_count(h, w, k, ph, off) == int(checkerboard(h, w, k, ph, off).sum())


def test_checkerboard_rejects_bad_arguments():
    for kw, msg in [(dict(phase=2), "phase"), (dict(phase=True), "phase"), (dict(k=0), "k must be"),
                    (dict(k=2, offset=(2, 0)), "offset"), (dict(k=1, offset=(0,)), "offset")]:
        with pytest.raises(ConfigError, match=msg): checkerboard(4, 4, **kw)


def test_per_sample_phases():
    ms = checkerboard_masking(256, 8, 8, generator=gen(0))
    assert ms.ids_keep.shape == (256, 32) and ms.ids_keep.dtype == torch.int64 and ms.mask.dtype == torch.bool
    ph0 = ms.mask[:, 1]                                                            # (0, 1) is masked in phase 0
    assert 96 < int(ph0.sum()) < 160                                               # Bernoulli(0.5)
    assert torch.equal(ms.mask[ph0], checkerboard(8, 8).flatten().expand(int(ph0.sum()), 64))
    assert torch.equal(ms.mask[~ph0], checkerboard(8, 8, phase=1).flatten().expand(int((~ph0).sum()), 64))
    assert not ms.mask.gather(1, ms.ids_keep).any()                                # keep-ids are visible ...
    assert (ms.ids_keep.diff(dim=1) > 0).all()                                     # ... distinct, in order
    assert torch.equal(checkerboard_masking(256, 8, 8, generator=gen(0)).ids_keep, ms.ids_keep)
    assert not torch.equal(checkerboard_masking(256, 8, 8, generator=gen(1)).mask, ms.mask)


def test_per_batch_and_fixed():
    seen = set()
    for s in range(12):
        ms = checkerboard_masking(3, 14, 14, k=2, phase_mode="per_batch", generator=gen(s))
        c = int(ms.mask[0].sum()); seen.add(c)
        assert (ms.mask == ms.mask[0]).all() and ms.ids_keep.shape == (3, 196 - c)
        assert torch.equal(ms.mask[0].reshape(14, 14), checkerboard(14, 14, 2, int(c == 100)))
    assert seen == {96, 100}
    torch.manual_seed(0)                                                           # no generator: default CPU RNG
    assert checkerboard_masking(2, 14, 14, k=2, phase_mode="per_batch").ids_keep.shape[0] == 2
    ms = checkerboard_masking(5, 14, 14, k=2, phase_mode="fixed", phase=1)
    assert ms.mask.sum(1).tolist() == [100] * 5 and ms.ids_keep.shape == (5, 96)
    ms.mask[0, 0] = True                                                           # a real tensor, not a view


def test_ragged_and_bad_modes_raise():
    with pytest.raises(ConfigError, match="per_batch"): checkerboard_masking(4, 14, 14, k=2)
    with pytest.raises(ConfigError, match="per_batch"): checkerboard_masking(4, 7, 7, k=1)   # 24 vs 25
    with pytest.raises(ConfigError, match="phase_mode must be"): checkerboard_masking(4, 8, 8, phase_mode="random")
    with pytest.raises(ConfigError, match="random_offset"):
        checkerboard_masking(4, 8, 8, k=2, phase_mode="fixed", random_offset=True)
    with pytest.raises(ConfigError, match="B must be"): checkerboard_masking(0, 8, 8)


def test_random_offset():
    ms = checkerboard_masking(400, 8, 8, k=2, random_offset=True, generator=gen(0))
    variants = {tuple(r.tolist()) for r in ms.mask}
    expected = {tuple(checkerboard(8, 8, 2, ph, (a, b)).flatten().tolist()) for ph in (0, 1) for a in (0, 1) for b in (0, 1)}
    assert variants == expected and len(expected) == 8
    assert checkerboard_masking(4, 8, 8, k=1, random_offset=True, generator=gen(0)).ids_keep.shape == (4, 32)
    with pytest.raises(ConfigError, match="per_batch"):                           # offsets on 14x14 change the count
        checkerboard_masking(4, 14, 14, k=2, random_offset=True, phase_mode="per_sample", generator=gen(0))


# ---------------------------------------------------------------------------------------------------------------------
# MAE's random masking, SimMIM's blocks

@pytest.mark.parametrize("N,ratio,K", [(196, 0.75, 49), (196, 0.9, 19), (196, 0.5, 98), (64, 0.75, 16), (64, 0.9, 6),
                                       (64, 0.5, 32), (64, 0.0, 64)])
def test_random_masking_counts(N, ratio, K):
    ms = random_masking(7, N, ratio, generator=gen(0))
    assert ms.ids_keep.shape == (7, K) and K == int(N * (1 - ratio))
    assert ms.mask.sum(1).tolist() == [N - K] * 7
    assert not ms.mask.gather(1, ms.ids_keep).any()
    assert (ms.ids_keep.sort(1).values.diff(1) > 0).all()


def test_random_masking_is_mae_and_deterministic():
    B, N, K = 6, 196, 49
    ms = random_masking(B, N, 0.75, generator=gen(5))
    noise = torch.rand(B, N, generator=gen(5))
    ids_shuffle = torch.argsort(noise, dim=1); ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, N); mask[:, :K] = 0
    assert torch.equal(ms.mask, torch.gather(mask, 1, ids_restore).bool())
    assert torch.equal(ms.ids_keep, ids_shuffle[:, :K])
    assert torch.equal(random_masking(B, N, 0.75, generator=gen(5)).ids_keep, ms.ids_keep)
    assert len({tuple(r.tolist()) for r in ms.ids_keep}) == B                      # per-sample masks


def test_random_masking_rejects():
    for r in (1.0, -0.1, "0.5", True):
        with pytest.raises(ConfigError, match="mask_ratio"): random_masking(2, 64, r)
    with pytest.raises(ConfigError, match="keeps no patch"): random_masking(2, 4, 0.8)


@pytest.mark.parametrize("size,p,mp,ratio,masked", [(224, 16, 32, 0.6, 120), (32, 4, 8, 0.6, 40), (192, 16, 32, 0.6, 88),
                                                    ((32, 64), 4, 8, 0.5, 64), (224, 16, 16, 0.6, 118)])
def test_simmim_counts(size, p, mp, ratio, masked):
    ms = simmim_masking(5, size, p, mp, ratio, generator=gen(0))
    H, W = (size, size) if isinstance(size, int) else size
    N, s = (H // p) * (W // p), mp // p
    assert ms.mask.sum(1).tolist() == [masked] * 5 and ms.ids_keep.shape == (5, N - masked)
    g = ms.mask.reshape(5, H // mp, s, W // mp, s)
    assert torch.equal(g.all(dim=(2, 4)), g.any(dim=(2, 4)))
    assert not ms.mask.gather(1, ms.ids_keep).any()
    assert torch.equal(simmim_masking(5, size, p, mp, ratio, generator=gen(0)).mask, ms.mask)


def test_mask_to_ids():
    m = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    assert mask_to_ids(m, 3).tolist() == [[1, 3, 4], [0, 1, 4]]
    assert mask_to_ids(~m, 2).tolist() == [[0, 2], [2, 3]]                          # the masked ids
    assert checkerboard_count(6, 6, 2, 0, [1, 0]) == checkerboard_count(6, 6, 2, 0, (1, 0))


# ---------------------------------------------------------------------------------------------------------------------
# Patches, gather/scatter, positions

def test_patchify_is_the_kernel_reference_and_mae_order():
    assert patchify is ssl_nb.kernels.patchify
    x = torch.randn(2, 3, 8, 12)
    p, out = 4, patchify(x, 4)
    for n in range(6):
        i, j = divmod(n, 3)
        ref = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(0, 2, 3, 1).reshape(2, -1)   # (row, col, c)
        assert torch.equal(out[:, n], ref)


@pytest.mark.parametrize("C,H,W,p", [(1, 32, 32, 4), (3, 224, 224, 16), (2, 8, 12, 4), (3, 6, 6, 1)])
def test_unpatchify_roundtrip(C, H, W, p):
    x = torch.randn(2, C, H, W)
    assert torch.equal(unpatchify(patchify(x, p), p, (H, W)), x)
    if H == W: assert torch.equal(unpatchify(patchify(x, p), p), x)


def test_unpatchify_rejects():
    with pytest.raises(ConfigError, match="size"): unpatchify(torch.zeros(1, 6, 4), 2)
    with pytest.raises(ConfigError, match="does not give"): unpatchify(torch.zeros(1, 6, 4), 2, (4, 4))
    with pytest.raises(ConfigError, match=r"p\*p\*C"): unpatchify(torch.zeros(1, 4, 6), 2)


@pytest.mark.parametrize("masker", ["checker", "random", "simmim"])
def test_gather_scatter_roundtrip(masker):
    B, N, D = 4, 64, 6
    ms = {"checker": lambda: checkerboard_masking(B, 8, 8, generator=gen(0)),
          "random": lambda: random_masking(B, N, 0.75, generator=gen(0)),
          "simmim": lambda: simmim_masking(B, 32, 4, 8, generator=gen(0))}[masker]()
    x = torch.randn(B, N, D)
    vis = ssl_nb.kernels.gather_tokens(x, ms.ids_keep)
    assert torch.equal(vis, torch.stack([x[b][~ms.mask[b]] for b in range(B)]) if masker != "random"
                       else torch.stack([x[b, ms.ids_keep[b]] for b in range(B)]))
    fill = torch.randn(D)
    back = ssl_nb.kernels.scatter_tokens(vis, ms.ids_keep, N, fill)
    assert torch.equal(back[~ms.mask], x[~ms.mask]) and torch.equal(back[ms.mask], fill.expand(int(ms.mask.sum()), D))


def test_sincos_matches_mae_numpy():
    np = pytest.importorskip("numpy")
    def one_d(d, pos):
        om = np.arange(d // 2, dtype=np.float32); om /= d / 2.; om = 1. / 10000 ** om
        out = np.einsum("m,d->md", pos.reshape(-1), om)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    for D, g in [(768, 14), (64, 8), (96, 8)]:
        grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), 0).reshape(2, 1, g, g)
        ref = np.concatenate([np.zeros([1, D]), np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], 1)], 0)
        torch.testing.assert_close(sincos_pos_embed(D, g, cls_token=True), torch.from_numpy(ref).float(), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="multiple of 4"): sincos_pos_embed(6, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Encoder, decoder, models

def tiny_encoder(cls=ViTEncoder, **kw):
    torch.manual_seed(0)
    return cls(**{**dict(img_size=32, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=4), **kw}).eval()


def test_visible_tokens_equal_full_encoder_when_nothing_is_masked():
    enc, x = tiny_encoder(), torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        full = enc(x)
        ids = torch.arange(64).expand(3, 64)
        torch.testing.assert_close(enc.forward_visible(x, ids), full, atol=1e-5, rtol=1e-5)
        perm = torch.stack([torch.randperm(64, generator=gen(b)) for b in range(3)])
        vis = enc.forward_visible(x, perm)
        torch.testing.assert_close(vis[:, 1:], full[:, 1:].gather(1, perm[..., None].expand(-1, -1, 32)), atol=1e-5, rtol=1e-5)


def test_encoder_sees_only_visible_pixels():
    enc = tiny_encoder()
    ms = random_masking(2, 64, 0.75, generator=gen(0))
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    enc.forward_visible(x, ms.ids_keep).square().sum().backward()
    g = patchify(x.grad, 4).abs().sum(-1)                                          # [B, N] gradient per patch
    assert (g[ms.mask] == 0).all() and (g[~ms.mask] > 0).all()


def test_depth0_encoder_input_is_the_gathered_tokens():
    enc = tiny_encoder(depth=0)
    x, ids = torch.randn(2, 1, 32, 32), random_masking(2, 64, 0.5, generator=gen(0)).ids_keep
    tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
    ref = enc.norm(torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1),
                              tokens.gather(1, ids[..., None].expand(-1, -1, 32))], 1))
    torch.testing.assert_close(enc.forward_visible(x, ids), ref)


def test_encoder_init_and_frozen_positions():
    enc = ViTEncoder(img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=2, num_heads=4)
    assert not enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed[0], sincos_pos_embed(64, 8, cls_token=True))
    for name, m in enc.named_modules():
        if isinstance(m, torch.nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound, name
            assert not m.bias.any(), name
    w = enc.patch_embed.proj.weight
    assert w.abs().max() <= math.sqrt(6 / (64 + 3 * 16))
    assert 0.01 < enc.cls_token.std() < 0.03


def test_features_pools():
    enc, x = tiny_encoder(), torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        lat = enc(x)
        torch.testing.assert_close(enc.features(x), lat[:, 0])
        enc.pool = "mean"; torch.testing.assert_close(enc.features(x), lat[:, 1:].mean(1))
    assert enc.num_features == 32
    with pytest.raises(ConfigError, match="pool"): tiny_encoder(pool="max")


def test_decoder_places_tokens_at_their_slots():
    torch.manual_seed(0)
    dec = MAEDecoder(8, 4, 1, embed_dim=32, decoder_embed_dim=16, decoder_depth=0, decoder_num_heads=2)
    ids = random_masking(1, 64, 0.75, generator=gen(0)).ids_keep
    lat = torch.randn(1, 17, 32)
    base = dec(lat, ids)
    lat2 = lat.clone(); lat2[0, 5] += 1.0                                          # token k = 4 moves only its slot
    changed = (dec(lat2, ids) - base).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [int(ids[0, 4])]
    masked = torch.ones(64, dtype=torch.bool); masked[ids[0]] = False
    e = dec.embed(lat)[0, 1:]
    tokens = torch.where(masked[:, None], dec.mask_token[0, 0], torch.zeros(64, 16).index_copy(0, ids[0], e))
    torch.testing.assert_close(base[0], dec.pred(dec.norm(tokens + dec.pos_embed[0, 1:])))


def test_mae_loss_ignores_visible_predictions():
    mae = MaskedAutoencoder(tiny_encoder(), MAEDecoder(8, 4, 1, 32, 16, 1, 2))
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    ms = random_masking(2, 64, 0.75, generator=gen(0))
    out = mae(x, *ms)
    pred = out.pred.detach().requires_grad_()
    loss = ssl_nb.kernels.masked_patch_mse(pred, x, ms.mask, 4)
    torch.testing.assert_close(loss, out.loss)
    loss.backward()
    assert (pred.grad[~ms.mask] == 0).all() and (pred.grad[ms.mask] != 0).any()
    other = torch.where(ms.mask[..., None], pred.detach(), 100 * torch.randn_like(pred))
    torch.testing.assert_close(ssl_nb.kernels.masked_patch_mse(other, x, ms.mask, 4), loss.detach())
    out.loss.backward()
    g = patchify(x.grad, 4).abs().sum(-1)                                          # target is detached; the encoder
    assert (g[ms.mask] == 0).all() and (g[~ms.mask] > 0).all()                     # reads visible pixels only
    raw = ssl_nb.kernels.masked_patch_mse(pred.detach(), x, ms.mask, 4, norm_pix=False)
    ref = ((pred.detach() - patchify(x.detach(), 4)) ** 2).mean(-1)[ms.mask].mean()
    torch.testing.assert_close(raw, ref)


def test_mae_decoder_grid_must_match():
    with pytest.raises(ConfigError, match="grid"): MaskedAutoencoder(tiny_encoder(), MAEDecoder(7, 4, 1, 32, 16, 1, 2))


def test_simmim_loss_and_encoder():
    sim = SimMIM(tiny_encoder(SimMIMEncoder, in_chans=3))
    x = torch.randn(2, 3, 32, 32)
    ms = simmim_masking(2, 32, 4, 8, generator=gen(0))
    out = sim(x, ms.mask)
    mpix = ms.mask.reshape(2, 8, 8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    ref = (F.l1_loss(x, unpatchify(out.pred, 4), reduction="none") * mpix).sum() / (mpix.sum() + 1e-5) / 3
    torch.testing.assert_close(out.loss, ref)
    other = torch.where(ms.mask[..., None], out.pred, torch.randn_like(out.pred))
    torch.testing.assert_close(simmim_l1_loss(other, x, ms.mask, 4), out.loss)
    xg = x.clone().requires_grad_()
    sim.encoder.forward_masked(xg, ms.mask).sum().backward()
    g = patchify(xg.grad, 4).abs().sum(-1)
    assert (g[ms.mask] == 0).all() and (g[~ms.mask] > 0).all()
    out.loss.backward()
    assert sim.encoder.mask_token.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="must be"): simmim_l1_loss(out.pred[:, :10], x, ms.mask, 4)


def test_bf16_autocast_runs():
    mae = create_mae(depth=1, decoder_depth=1)
    ms = checkerboard_masking(2, 8, 8, generator=gen(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mae(torch.randn(2, 1, 32, 32), *ms)
    assert out.pred.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_mocov3_heads():
    with torch.device("meta"):
        assert n_params(mocov3_projector(768)) == 768 * 4096 + 2 * 4096 + 4096 * 4096 + 2 * 4096 + 4096 * 256
        assert n_params(mocov3_predictor()) == 256 * 4096 + 2 * 4096 + 4096 * 256
        assert n_params(mocov3_projector(1024)) == 1024 * 4096 + 2 * 4096 + 4096 * 4096 + 2 * 4096 + 4096 * 256
    proj = mocov3_projector(16, 32, 8)
    assert all(m.bias is None for m in proj if isinstance(m, torch.nn.Linear))
    assert proj[-1].affine is False and isinstance(mocov3_predictor(8, 32)[-1], torch.nn.BatchNorm1d)
    z = proj.train()(torch.randn(32, 16))
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)        # last BN, no affine


# ---------------------------------------------------------------------------------------------------------------------
# Registry and parameter counts

def block_params(D, mlp=4): return 2 * D + 3 * D * D + 3 * D + D * D + D + 2 * D + mlp * D * D + mlp * D + mlp * D * D + D


def encoder_formula(D, depth, p=16, C=3, N=196):
    return C * p * p * D + D + D + (1 + N) * D + depth * block_params(D) + 2 * D


def decoder_formula(D, Dd=512, depth=8, p=16, C=3, N=196):
    return D * Dd + Dd + Dd + (1 + N) * Dd + depth * block_params(Dd) + 2 * Dd + Dd * p * p * C + p * p * C


def test_registry_parameter_counts():
    import timm
    assert set(MIM_MODELS.names()) == {"vit_micro_patch4_32", "vit_base_patch16_224", "vit_large_patch16_224"}
    with torch.device("meta"):
        for name, D, depth, n_enc in [("vit_base_patch16_224", 768, 12, 85_798_656), ("vit_large_patch16_224", 1024, 24, 303_301_632)]:
            mae = create_mae(name)
            assert n_params(mae.encoder) == n_enc == encoder_formula(D, depth)
            assert n_enc == n_params(timm.create_model(name, pretrained=False, num_classes=0))
            assert n_params(mae.decoder) == decoder_formula(D)
        assert n_params(create_mae("vit_base_patch16_224")) == 111_907_840
        assert n_params(create_simmim("vit_base_patch16_224")) == 85_798_656 + 768 + 768 * 768 + 768
    cfg = mim_config()
    assert (cfg.grid_size, cfg.k, cfg.in_chans) == ((8, 8), 2, 1)
    mae = create_mae()
    assert n_params(mae.encoder) == encoder_formula(96, 4, p=4, C=1, N=64)
    assert n_params(mae.decoder) == decoder_formula(96, 64, 2, p=4, C=1, N=64)


@pytest.mark.parametrize("in_chans", [1, 2])
def test_cpu_default_runs(in_chans):
    mae, sim = create_mae(in_chans=in_chans), create_simmim(in_chans=in_chans)
    x = torch.randn(4, in_chans, 32, 32)
    ms = checkerboard_masking(4, 8, 8, generator=gen(0))
    out = mae(x, *ms)
    assert out.pred.shape == (4, 64, 16 * in_chans) and out.latent.shape == (4, 33, 96)
    out.loss.backward()
    assert mae.encoder.cls_token.grad is not None and mae.decoder.mask_token.grad is not None
    assert sim(x, ms.mask).latent.shape == (4, 65, 96)
    assert mae.features(x).shape == (4, 96) and mae.num_features == sim.num_features == 96
    assert create_encoder(encoder_style="simmim").mask_token.shape == (1, 1, 96)


def test_config_errors():
    with pytest.raises(ConfigError, match="Unknown MIMConfig"): mim_config(depht=2)
    with pytest.raises(ConfigError, match="Known MIM configurations"): mim_config("vit_huge_patch14_224")
    with pytest.raises(ConfigError, match="cell_size"): mim_config(cell_size=6)
    with pytest.raises(ConfigError, match="encoder_style"): create_encoder(encoder_style="beit")
    with pytest.raises(ConfigError, match="multiple of num_heads"): create_encoder(num_heads=5)


# ---------------------------------------------------------------------------------------------------------------------
# Local weights (spec E): fixtures are random state dicts with MAE's and timm's key names

def timm_vit(**kw):
    import timm
    torch.manual_seed(1)
    return timm.create_model("vit_base_patch16_224", pretrained=False, **{**dict(
        img_size=32, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=3, num_classes=10), **kw}).eval()


def to_mae_names(sd):
    "ssl_nb MaskedAutoencoder keys -> facebookresearch/mae `MaskedAutoencoderViT` keys (written out independently)."
    table = {"decoder.embed": "decoder_embed", "decoder.mask_token": "mask_token", "decoder.pos_embed": "decoder_pos_embed",
             "decoder.blocks": "decoder_blocks", "decoder.norm": "decoder_norm", "decoder.pred": "decoder_pred"}
    out = {}
    for k, v in sd.items():
        for a, b in table.items():
            if k == a or k.startswith(a + "."): k = b + k[len(a):]; break
        else: k = k.removeprefix("encoder.")
        out[k] = v
    return out


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_weights_give_timm_features(tmp_path, fmt):
    from safetensors.torch import save_file
    src, path = timm_vit(), tmp_path / f"vit.{fmt}"
    save_file(src.state_dict(), str(path)) if fmt == "safetensors" else torch.save(src.state_dict(), path)
    enc = create_encoder()
    r = load_mim_checkpoint(enc, path)
    assert sorted(r.ignored_keys) == ["head.bias", "head.weight"] and r.missing_keys == [] and r.resized == []
    assert len(r.loaded) == len(enc.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(enc.eval()(x), src.forward_features(x), atol=1e-5, rtol=1e-5)


def test_timm_rectangular_and_global_pool(tmp_path):
    src = timm_vit(img_size=(32, 48), in_chans=3)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "r.pth")
    enc = create_encoder(img_size=(32, 48), in_chans=3)
    load_mim_checkpoint(enc, tmp_path / "r.pth")
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad(): torch.testing.assert_close(enc.eval()(x), src.forward_features(x), atol=1e-5, rtol=1e-5)
    gp = timm_vit(global_pool="avg")                                               # fc_norm instead of norm
    torch.save(gp.state_dict(), tmp_path / "gp.pth")
    with pytest.raises(CheckpointError, match="fc_norm instead of norm"): load_mim_checkpoint(create_encoder(), tmp_path / "gp.pth")


def test_mae_full_checkpoint_roundtrip(tmp_path):
    src = create_mae()
    sd = to_mae_names(src.state_dict())
    assert {"mask_token", "decoder_pos_embed", "decoder_pred.weight", "cls_token", "norm.weight"} <= set(sd)
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}, "epoch": 799,
                "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75)}, tmp_path / "checkpoint-799.pth")
    dst = create_mae()
    r = load_mim_checkpoint(dst, tmp_path / "checkpoint-799.pth")
    assert r.missing_keys == [] and r.ignored_keys == [] and len(r.loaded) == len(src.state_dict())
    for k, v in src.state_dict().items(): assert torch.equal(dst.state_dict()[k], v), k
    x, ms = torch.randn(2, 1, 32, 32), checkerboard_masking(2, 8, 8, generator=gen(0))
    with torch.no_grad(): torch.testing.assert_close(dst(x, *ms).loss, src(x, *ms).loss)


def test_mae_encoder_only_and_into_other_models(tmp_path):
    src = create_mae()
    enc_sd = {k: v for k, v in to_mae_names(src.state_dict()).items() if not k.startswith("decoder_") and k != "mask_token"}
    torch.save({"model": enc_sd}, tmp_path / "mae_pretrain.pth")
    torch.save({"model": to_mae_names(src.state_dict())}, tmp_path / "mae_full.pth")
    r = load_mim_checkpoint(create_mae(), tmp_path / "mae_pretrain.pth")              # decoder left as initialised
    assert sorted(r.missing_keys) == sorted(f"decoder.{k}" for k in src.decoder.state_dict())
    enc = create_encoder()
    r = load_mim_checkpoint(enc, tmp_path / "mae_full.pth")                          # decoder in the file: left out
    assert r.missing_keys == [] and sorted(r.ignored_keys) == sorted(f"decoder.{k}" for k in src.decoder.state_dict())
    assert torch.equal(enc.blocks[0].attn.qkv.weight, src.encoder.blocks[0].attn.qkv.weight)
    sim = create_simmim()
    r = load_mim_checkpoint(sim, tmp_path / "mae_pretrain.pth")
    assert r.missing_keys == ["encoder.mask_token", "head.weight", "head.bias"]
    torch.save(sim.state_dict(), tmp_path / "simmim.pt")                             # ssl_nb's own names
    sim2 = create_simmim()
    r = load_mim_checkpoint(sim2, tmp_path / "simmim.pt")
    assert torch.equal(sim2.encoder.mask_token, sim.encoder.mask_token) and "head.weight" in r.ignored_keys
    torch.save(sim.encoder.state_dict(), tmp_path / "simmim_enc.pt")                  # bare SimMIM encoder
    r = load_mim_checkpoint(create_encoder(), tmp_path / "simmim_enc.pt")
    assert r.ignored_keys == ["mask_token"]


def test_checkpoint_errors(tmp_path):
    src = create_mae()
    sd = to_mae_names(src.state_dict())
    cases = {
        "partial_decoder.pth": ({k: v for k, v in sd.items() if not k.startswith("decoder_blocks.1.")}, "decoder keys"),
        "swin.pth": ({**sd, "blocks.0.attn.relative_position_bias_table": torch.zeros(3, 3)}, "have no place"),
        "deit.pth": ({**sd, "dist_token": torch.zeros(1, 1, 96)}, "another architecture"),
        "resnet.pth": ({"conv1.weight": torch.zeros(64, 3, 7, 7)}, "another architecture"),
        "nested.pth": ({"model": {"a": 1}}, "non-tensor"),
    }
    for name, (obj, msg) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=msg): load_mim_checkpoint(create_mae(), tmp_path / name)
    torch.save(sd, tmp_path / "ok.pth")
    with pytest.raises(CheckpointError, match="have no place"): load_mim_checkpoint(create_mae(depth=3), tmp_path / "ok.pth")
    with pytest.raises(CheckpointError, match="are not in"): load_mim_checkpoint(create_mae(depth=5), tmp_path / "ok.pth")
    with pytest.raises(CheckpointError, match="adapt_in_chans=True"): load_mim_checkpoint(create_mae(in_chans=3), tmp_path / "ok.pth")
    with pytest.raises(CheckpointError, match="never downloads"): load_mim_checkpoint(create_mae(), tmp_path / "none.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"): load_mim_checkpoint(create_mae(), tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="no 'ema' entry"): load_mim_checkpoint(create_mae(), tmp_path / "ok.pth", key="ema")
    with pytest.raises(ConfigError, match="ViTEncoder"): load_mim_checkpoint(torch.nn.Linear(2, 2), tmp_path / "ok.pth")
    m = create_mae(depth=5)                                                        # nothing loaded on failure
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError): load_mim_checkpoint(m, tmp_path / "ok.pth")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in snap.items())


def test_pos_embed_interpolation_and_channel_adaptation(tmp_path):
    src = create_encoder(in_chans=3)
    torch.save(src.state_dict(), tmp_path / "rgb.pth")
    big = create_encoder(img_size=48, in_chans=3)                                     # 8x8 -> 12x12 grid
    r = load_mim_checkpoint(big, tmp_path / "rgb.pth")
    assert r.resized == ["pos_embed"]
    grid = src.pos_embed[:, 1:].reshape(1, 8, 8, 96).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 144, 96)
    torch.testing.assert_close(big.pos_embed[:, 1:], ref); assert torch.equal(big.pos_embed[:, :1], src.pos_embed[:, :1])
    with pytest.raises(CheckpointError, match="pos_embed"):
        load_mim_checkpoint(create_encoder(img_size=48, in_chans=3), tmp_path / "rgb.pth", interpolate_pos=False)
    gray = create_encoder(in_chans=1)
    r = load_mim_checkpoint(gray, tmp_path / "rgb.pth", adapt_in_chans=True)
    assert r.resized == ["patch_embed.proj.weight"]
    torch.testing.assert_close(gray.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))
    torch.save(gray.state_dict(), tmp_path / "gray.pth")
    with pytest.raises(CheckpointError, match="RGB"):
        load_mim_checkpoint(create_encoder(in_chans=3), tmp_path / "gray.pth", adapt_in_chans=True)
    assert interpolate_pos_embed(src.pos_embed, 8).shape == (1, 65, 96)


def test_create_with_checkpoint(tmp_path):
    src = create_mae()
    torch.save({"model": to_mae_names(src.state_dict())}, tmp_path / "mae.pth")
    dst = create_mae(checkpoint=tmp_path / "mae.pth")
    assert torch.equal(dst.decoder.pred.weight, src.decoder.pred.weight)
    assert torch.equal(create_encoder(checkpoint=tmp_path / "mae.pth").norm.weight, src.encoder.norm.weight)
    compiled = torch.compile(create_mae())                                          # wrapper: loads into _orig_mod
    load_mim_checkpoint(compiled, tmp_path / "mae.pth")
    assert torch.equal(compiled._orig_mod.encoder.cls_token, src.encoder.cls_token)


# ---------------------------------------------------------------------------------------------------------------------
# Pictures

def test_masked_image_and_pictures():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    img = torch.rand(2, 1, 32, 32)
    ms = checkerboard_masking(2, 8, 8, phase_mode="fixed")
    mi = masked_image(img, ms.mask, 4, fill=0.25)
    pix = unpatchify(ms.mask.float()[..., None].expand(-1, -1, 16), 4).bool()
    assert (mi[pix] == 0.25).all() and torch.equal(mi[~pix], img[~pix])
    fig = show_masks(img[0], {"M1": checkerboard(8, 8), "M2": checkerboard(8, 8, 2)}, 4)
    assert len(fig.axes) == 2 and "32/64 masked" in fig.axes[0].get_title()
    plt.close(fig)
    t = patchify(img, 4)
    target = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    fig = show_reconstruction(img, target, ms.mask, 4, norm_pix=True, n=2)        # perfect norm_pix prediction
    assert len(fig.axes) == 8
    for b in range(2):
        torch.testing.assert_close(torch.as_tensor(fig.axes[4 * b + 2].images[0].get_array().data), img[b, 0], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.as_tensor(fig.axes[4 * b + 3].images[0].get_array().data), img[b, 0], atol=1e-4, rtol=0)
    plt.close(fig)
    fig = show_reconstruction((img - 0.5) / 0.2, torch.zeros(2, 64, 16), ms.mask, 4, mean=[0.5], std=[0.2], n=1)
    torch.testing.assert_close(torch.as_tensor(fig.axes[0].images[0].get_array().data), img[0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.as_tensor(fig.axes[2].images[0].get_array().data), torch.full((32, 32), 0.5))
    plt.close(fig)
    with pytest.raises(ConfigError, match="pred must be"): show_reconstruction(img, torch.zeros(2, 10, 16), ms.mask, 4)
