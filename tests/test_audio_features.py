"""Log-mel and MFCC front-ends: librosa parity, a tone lands in its band, batch consistency, devices, export."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from resnetlab.data.features import MFCC, LogMel, dct_matrix, hz_to_mel, mel_filterbank, mel_to_hz, ms_to_samples


def tone(freq: float, rate: int = 16000, seconds: float = 1.0, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return (amp * torch.sin(2 * math.pi * freq * t)).float()


@pytest.mark.parametrize("mel_scale", ["slaney", "htk"])
@pytest.mark.parametrize("norm", ["slaney", None])
@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax", [(16000, 512, 40, 20.0, 8000.0), (8000, 256, 32, 0.0, 4000.0),
                                                       (16000, 400, 64, 60.0, 7600.0)])
def test_filterbank_matches_librosa(mel_scale, norm, sr, n_fft, n_mels, fmin, fmax):
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=mel_scale == "htk",
                              norm=norm)
    ours = mel_filterbank(n_fft // 2 + 1, fmin, fmax, n_mels, sr, norm=norm, mel_scale=mel_scale, n_fft=n_fft)
    assert ours.shape == (n_fft // 2 + 1, n_mels) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy().T, ref, atol=1e-4 * ref.max(), rtol=0)


def test_mel_scale_round_trip():
    f = torch.tensor([0.0, 20.0, 700.0, 1000.0, 4000.0, 8000.0], dtype=torch.float64)
    for scale in ("slaney", "htk"):
        torch.testing.assert_close(mel_to_hz(hz_to_mel(f, scale), scale), f)
    assert hz_to_mel(torch.tensor(1000.0), "slaney").item() == pytest.approx(15.0)


@pytest.mark.parametrize("n_fft,win,hop,center", [(512, 400, 160, True), (400, 400, 100, True), (256, 200, 80, False)])
def test_logmel_matches_librosa(n_fft, win, hop, center):
    librosa = pytest.importorskip("librosa")
    y = np.random.default_rng(0).standard_normal(8000).astype(np.float32) * 0.1
    ref = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=n_fft, hop_length=hop, win_length=win, window="hann",
                                         center=center, pad_mode="constant", power=2.0, n_mels=40, fmin=20.0,
                                         fmax=8000.0)
    ours = LogMel(n_fft=n_fft, win_length=win, hop_length=hop, center=center)(torch.from_numpy(y))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours.numpy(), np.log(np.maximum(ref, 1e-6)), atol=1e-4, rtol=0)


def test_mfcc_matches_librosa_dct_of_our_logmel():
    librosa = pytest.importorskip("librosa")
    y = tone(440.0) + 0.01 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    logmel = LogMel()(y).numpy()
    ref = librosa.feature.mfcc(S=logmel, n_mfcc=13, dct_type=2, norm="ortho")
    np.testing.assert_allclose(MFCC(n_mfcc=13)(y).numpy(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("freq", [300.0, 1000.0, 3000.0, 6000.0])
def test_tone_peaks_in_the_band_centred_on_it(freq):
    m = LogMel()
    centres = mel_to_hz(torch.linspace(float(hz_to_mel(torch.tensor(20.0))), float(hz_to_mel(torch.tensor(8000.0))),
                                       42, dtype=torch.float64))[1:-1]
    expected = int(torch.argmin((centres - freq).abs()))
    band = int(m(tone(freq)).mean(dim=1).argmax())
    assert band == expected


def test_shapes_frames_and_single_wave():
    x = torch.randn(3, 16000)
    lm, mf = LogMel(), MFCC(n_mfcc=13)
    assert lm(x).shape == (3, 40, 101) and lm.num_frames(16000) == 101
    assert mf(x).shape == (3, 13, 101) and mf.num_frames(16000) == 101
    assert lm(x[0]).shape == (40, 101)
    nc = LogMel(center=False)
    assert nc(x).shape[-1] == nc.num_frames(16000) == 1 + (16000 - 512) // 160


def test_batch_equals_one_at_a_time():
    x = torch.randn(5, 12000, generator=torch.Generator().manual_seed(1)) * 0.2
    for module in (LogMel(), MFCC()):
        batch = module(x)
        for i in range(5):
            torch.testing.assert_close(batch[i], module(x[i : i + 1])[0], atol=1e-5, rtol=1e-5)


def test_dct_is_orthonormal():
    d = dct_matrix(40, 40).double()
    torch.testing.assert_close(d.T @ d, torch.eye(40, dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="n_mfcc"):
        dct_matrix(41, 40)


def test_silence_is_flat_at_the_floor_and_top_db_limits_range():
    assert torch.all(LogMel()(torch.zeros(2, 4000)) == math.log(1e-6))
    x = tone(1000.0)[None]
    clamped = LogMel(top_db=40.0)(x)
    span_db = (clamped.max() - clamped.min()) * 10 / math.log(10)
    assert span_db == pytest.approx(40.0, abs=1e-3)
    assert (LogMel()(x) - LogMel(log_floor=1e-12)(x)).abs().max() > 0  # the floor is active on a pure tone


def test_power_one_matches_librosa_magnitude_mel():
    librosa = pytest.importorskip("librosa")
    y = np.random.default_rng(2).standard_normal(4000).astype(np.float32) * 0.1
    ref = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=160, win_length=400, center=True,
                                         pad_mode="constant", power=1.0, n_mels=40, fmin=20.0, fmax=8000.0)
    ours = LogMel(power=1.0)(torch.from_numpy(y))
    np.testing.assert_allclose(ours.numpy(), np.log(np.maximum(ref, 1e-6)), atol=1e-4, rtol=0)


def test_half_precision_input_gives_float32():
    x = torch.randn(2, 4000)
    out = LogMel()(x.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, LogMel()(x.half().float()))


def test_ms_helper():
    assert ms_to_samples(25, 16000) == 400 and ms_to_samples(10, 16000) == 160 and ms_to_samples(32, 8000) == 256


def test_argument_checks_and_empty_filter_warning():
    with pytest.raises(ValueError, match="win_length"):
        LogMel(n_fft=256, win_length=400)
    with pytest.raises(ValueError, match="f_max"):
        mel_filterbank(257, 20.0, 9000.0, 40, 16000)
    with pytest.raises(ValueError, match="mel_scale"):
        mel_filterbank(257, 20.0, 8000.0, 40, 16000, mel_scale="bark")
    with pytest.warns(UserWarning, match="empty"):
        mel_filterbank(65, 0.0, 8000.0, 128, 16000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mel_filterbank(257, 20.0, 8000.0, 40, 16000)


def test_buffers_follow_the_module_but_stay_out_of_the_state_dict():
    m = MFCC()
    assert m.state_dict() == {}  # derived from the arguments, which the pipeline config records
    m = m.to(torch.float64)
    assert m.dct.dtype == m.logmel.fb.dtype == m.logmel.window.dtype == torch.float64
    x = torch.randn(2, 4000)
    assert m(x).dtype == torch.float64
    torch.testing.assert_close(m(x).float(), MFCC()(x), atol=1e-4, rtol=1e-5)


def test_torch_export_with_a_dynamic_batch():
    m = MFCC(n_mfcc=13).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(m, (torch.randn(2, 16000),), dynamic_shapes={"wave": {0: batch}})
    x = torch.randn(5, 16000)
    torch.testing.assert_close(exported.module()(x), m(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(4, 16000, generator=torch.Generator().manual_seed(0)) * 0.3
    for module in (LogMel(), MFCC()):
        cpu = module(x)
        gpu = module.to("cuda")(x.cuda())
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=1e-4)
