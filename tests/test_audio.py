"Tests for ssl_nb.audio: VGGish's log-mel front end against an independent numpy oracle, the VGGish network and loader."
import math

import numpy as np
import pytest
import torch

from ssl_nb.audio import (AUDIO_ENCODERS, EXAMPLE_SAMPLES, AudioCNN, VGGish, create_audio_encoder, load_vggish,
                          log_mel_batch, log_mel_examples, pad_examples, read_wav, vggish_mel_matrix, wav_to_examples,
                          write_wav)
from ssl_nb.core import CheckpointError, ConfigError, DataError

SR = 16000


# ---------------------------------------------------------------- an independent oracle (mel_features.py semantics)
def oracle_examples(data, sr=SR):
    "VGGish's waveform_to_examples for mono float input at 16 kHz, in float64 numpy with stride tricks (as mel_features.frame)."
    win, hop = int(round(sr * 0.025)), int(round(sr * 0.010))
    nfft = 2 ** int(np.ceil(np.log(win) / np.log(2.0)))
    n = 1 + int(np.floor((len(data) - win) / hop))
    frames = np.lib.stride_tricks.as_strided(data, (n, win), (data.strides[0] * hop, data.strides[0]))
    window = 0.5 - 0.5 * np.cos(2 * np.pi / win * np.arange(win))
    spec = np.abs(np.fft.rfft(frames * window, int(nfft)))
    hz2mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
    bins_mel = hz2mel(np.linspace(0.0, sr / 2.0, spec.shape[1]))
    edges = np.linspace(hz2mel(125.0), hz2mel(7500.0), 66)
    lower = (bins_mel[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    upper = (edges[None, 2:] - bins_mel[:, None]) / (edges[2:] - edges[1:-1])
    weights = np.maximum(0.0, np.minimum(lower, upper)); weights[0, :] = 0.0
    log_mel = np.log(spec @ weights + 0.01)
    n_ex = 1 + int(np.floor((log_mel.shape[0] - 96) / 96))
    ex = np.lib.stride_tricks.as_strided(log_mel, (n_ex, 96, 64), (log_mel.strides[0] * 96, *log_mel.strides))
    return ex[:, None].copy()


def chirp(seconds, sr=SR, f0=80.0, f1=7400.0, noise=0.0, seed=0):
    t = np.arange(int(round(seconds * sr))) / sr
    k = np.log(f1 / f0) / seconds
    x = 0.6 * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)
    return x + noise * np.random.default_rng(seed).standard_normal(len(t))


# ---------------------------------------------------------------- front end
@pytest.mark.parametrize("seconds,n", [(5, 5), (1, 1), (0.975, 1), (2.9, 3), (2.87, 2), (10, 10)])
def test_log_mel_shapes(seconds, n):
    out = log_mel_examples(torch.zeros(int(round(seconds * SR))))
    assert out.shape == (n, 1, 96, 64) and out.dtype == torch.float32


def test_too_short_clip_is_a_clear_error():
    with pytest.raises(ConfigError, match="15600"):
        log_mel_examples(torch.zeros(EXAMPLE_SAMPLES - 1))


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_log_mel_matches_vggish_definition_on_a_chirp(noise):
    x = chirp(5.0, noise=noise)
    ref = oracle_examples(x)
    ours = log_mel_examples(torch.from_numpy(x).float()).double().numpy()
    assert ours.shape == ref.shape == (5, 1, 96, 64)
    assert np.abs(ours - ref).max() < 1e-3 and np.abs(ours - ref).mean() < 1e-4     # float32 rounding
    ours64 = log_mel_batch(torch.from_numpy(x), dtype=torch.float64).numpy()
    np.testing.assert_allclose(ours64, ref, atol=1e-9)


def test_mel_matrix_equals_the_oracle_bands():
    hz2mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
    m = vggish_mel_matrix(dtype=torch.float64).numpy()
    bins_mel, edges = hz2mel(np.linspace(0, 8000, 257)), np.linspace(hz2mel(125.0), hz2mel(7500.0), 66)
    for i in (0, 17, 63):                                          # band by band, as mel_features loops
        lo, c, hi = edges[i:i + 3]
        col = np.maximum(0, np.minimum((bins_mel - lo) / (c - lo), (hi - bins_mel) / (hi - c))); col[0] = 0
        np.testing.assert_allclose(m[:, i], col, atol=1e-12)


def test_stereo_int16_and_batches():
    x = torch.from_numpy(chirp(2.0, noise=0.01)).float()
    left, right = x, x.roll(300)
    mean = log_mel_examples((left + right) / 2)
    torch.testing.assert_close(log_mel_examples(torch.stack([left, right], 1)), mean)   # [T, 2]
    torch.testing.assert_close(log_mel_examples(torch.stack([left, right], 0)), mean)   # [2, T]
    pcm = (x * 20000).round().to(torch.int16)
    torch.testing.assert_close(log_mel_examples(pcm), log_mel_examples(pcm.float() / 32768.0))
    batch = log_mel_batch(torch.stack([left, right]))
    assert batch.shape == (2, 2, 1, 96, 64)
    torch.testing.assert_close(batch[1], log_mel_examples(right))


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_to_16k(rate):
    ref = log_mel_examples(torch.from_numpy(chirp(3.0, f1=3800.0)).float())
    out = log_mel_examples(torch.from_numpy(chirp(3.0, sr=rate, f1=3800.0)).float(), rate)
    assert out.shape == ref.shape == (3, 1, 96, 64)
    assert (out - ref).abs().mean() < 0.05


def test_pad_examples_repeats_the_last():
    ex = torch.arange(2.0)[:, None, None, None].expand(2, 1, 96, 64)
    p = pad_examples(ex, 5)
    assert p.shape == (5, 1, 96, 64) and p[:, 0, 0, 0].tolist() == [0, 1, 1, 1, 1]
    assert pad_examples(torch.zeros(7, 1, 96, 64), 5).shape[0] == 5
    with pytest.raises(ConfigError): pad_examples(torch.zeros(0, 1, 96, 64))


def test_wav_round_trip_and_missing_file(tmp_path):
    x = torch.from_numpy(chirp(5.0)).float()
    p = write_wav(tmp_path / "clip.wav", x)
    w, sr = read_wav(p)
    assert sr == SR and w.shape == x.shape and (w - x).abs().max() < 1e-4
    assert wav_to_examples(p).shape == (5, 1, 96, 64)
    with pytest.raises(DataError, match="nope.wav"): read_wav(tmp_path / "nope.wav")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_log_mel_on_cuda_matches_cpu():
    x = torch.from_numpy(chirp(5.0, noise=0.01)).float()
    torch.testing.assert_close(log_mel_examples(x.cuda()).cpu(), log_mel_examples(x), atol=2e-3, rtol=0)


# ---------------------------------------------------------------- VGGish
TORCHVGGISH_KEYS = sorted([f"features.{i}.{w}" for i in (0, 3, 6, 8, 11, 13) for w in ("weight", "bias")] +
                          [f"embeddings.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")])


@pytest.fixture(scope="module")
def vggish():
    torch.manual_seed(0)
    return VGGish().eval()


@pytest.fixture(scope="module")
def vggish_file(vggish, tmp_path_factory):
    "A randomly initialised VGGish saved as the released file is named (288 MB, written once)."
    path = tmp_path_factory.mktemp("weights") / "vggish-10086976.pth"
    torch.save(vggish.state_dict(), path)
    return path


def test_vggish_size_keys_and_output(vggish):
    assert sum(p.numel() for p in vggish.parameters()) == 72_141_184
    assert sorted(vggish.state_dict()) == TORCHVGGISH_KEYS
    x = torch.randn(3, 1, 96, 64)
    with torch.no_grad(): e = vggish(x)
    assert e.shape == (3, 128) and (e >= 0).all()


def torchvggish_forward(model, x):
    "The port's forward, literally: features, transpose(1, 3), transpose(1, 2), view, embeddings."
    x = model.features(x)
    x = torch.transpose(x, 1, 3)
    x = torch.transpose(x, 1, 2)
    return model.embeddings(x.contiguous().view(x.size(0), -1))


def test_vggish_flattens_in_tf_order(vggish):
    x = torch.randn(2, 1, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(vggish(x), torchvggish_forward(vggish, x))
        naive = vggish.embeddings(vggish.features(x).flatten(1))          # PyTorch's own order: different
    assert (naive - vggish(x)).abs().max() > 1e-4


def test_load_vggish_round_trip(vggish, vggish_file):
    loaded = load_vggish(vggish_file)
    x = torch.randn(2, 1, 96, 64)
    with torch.no_grad(): torch.testing.assert_close(loaded(x), vggish(x))
    assert not loaded.training


def test_load_vggish_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pth"): load_vggish(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read"): load_vggish(tmp_path / "junk.pth")
    torch.save({"module.features.0.weight": torch.zeros(64, 1, 3, 3), "classifier.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing \['embeddings.0.bias'.*unexpected \['classifier.weight'\]") as e:
        load_vggish(tmp_path / "bad.pth")
    assert "features.0.weight'" not in str(e.value).split("unexpected")[0]     # the DataParallel prefix is stripped
    torch.save(VGGish(widths=(8, 16, 32, 32, 64, 64), hidden=256).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match="wrong shapes"): load_vggish(tmp_path / "tiny.pth")


def test_postprocessor_pca_clip_quantise(vggish, vggish_file, tmp_path):
    torch.save({"pca_eigen_vectors": torch.eye(128), "pca_means": torch.zeros(128)}, tmp_path / "pca.pth")
    model = load_vggish(vggish_file, pca_path=tmp_path / "pca.pth")
    x = torch.randn(2, 1, 96, 64)
    with torch.no_grad(): raw, out = vggish(x), model(x)
    torch.testing.assert_close(out, torch.round((raw.clamp(-2, 2) + 2) * 255 / 4))
    torch.save({"pca_means": torch.zeros(128)}, tmp_path / "badpca.pth")
    with pytest.raises(CheckpointError, match="PCA"): load_vggish(vggish_file, pca_path=tmp_path / "badpca.pth")


def test_small_encoders_have_the_same_interface():
    assert set(AUDIO_ENCODERS.names()) >= {"vggish", "vggish_tiny", "audio_cnn"}
    x = torch.randn(4, 1, 96, 64)
    for name in ("vggish_tiny", "audio_cnn"):
        enc = create_audio_encoder(name)
        out = enc(x)
        assert out.shape == (4, 128) and enc.num_features == 128
        out.square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="\\[n, 1, 96, 64\\]"): AudioCNN()(torch.randn(4, 96, 64))
    with pytest.raises(ConfigError): create_audio_encoder("vggish_tiny", checkpoint="x.pth")


def test_audio_cnn_checkpoint_round_trip(tmp_path):
    enc = AudioCNN().eval()
    torch.save(enc.state_dict(), tmp_path / "a.pth")
    enc2 = create_audio_encoder("audio_cnn", checkpoint=tmp_path / "a.pth").eval()
    x = torch.randn(2, 1, 96, 64)
    torch.testing.assert_close(enc2(x), enc(x))
