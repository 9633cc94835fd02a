"""Audio augmentation on whole batches, on the device: time shift, background noise, SpecAugment, speed.

Every function takes a batch ``(N, T)`` of waves (or ``(N, F, frames)`` features), draws its random numbers
from ``generator`` (same seed, same batch -> same output) and works per sample with broadcasting and
gathers, never with a Python loop over the batch. Random numbers are drawn on the generator's device and
moved to the batch's: a generator on the batch's device avoids the copy; ``None`` uses torch's global RNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import torch

from resnetlab.data.audio import AUDIO_EXTENSIONS, INT16_SCALE, center_fit, read_audio, resample, to_int16
from resnetlab.data.errors import DataError


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform [0, 1) on ``device``, drawn on the generator's device."""
    src = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=src, dtype=dtype).to(device)


def _randint(high: torch.Tensor | int, shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """Integers uniform in ``[0, high)`` (``high`` may be a per-element tensor of shape ``shape``)."""
    u = _rand(shape, generator, device, torch.float64)  # 53 random bits: unbiased for any realistic high
    return (u * high).floor().long()


def time_shift(wave: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each clip of ``(N, T)`` by its own whole number of samples, uniform in ``[-max_shift, max_shift]``.

    Positive shifts delay the clip. Samples shifted in are zeros (not wrapped around, which would splice the
    end of a word onto its start). Any dtype, int16 included.
    """
    _check_batch(wave, "wave", 2)
    if max_shift <= 0:
        return wave
    n, t = wave.shape
    shift = _randint(2 * max_shift + 1, (n,), generator, wave.device) - max_shift
    src = torch.arange(t, device=wave.device)[None, :] - shift[:, None]  # out[i, j] = wave[i, j - shift[i]]
    valid = (src >= 0) & (src < t)
    out = torch.gather(wave, 1, src.clamp(0, t - 1))
    return torch.where(valid, out, torch.zeros((), dtype=wave.dtype, device=wave.device))


def colored_noise(n: int, t: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                  pink_prob: float = 0.5) -> torch.Tensor:
    """``(n, t)`` float32 noise, each row white (flat spectrum) or, with probability ``pink_prob``, pink
    (power falling as 1/f, shaped in the FFT domain). Rows have arbitrary scale; :func:`add_noise` sets it."""
    device = torch.device(device)
    src = generator.device if generator is not None else device
    white = torch.randn((n, t), generator=generator, device=src).to(device)
    pink = _rand((n,), generator, device) < pink_prob
    spec = torch.fft.rfft(white, dim=1)
    f = torch.arange(spec.shape[1], device=device).clamp_min(1).float()
    gain = torch.where(pink[:, None], f.rsqrt()[None, :], torch.ones((), device=device))
    return torch.fft.irfft(spec * gain, n=t, dim=1)


def add_noise(wave: torch.Tensor, snr_db: tuple[float, float] = (10.0, 30.0), prob: float = 1.0,
              generator: torch.Generator | None = None, noise_bank: torch.Tensor | None = None) -> torch.Tensor:
    """Mix background noise into float waves ``(N, T)`` at a random signal-to-noise ratio.

    Each clip, with probability ``prob``, gets noise at an SNR drawn uniformly from ``snr_db`` (dB). The SNR is
    the ratio of mean powers over the whole clip (padding included); a silent clip stays silent. The noise is a
    random row of ``noise_bank`` (``(K, L)`` int16 or float on the batch's device, see :func:`load_noise_bank`)
    read from a random offset (wrapping around when ``L < T``), or, with ``noise_bank=None``, generated
    white/pink noise (:func:`colored_noise`). The result is not clipped.
    """
    _check_batch(wave, "wave", 2)
    if not wave.is_floating_point():
        raise TypeError(f"add_noise needs float waves, got {wave.dtype}")
    lo, hi = _check_range("snr_db", snr_db)
    if prob <= 0:
        return wave
    n, t = wave.shape
    dev = wave.device
    apply = _rand((n,), generator, dev) < prob
    snr = lo + (hi - lo) * _rand((n,), generator, dev)
    if noise_bank is None:
        noise = colored_noise(n, t, generator, dev)
    else:
        _check_batch(noise_bank, "noise_bank", 2)
        if noise_bank.device != dev:
            raise ValueError(f"noise_bank is on {noise_bank.device}, the batch on {dev}; move it once with .to()")
        k, length = noise_bank.shape
        row = _randint(k, (n,), generator, dev)
        offset = _randint(length - t + 1 if length >= t else length, (n,), generator, dev)
        idx = (offset[:, None] + torch.arange(t, device=dev)[None, :]) % length
        noise = noise_bank[row[:, None], idx]
        noise = noise.float() / INT16_SCALE if not noise.is_floating_point() else noise.float()
    p_signal = wave.float().square().mean(1)
    p_noise = noise.square().mean(1).clamp_min(1e-20)
    scale = torch.sqrt(p_signal / (p_noise * 10.0 ** (snr / 10.0)))
    scale = torch.where(apply, scale, torch.zeros((), device=dev))
    return (wave + scale[:, None] * noise).to(wave.dtype)


def load_noise_bank(folder: str | os.PathLike, sample_rate: int, num_samples: int) -> torch.Tensor:
    """Read every WAV/FLAC/OGG file under ``folder`` (recursively, sorted) into an int16 tensor ``(K, num_samples)``.

    Files are mixed to mono and resampled to ``sample_rate``. A file at least ``num_samples`` long is cut into
    consecutive segments of ``num_samples``, plus one that ends at the file's end if samples are left over; a
    shorter file is repeated to fill one segment. So a minute of noise gives many distinct rows. The bank's size
    is about the total noise duration (int16: 32 KB per second at 16 kHz). Raises ``DataError`` for a missing
    folder, a folder without audio, or any unreadable file (naming it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: noise folder does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise DataError(f"{folder}: no noise clips ({', '.join(AUDIO_EXTENSIONS)}) in the folder")
    rows = []
    for path in files:
        wave, _ = read_audio(path, sample_rate)
        x = torch.from_numpy(wave)
        if x.numel() >= num_samples:
            starts = list(range(0, x.numel() - num_samples + 1, num_samples))
            if starts[-1] + num_samples < x.numel():
                starts.append(x.numel() - num_samples)  # the tail, overlapping the previous segment
            rows.append(torch.stack([x[s:s + num_samples] for s in starts]))
        else:
            rows.append(x.repeat(-(-num_samples // x.numel()))[None, :num_samples])
    return torch.from_numpy(to_int16(torch.cat(rows).numpy()))


def spec_augment(spec: torch.Tensor, freq_masks: int = 2, freq_width: int = 7, time_masks: int = 2,
                 time_width: int = 12, generator: torch.Generator | None = None,
                 mask_value: float = 0.0) -> torch.Tensor:
    """SpecAugment's frequency and time masking (Park et al. 2019) on features ``(N, F, frames)``.

    Each sample gets ``freq_masks`` bands of ``w ~ U{0..freq_width}`` consecutive feature rows and ``time_masks``
    spans of ``U{0..time_width}`` frames, at uniform positions that keep the mask inside the spectrogram, all
    set to ``mask_value`` (0 = the mean after normalisation). Masks may overlap. No time warping.
    """
    _check_batch(spec, "spec", 3)
    n, f, t = spec.shape
    mask = (_span_mask(n, f, freq_masks, freq_width, generator, spec.device)[:, :, None]
            | _span_mask(n, t, time_masks, time_width, generator, spec.device)[:, None, :])
    return spec.masked_fill(mask, mask_value)


def _span_mask(n: int, size: int, count: int, max_width: int, generator: torch.Generator | None,
               device: torch.device) -> torch.Tensor:
    """``(n, size)`` bool: the union of ``count`` random spans per row, widths uniform in ``[0, max_width]``."""
    if count <= 0 or max_width <= 0:
        return torch.zeros((n, size), dtype=torch.bool, device=device)
    max_width = min(max_width, size)
    width = _randint(max_width + 1, (n, count), generator, device)
    start = _randint(size - width + 1, (n, count), generator, device)
    pos = torch.arange(size, device=device)[None, None, :]
    return ((pos >= start[..., None]) & (pos < (start + width)[..., None])).any(dim=1)


def speed_perturb(wave: torch.Tensor, factors: Sequence[float] = (0.9, 1.0, 1.1),
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Play each clip of float ``(N, T)`` at a speed drawn from ``factors`` (tempo and pitch change together,
    like Kaldi's/sox's ``speed``), then centre-crop or pad back to ``T``.

    Each sample draws its own factor. The whole batch is resampled once per distinct factor (a cheap strided
    convolution, :func:`~resnetlab.data.audio.resample`) and each sample keeps its own version: ``len(factors)``
    times the work of one resampling, but no loop over the batch and no host synchronisation. Factors are
    rounded to a ratio with denominator <= 100.
    """
    _check_batch(wave, "wave", 2)
    if not wave.is_floating_point():
        raise TypeError(f"speed_perturb needs float waves, got {wave.dtype}")
    factors = [float(f) for f in factors]
    if not factors or min(factors) <= 0:
        raise ValueError(f"speed factors must be a non-empty list of positive numbers, got {factors}")
    n, t = wave.shape
    choice = _randint(len(factors), (n,), generator, wave.device)
    out = wave
    for i, factor in enumerate(factors):  # a loop over the few factors, not over the batch
        if factor == 1.0:
            version = wave
        else:
            ratio = Fraction(factor).limit_denominator(100)
            version = center_fit(resample(wave, ratio.numerator, ratio.denominator), t)
        out = torch.where((choice == i)[:, None], version, out)
    return out


def _check_batch(x: torch.Tensor, name: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != ndim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor with {ndim} dimensions, got {shape}")


def _check_range(name: str, value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}") from None
    if lo > hi:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return lo, hi
