"""Batched audio augmentation: shapes, seeded determinism, and that each one does exactly what it claims."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from resnetlab.data.audio_augment import (
    add_noise,
    colored_noise,
    load_noise_bank,
    spec_augment,
    speed_perturb,
    time_shift,
)
from resnetlab.data.errors import DataError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tones(n: int, freq: float = 1000.0, t: int = 16000, rate: int = 16000) -> torch.Tensor:
    x = torch.arange(t, dtype=torch.float64) / rate
    return (0.3 * torch.sin(2 * math.pi * freq * x)).float().repeat(n, 1)


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    noise = (noisy - clean).double()
    return 10 * torch.log10(clean.double().square().mean(1) / noise.square().mean(1))


def peak_hz(x: torch.Tensor, rate: int = 16000) -> torch.Tensor:
    spec = torch.fft.rfft(x.double() * torch.hann_window(x.shape[-1], dtype=torch.float64), dim=-1).abs()
    return spec.argmax(-1).double() * rate / x.shape[-1]


# --- time shift -------------------------------------------------------------------------------------------

def test_time_shift_moves_each_clip_by_its_own_amount():
    n, t, max_shift = 64, 500, 40
    wave = torch.arange(1, t + 1, dtype=torch.int16).repeat(n, 1)
    out = time_shift(wave, max_shift, gen())
    assert out.shape == wave.shape and out.dtype == torch.int16
    shifts = []
    for row in out:  # recover each row's shift from where the ramp starts
        nz = row.nonzero().flatten()
        s = int(nz[0]) if row[nz[0]] == 1 else -(int(row[nz[0]]) - 1)
        expected = torch.zeros(t, dtype=torch.int16)
        src = torch.arange(t) - s
        ok = (src >= 0) & (src < t)
        expected[ok] = wave[0, src[ok]]
        assert torch.equal(row, expected)
        shifts.append(s)
    assert max(abs(s) for s in shifts) <= max_shift
    assert len(set(shifts)) > 20 and min(shifts) < 0 < max(shifts)  # per-clip, both directions


def test_time_shift_is_deterministic_per_seed():
    wave = torch.randn(8, 1000)
    assert torch.equal(time_shift(wave, 100, gen(3)), time_shift(wave, 100, gen(3)))
    assert not torch.equal(time_shift(wave, 100, gen(3)), time_shift(wave, 100, gen(4)))
    assert torch.equal(time_shift(wave, 0, gen(3)), wave)


# --- noise ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
def test_generated_noise_is_mixed_at_the_requested_snr(snr):
    clean = tones(16) * torch.linspace(0.1, 1.0, 16)[:, None]  # different levels: the SNR is per clip
    noisy = add_noise(clean, (snr, snr), 1.0, gen())
    assert noisy.shape == clean.shape and noisy.dtype == clean.dtype
    assert (snr_db(clean, noisy) - snr).abs().max() < 0.5


def test_snr_is_drawn_from_the_range_and_prob_is_respected():
    clean = tones(2000, t=2000)
    noisy = add_noise(clean, (5.0, 15.0), 0.3, gen(1))
    changed = (noisy != clean).any(1)
    assert 0.25 < changed.float().mean() < 0.35
    measured = snr_db(clean[changed], noisy[changed])
    assert measured.min() > 5.0 - 0.5 and measured.max() < 15.0 + 0.5
    assert measured.min() < 6.0 and measured.max() > 14.0  # spread over the whole range
    assert torch.equal(add_noise(clean, (5.0, 15.0), 0.0, gen(1)), clean)


def test_silent_clip_stays_silent_and_noise_is_deterministic():
    clean = torch.cat([torch.zeros(1, 4000), tones(1, t=4000)])
    a = add_noise(clean, (10.0, 20.0), 1.0, gen(5))
    assert not a[0].any()
    assert torch.equal(a, add_noise(clean, (10.0, 20.0), 1.0, gen(5)))


def test_noise_bank_clips_are_used_at_random_offsets_and_the_snr_holds():
    rate, length, t = 16000, 8000, 4000
    bank_freqs = [500.0, 1500.0, 2500.0]
    bank = torch.cat([(tones(1, f, length) * 32767 / 0.3 * 0.5).short() for f in bank_freqs])  # int16 rows
    clean = tones(300, 4000.0, t)
    noisy = add_noise(clean, (10.0, 10.0), 1.0, gen(2), noise_bank=bank)
    assert (snr_db(clean, noisy) - 10.0).abs().max() < 0.5
    residual = noisy - clean
    found = peak_hz(residual, rate)
    assert set(found.round().tolist()) == set(bank_freqs)  # every row drawn, nothing else
    # Offsets vary: two residuals from the same row are not all aligned.
    same_row = residual[(found - 500.0).abs() < 1]
    assert not all(torch.allclose(same_row[0] / same_row[0].norm(), r / r.norm(), atol=1e-3) for r in same_row[1:])


def test_short_noise_bank_rows_wrap_around():
    bank = torch.randn(2, 300)
    noisy = add_noise(torch.ones(4, 1000), (0.0, 0.0), 1.0, gen(), noise_bank=bank)
    residual = noisy - 1
    torch.testing.assert_close(residual[:, :700], residual[:, 300:])


def test_colored_noise_spectra():
    white = colored_noise(64, 8192, gen(), pink_prob=0.0)
    pink = colored_noise(64, 8192, gen(), pink_prob=1.0)
    for noise, expected_db in ((white, 0.0), (pink, 10 * math.log10(64))):  # pink: -3 dB per octave, 6 octaves
        power = torch.fft.rfft(noise, dim=1).abs().square().mean(0)
        low, high = power[32:64].mean(), power[2048:4096].mean()
        assert 10 * math.log10(low / high) == pytest.approx(expected_db, abs=1.5)


def test_noise_bank_on_another_device_is_refused():
    bank = torch.zeros(2, 100, device="meta")
    with pytest.raises(ValueError, match="noise_bank is on"):
        add_noise(torch.ones(2, 50), (0.0, 1.0), 1.0, gen(), noise_bank=bank)


def test_load_noise_bank(tmp_path):
    long = np.random.default_rng(0).uniform(-0.5, 0.5, 20000).astype(np.float32)  # 2.5 s at 8 kHz
    short = np.random.default_rng(1).uniform(-0.5, 0.5, 2400).astype(np.float32)  # 0.3 s
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "a_long.wav", long, 8000)
    sf.write(tmp_path / "sub" / "b_short.flac", short, 8000)
    (tmp_path / "notes.txt").write_text("ignored")
    bank = load_noise_bank(tmp_path, 16000, 16000)
    # 40000 samples -> rows at 0, 16000 and the tail at 24000; the 0.3 s clip (4800 samples) repeated to fill one.
    assert bank.dtype == torch.int16 and bank.shape == (4, 16000)
    torch.testing.assert_close(bank[1, 8000:], bank[2, :8000])  # the tail overlaps the second row
    torch.testing.assert_close(bank[3, :9600], bank[3, 4800:14400])
    assert bank[:3].float().abs().max() > 10000


def test_load_noise_bank_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_noise_bank(tmp_path / "nope", 16000, 16000)
    with pytest.raises(DataError, match="no noise clips"):
        load_noise_bank(tmp_path, 16000, 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVE")
    with pytest.raises(DataError, match="broken.wav"):
        load_noise_bank(tmp_path, 16000, 16000)


# --- SpecAugment ------------------------------------------------------------------------------------------

def _runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, width) of each run of True."""
    runs, start = [], None
    for i, v in enumerate(mask_row.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


@pytest.mark.parametrize("axis", ["freq", "time"])
def test_one_mask_zeroes_one_span_of_at_most_the_stated_width(axis):
    n, f, t, width = 3000, 40, 101, 7
    spec = torch.ones(n, f, t)
    kwargs = {"freq_masks": 1, "freq_width": width, "time_masks": 0, "time_width": 0} if axis == "freq" else \
        {"freq_masks": 0, "freq_width": 0, "time_masks": 1, "time_width": width}
    out = spec_augment(spec, generator=gen(), **kwargs)
    zero = out == 0
    line = zero.all(dim=2) if axis == "freq" else zero.all(dim=1)  # masked rows / frames
    assert torch.equal(zero, line[:, :, None].expand_as(zero) if axis == "freq" else line[:, None, :].expand_as(zero))
    widths, starts = [], []
    size = f if axis == "freq" else t
    for row in line:
        runs = _runs(row)
        assert len(runs) <= 1
        if runs:
            starts.append(runs[0][0])
            assert runs[0][0] + runs[0][1] <= size
        widths.append(runs[0][1] if runs else 0)
    assert set(widths) == set(range(width + 1))  # every width 0..W occurs, none wider
    assert 0 in starts and size - width in starts  # masks reach both edges


def test_spec_augment_counts_determinism_and_value():
    spec = torch.randn(16, 40, 101)
    a = spec_augment(spec, 2, 7, 2, 12, gen(9), mask_value=-5.0)
    assert torch.equal(a, spec_augment(spec, 2, 7, 2, 12, gen(9), mask_value=-5.0))
    masked = a == -5.0
    assert masked.any()
    assert torch.equal(a[~masked], spec[~masked])
    rows = masked.all(dim=2).sum(1)  # masked frequency rows per example (two masks, may overlap)
    frames = masked.all(dim=1).sum(1)
    assert rows.max() <= 14 and frames.max() <= 24
    assert len({tuple(m.flatten().tolist()) for m in masked}) == 16  # per-example positions
    assert torch.equal(spec_augment(spec, 0, 7, 0, 12, gen()), spec)


# --- speed ------------------------------------------------------------------------------------------------

def test_speed_perturb_changes_pitch_by_the_factor_per_clip():
    wave = tones(60, 1000.0)
    out = speed_perturb(wave, (0.9, 1.0, 1.1), gen(0))
    assert out.shape == wave.shape
    peaks = peak_hz(out[:, 2000:-2000])
    assert set(peaks.round().tolist()) == {900.0, 1000.0, 1100.0}
    assert torch.equal(out, speed_perturb(wave, (0.9, 1.0, 1.1), gen(0)))


def test_speed_perturb_lengths():
    burst = torch.zeros(1, 16000)
    burst[0, 6000:10000] = 1.0  # a 4000-sample burst in the middle
    slow = speed_perturb(burst, (0.8,), gen())
    fast = speed_perturb(burst, (1.25,), gen())
    assert ((slow > 0.5).sum().item(), (fast > 0.5).sum().item()) == (pytest.approx(5000, abs=4),
                                                                       pytest.approx(3200, abs=4))
    with pytest.raises(ValueError, match="positive"):
        speed_perturb(burst, (0.0, 1.0), gen())


# --- devices ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_all_augmentations_on_cuda_with_either_generator():
    wave = tones(8).cuda()
    for g in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):
        out = time_shift(wave, 100, g)
        out = add_noise(out, (5.0, 10.0), 1.0, g, noise_bank=(wave * 1000).short())
        out = speed_perturb(out, (0.9, 1.1), g)
        spec = spec_augment(torch.randn(8, 40, 101, device="cuda"), generator=g)
        assert out.device.type == spec.device.type == "cuda" and out.shape == wave.shape
    cpu = time_shift(wave.cpu(), 100, torch.Generator().manual_seed(0))
    assert torch.equal(time_shift(wave, 100, torch.Generator().manual_seed(0)).cpu(), cpu)
