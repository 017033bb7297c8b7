"""SAVE's model (`ssl_nb.save`): tiny SAM, batched decoder, checkpoint interpolation, adapters, frozen parts, errors."""
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ssl_nb.core import CheckpointError, ConfigError
from ssl_nb.save import (PRESETS, SAM_ARCHS, SAVE, BatchedMaskDecoder, ImageAdapter, PromptableSam, SAVEBlock,
                         build_sam, build_save, check_arch, get_arch, image_adapter_params, load_sam_weights, mask_loss,
                         prompts_from_masks)

AUDIO = dict(audio_width=64, audio_hidden=64)      # small audio path: the tests are about the wiring, not the sizes


def spec_tiny_sam():
    "The tiny SAM of spec §14, built with the segment-anything constructors exactly as the spec writes it."
    enc = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4, out_chans=32,
                          qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          window_size=2, global_attn_indexes=(1,))
    pe = PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=16)
    dec = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64,
                      num_heads=2), transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32)
    return Sam(enc, pe, dec, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def randomise_positions(model):
    "SAM zero-initialises pos_embed and rel_pos: give them random values so that interpolation is visible."
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos" in name: p.normal_()
    return model


@pytest.fixture(scope="module")
def tiny128_file(tmp_path_factory):
    "A random tiny SAM saved at 128 px (8×8 grid): the checkpoint fixture of the interpolation tests."
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny128.pth"
    torch.save(randomise_positions(build_sam("tiny", 128)).state_dict(), path)
    return path


# --- tiny SAM and the decoder ----------------------------------------------------------------------------------------

def test_tiny_sam_forward_matches_the_spec_config():
    torch.manual_seed(0)
    ref = spec_tiny_sam()
    model = build_sam("tiny", 64).eval()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    model.load_state_dict(ref.state_dict())
    frames = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        emb = model.image_encoder(frames)
        assert emb.shape == (2, 32, 4, 4)
        torch.testing.assert_close(emb, ref.image_encoder(frames))
        logits = model(frames, torch.tensor([[[10., 20.]], [[40., 5.]]]), torch.ones(2, 1, dtype=torch.long))
    assert logits.shape == (2, 1, 64, 64) and torch.isfinite(logits).all()
    assert model.image_encoder.blocks[1].attn.rel_pos_h.shape == (7, 16)      # global block
    assert model.image_encoder.blocks[0].attn.rel_pos_h.shape == (3, 16)      # windowed block (2×2 windows)


def test_patched_decoder_pairs_images_with_prompt_sets_where_the_stock_one_fails():
    torch.manual_seed(0)
    ref = spec_tiny_sam().eval()
    dec = BatchedMaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=32,
                             mlp_dim=64, num_heads=2), transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32).eval()
    dec.load_state_dict(ref.mask_decoder.state_dict())
    emb, sparse = torch.randn(2, 32, 4, 4), torch.randn(2, 1, 32)
    dense = ref.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(2, -1, 4, 4)
    kw = lambda e, s, d: dict(image_embeddings=e, image_pe=ref.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=s, dense_prompt_embeddings=d, multimask_output=False)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            ref.mask_decoder(**kw(emb, sparse, dense))
        masks, iou = dec(**kw(emb, sparse, dense))
        assert masks.shape == (2, 1, 16, 16) and iou.shape == (2, 1)
        for b in range(2):   # image b with prompt set b, as the stock decoder computes it for one image
            torch.testing.assert_close(masks[b:b + 1], ref.mask_decoder(**kw(emb[b:b + 1], sparse[b:b + 1], dense[b:b + 1]))[0])


def test_save_batch_rows_are_independent():
    "With the batched decoder, each frame's mask depends on its own frame and audio only."
    torch.manual_seed(0)
    model = build_save("tiny", 64, **AUDIO).eval()
    frames, audio = torch.randn(3, 3, 64, 64), torch.randn(3, 128)
    with torch.no_grad():
        full = model(frames, audio)
        torch.testing.assert_close(full[1:2], model(frames[1:2], audio[1:2]), rtol=1e-4, atol=1e-5)
        other_audio = model(frames, torch.cat([audio[:1], torch.randn(2, 128)]))
    torch.testing.assert_close(other_audio[0], full[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(other_audio[1], full[1])


# --- checkpoint loading ----------------------------------------------------------------------------------------------

def test_checkpoint_interpolation_8x8_to_4x4(tiny128_file):
    big = torch.load(tiny128_file, weights_only=True)
    model = build_sam("tiny", 64, tiny128_file)
    sd = model.state_dict()
    assert sd["image_encoder.pos_embed"].shape == (1, 4, 4, 32)
    expected_pos = F.interpolate(big["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(4, 4), mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(sd["image_encoder.pos_embed"], expected_pos)
    for hw in "hw":
        g = f"image_encoder.blocks.1.attn.rel_pos_{hw}"
        assert big[g].shape == (15, 16) and sd[g].shape == (7, 16)
        expected = F.interpolate(big[g][None, None], size=(7, 16), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(sd[g], expected)                          # SAM-Med2D's bilinear resize
        w = f"image_encoder.blocks.0.attn.rel_pos_{hw}"
        assert sd[w].shape == (3, 16) and torch.equal(sd[w], big[w])         # windowed: unchanged
    for k in big:                                                            # everything else copied as is
        if "pos" not in k: assert torch.equal(sd[k], big[k]), k


def test_forward_time_interpolation_equals_load_time(tiny128_file):
    frames = torch.randn(2, 3, 64, 64)
    loaded = build_sam("tiny", 64, tiny128_file).eval()
    kept = build_sam("tiny", 64, tiny128_file, pos_interp="forward").eval()
    assert kept.image_encoder.pos_embed.shape == (1, 8, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(kept.image_encoder(frames), loaded.image_encoder(frames), rtol=1e-4, atol=1e-5)


def test_global_blocks_found_by_index_not_substring(tmp_path):
    "ViT-H's pattern (32 blocks, global 7, 15, 23, 31): SAM-Med2D's substring match would take 2, 12, 25 and miss 7, 31."
    arch = replace(get_arch("tiny"), depth=32, global_attn_indexes=(7, 15, 23, 31))
    torch.save(randomise_positions(build_sam(arch, 128)).state_dict(), tmp_path / "deep.pth")
    report = load_sam_weights(build_sam(arch, 64), tmp_path / "deep.pth")
    resized = {k for k in report.resized if "rel_pos" in k}
    assert resized == {f"image_encoder.blocks.{i}.attn.rel_pos_{hw}" for i in (7, 15, 23, 31) for hw in "hw"}


def test_save_loads_a_sam_checkpoint_with_its_new_keys_initialised(tiny128_file):
    model = build_save("tiny", 64, tiny128_file, **AUDIO)
    report = load_sam_weights(model, tiny128_file)
    assert report.new_keys and all(model.is_new_key(k) for k in report.new_keys)
    assert {k.split(".")[0] for k in report.new_keys} == {"image_encoder", "audio", "sparse_head"}
    assert set(report.resized) == {"image_encoder.pos_embed", "image_encoder.blocks.1.attn.rel_pos_h",
                                   "image_encoder.blocks.1.attn.rel_pos_w"}
    dropped = load_sam_weights(model, tiny128_file, drop_decoder_heads=True).dropped
    assert dropped and all(k.startswith(("mask_decoder.mask_tokens", "mask_decoder.output_hypernetworks_mlps",
                                         "mask_decoder.iou_prediction_head")) for k in dropped)


def test_stage1_small_sam_warm_starts_save():
    torch.manual_seed(0)
    stage1 = build_sam("small", 128)
    ckpt = {"model": stage1.state_dict(), "step": 3}                         # an engine-style checkpoint dict
    stage2 = build_save("small", 128, ckpt)
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    assert all(torch.equal(s2[k], v) for k, v in s1.items())
    assert not stage2.image_encoder.patch_embed.proj.weight.requires_grad


def test_missing_corrupt_or_mismatched_sam_checkpoint_gets_one_clear_error(tiny128_file, tmp_path):
    with pytest.raises(CheckpointError, match="never downloads"):
        build_save("tiny", 64, tmp_path / "sam_vit_b_01ec64.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read"):
        build_sam("tiny", 64, tmp_path / "bad.pth")
    wide = replace(get_arch("tiny"), embed_dim=64, num_heads=4)             # another width: every encoder tensor
    with pytest.raises(CheckpointError, match=r"mismatched: .*width 32 and depth 2.*model is width 64") as e:
        build_save(wide, 64, tiny128_file, **AUDIO)
    assert "image_encoder.patch_embed.proj.weight (32, 3, 16, 16) vs (64, 3, 16, 16)" in str(e.value)
    sd = torch.load(tiny128_file, weights_only=True)
    extra = {**{k: v for k, v in sd.items() if not k.startswith("mask_decoder.iou_token")}, "foo.bar": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 missing: mask_decoder.iou_token.weight; 1 unexpected: foo.bar"):
        build_sam("tiny", 64, extra)


# --- adapters ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [8, 32, 96])
def test_adapter_parameter_count(dim):
    n = sum(p.numel() for p in ImageAdapter(dim).parameters())
    assert n == image_adapter_params(dim) == int(25.5 * dim * dim + 2 * dim)
    assert image_adapter_params(32) == 26_176 and image_adapter_params(768) == 15_042_048


def test_adapted_block_differs_from_the_frozen_block():
    torch.manual_seed(0)
    kw = dict(mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
              window_size=0, input_size=(4, 4))
    plain, adapted = SAVEBlock(32, 2, **kw), SAVEBlock(32, 2, image_adapter=True, **kw)
    adapted.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 4, 4, 32)
    with torch.no_grad():
        diff = adapted(x) - plain(x)
        torch.testing.assert_close(diff, adapted.adapter(adapted.norm2(x + adapted.attn(adapted.norm1(x)))))
    assert diff.abs().mean() > 0.1


# --- what is trained ------------------------------------------------------------------------------------------------

def test_frozen_parameters_get_no_gradient_and_stay_bit_identical():
    torch.manual_seed(0)
    model = build_save("tiny", 64, **AUDIO)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}
    assert frozen and adapters and all(model.get_parameter(n).requires_grad for n in adapters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        logits = model(torch.randn(2, 3, 64, 64), torch.randn(2, 128))
        loss, _ = mask_loss(logits, (torch.rand(2, 1, 64, 64) > 0.5).float())
        opt.zero_grad(); loss.backward()
        assert all(model.get_parameter(n).grad is None for n in frozen)
        opt.step()
    assert all(torch.equal(model.get_parameter(n), v) for n, v in frozen.items())
    assert all(not torch.equal(model.get_parameter(n), v) for n, v in adapters.items())


def test_default_trainable_set_and_checkpoint_contents():
    model = build_save("tiny", 64, **AUDIO)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    enc = {n for n in trained if n.startswith("image_encoder.")}
    assert enc and all(".adapter." in n for n in enc)
    assert {n for n in trained if n.startswith("prompt_encoder.")} == set()
    assert not any(n.startswith("mask_decoder.iou_prediction_head.") for n in trained)       # no gradient under bce_iou
    assert any(n.startswith("mask_decoder.transformer.") for n in trained)
    assert any(n.startswith("audio.") for n in trained) and any(n.startswith("sparse_head.") for n in trained)
    sd = model.trainable_state_dict()
    assert set(sd) == trained and set(sd).isdisjoint(model.frozen_parameter_names())
    other = build_save("tiny", 64, **AUDIO)
    other.load_trainable_state_dict(sd)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(CheckpointError, match="missing"):
        other.load_trainable_state_dict({k: v for k, v in sd.items() if "adapter" not in k})
    model.train()
    names = {n for n, _ in model.frozen_modules()}
    assert {"image_encoder.patch_embed", "image_encoder.neck", "prompt_encoder", "image_encoder.blocks.0.attn"} <= names
    assert all(not m.training for _, m in model.frozen_modules())
    assert model.image_encoder.blocks[0].adapter.training and model.mask_decoder.training


def test_switches():
    n_trained = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    no_adapter = build_save("tiny", 64, image_adapter=False, **AUDIO)
    assert not any(".adapter." in n for n, _ in no_adapter.named_parameters())
    assert n_trained(build_save("tiny", 64, **AUDIO)) - n_trained(no_adapter) == 2 * image_adapter_params(32)
    full = build_save("tiny", 64, train_encoder=True, train_prompt_encoder=True, loss="focal_dice_iou", **AUDIO)
    assert full.image_encoder.pos_embed.requires_grad and full.prompt_encoder.no_mask_embed.weight.requires_grad
    assert full.mask_decoder.iou_prediction_head.layers[0].weight.requires_grad
    frozen_decoder = build_save("tiny", 64, train_decoder=False, **AUDIO)
    assert not any(p.requires_grad for p in frozen_decoder.mask_decoder.parameters())
    sama = build_save("tiny", 64, audio_mode="sama")
    assert sama.sparse_head is None and sama(torch.randn(2, 3, 64, 64), torch.randn(2, 128)).shape == (2, 1, 64, 64)
    with pytest.raises(ConfigError, match="sparse_prompt=False"):
        build_save("tiny", 64, audio_mode="sama", sparse_prompt=True)
    no_sparse = build_save("tiny", 64, sparse_prompt=False, **AUDIO)
    assert no_sparse.sparse_head is None
    with pytest.raises(ConfigError, match="audio_mode='nope'"):
        build_save("tiny", 64, audio_mode="nope")
    with pytest.raises(ConfigError, match="does not know"):
        build_save("tiny", 64, adapter_ratio=0.5)
    with pytest.raises(ConfigError, match="odd"):
        build_save("tiny", 48)
    with pytest.raises(ConfigError, match=r"audio_feats must be \[B, 128\]"):
        build_save("tiny", 64, **AUDIO)(torch.randn(2, 3, 64, 64), torch.randn(3, 128))


def test_sama_pe_quirk(tiny128_file):
    sd = torch.load(tiny128_file, weights_only=True)
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    default = build_save("tiny", 64, tiny128_file, **AUDIO)
    assert torch.equal(default.state_dict()[key], sd[key])
    torch.manual_seed(1)
    quirk = build_save("tiny", 64, tiny128_file, sama_pe_quirk=True, **AUDIO)
    assert not torch.equal(quirk.state_dict()[key], sd[key])
    assert quirk.prompt_encoder.no_mask_embed.weight.requires_grad
    assert key in quirk.trainable_state_dict() and "prompt_encoder.no_mask_embed.weight" in quirk.trainable_state_dict()


# --- loss, prompts, presets -----------------------------------------------------------------------------------------

def test_losses_hand_computed():
    z, y = torch.zeros(2, 1, 2, 2), torch.tensor([[[[1., 0.], [0., 0.]]], [[[1., 1.], [1., 1.]]]])
    loss, parts = mask_loss(z, y)
    # p = 1/2: BCE ln 2; soft IoU 0.5/(2+1-0.5) = 0.2 and 2/(2+4-2) = 0.5, so the IoU term is mean(0.8, 0.5)
    torch.testing.assert_close(parts["bce"], torch.tensor(0.6931472))
    torch.testing.assert_close(parts["iou"], torch.tensor(0.65))
    torch.testing.assert_close(loss, parts["bce"] + parts["iou"])
    # SAM-Med2D's terms over the whole batch: 5 positives, 3 negatives of 8 pixels; p = 1/2 everywhere
    _, p2 = mask_loss(z, y, "focal_dice_iou", iou_pred=torch.zeros(2, 1))
    torch.testing.assert_close(p2["focal"], torch.tensor((5 * 0.25 + 3 * 0.75) * 0.25 * 0.6931472 / 8))
    torch.testing.assert_close(p2["dice"], torch.tensor(1 - (2 * 2.5 + 1) / (4 + 5 + 1)))
    torch.testing.assert_close(p2["iou_mse"], torch.tensor((2.5 / (4 + 5 - 2.5)) ** 2))
    with pytest.raises(ConfigError, match="iou_pred"):
        mask_loss(z, y, "focal_dice_iou")


def test_prompts_from_masks_on_device_batch():
    m = torch.zeros(4, 1, 16, 16)
    m[0, 0, 2:6, 3:9] = 1; m[1, 0, 10:16, 0:2] = 1; m[2, 0, 7, 7] = 1        # m[3] is empty
    g = torch.Generator().manual_seed(0)
    pr = prompts_from_masks(m, g, n_points=8, p_box=0.5, box_noise=0.0)
    xy = pr["points"].long()
    for b in range(3): assert m[b, 0, xy[b, :, 1], xy[b, :, 0]].all()
    torch.testing.assert_close(pr["boxes"][:3], torch.tensor([[3., 2., 9., 6.], [0., 10., 2., 16.], [7., 7., 8., 8.]]))
    assert (pr["point_labels"][3] == -1).all() and pr["box_labels"][3] == -1
    for b in range(3): assert (pr["box_labels"][b] == 1) == bool((pr["point_labels"][b] == -1).all())
    again = prompts_from_masks(m, torch.Generator().manual_seed(0), n_points=8, p_box=0.5, box_noise=0.0)
    assert all(torch.equal(v, again[k]) for k, v in pr.items())
    model = build_sam("tiny", 16 * 4).eval()                                 # the prompts drive a PromptableSam
    with torch.no_grad():
        out = model(torch.randn(4, 3, 64, 64), **prompts_from_masks(F.interpolate(m, size=64), g))
    assert out.shape == (4, 1, 64, 64)


def test_archs_and_presets():
    for name, arch in SAM_ARCHS.items():
        check_arch(arch, arch.checkpoint_img_size, image_adapter=True)
    for preset in PRESETS.values():
        check_arch(get_arch(preset["arch"]), preset["img_size"], image_adapter=True)
        assert preset["sam_checkpoint"] == SAM_ARCHS[preset["arch"]].checkpoint_name and "UNVERIFIED" in preset["status"]
    with torch.device("meta"):
        vitb = build_save("vit_b", 256)
    rows = {r["part"]: r for r in vitb.parameter_table()}
    assert rows["image adapters"]["trained"] == 12 * 15_042_048
    assert rows["SAM image encoder"]["trained"] == 0
    assert rows["image adapters"]["trained"] > 0.9 * sum(r["trained"] for r in rows.values())
    assert isinstance(vitb, SAVE) and isinstance(vitb, PromptableSam) and isinstance(vitb, Sam)
