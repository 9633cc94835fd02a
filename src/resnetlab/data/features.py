"""Speech front-ends on whole batches, in torch: log-mel spectrogram and MFCC.

``LogMel`` and ``MFCC`` are ``nn.Module``s whose constants (Hann window, mel filterbank, DCT matrix) are
buffers, so ``.to(device)`` moves them and the forward pass is tensor code only (no Python loop over the
batch): the same module runs on CPU and CUDA and can be exported with the model later. Inputs are float waves
in [-1, 1) (int16 / 32768) of shape ``(N, T)``.

Conventions (checked against librosa in the tests): periodic Hann window of ``win_length`` centred in
``n_fft``, frames centred on ``t * hop_length`` with zero padding (librosa >= 0.10's ``pad_mode="constant"``),
Slaney mel scale and Slaney area normalisation (librosa's defaults; torchaudio defaults to HTK without
normalisation), natural log.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

MEL_SCALES = ("slaney", "htk")
MEL_NORMS = ("slaney", None)


def ms_to_samples(ms: float, sample_rate: int) -> int:
    """A duration in milliseconds as a whole number of samples (rounded): ``ms_to_samples(25, 16000) == 400``."""
    return int(round(ms * sample_rate / 1000.0))


def hz_to_mel(f: torch.Tensor, mel_scale: str = "slaney") -> torch.Tensor:
    """Hz -> mel. ``"htk"``: 2595 log10(1 + f / 700). ``"slaney"``: linear (3 / 200 mel per Hz) below 1 kHz,
    logarithmic above (27 mels per factor 6.4), as in Slaney's Auditory Toolbox and librosa."""
    if mel_scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    _check_choice("mel_scale", mel_scale, MEL_SCALES)
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
    return torch.where(f >= min_log_hz, min_log_mel + torch.log(f.clamp_min(min_log_hz) / min_log_hz) / logstep,
                       f / f_sp)


def mel_to_hz(m: torch.Tensor, mel_scale: str = "slaney") -> torch.Tensor:
    """Inverse of :func:`hz_to_mel`."""
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    _check_choice("mel_scale", mel_scale, MEL_SCALES)
    f_sp, min_log_hz, min_log_mel, logstep = 200.0 / 3, 1000.0, 15.0, math.log(6.4) / 27.0
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                   norm: str | None = "slaney", mel_scale: str = "slaney", *, n_fft: int | None = None) -> torch.Tensor:
    """Triangular mel filters as a float32 matrix ``(n_freqs, n_mels)``: ``power_spec.T @ fb`` gives mel energies.

    ``n_mels + 2`` points evenly spaced on the mel scale from ``f_min`` to ``f_max`` are the filters' feet and
    peaks; triangles are drawn in Hz over the FFT bin frequencies (librosa's and torchaudio's construction).
    Bin ``k`` is at ``k * sample_rate / n_fft``; without ``n_fft`` the bins are spread evenly from 0 to
    ``sample_rate / 2`` (exact for even ``n_fft = 2 * (n_freqs - 1)``). ``norm="slaney"`` divides each triangle by
    its width in Hz so all filters have the same area (librosa's default); ``None`` leaves peaks at 1 (HTK,
    torchaudio's default). A filter that falls between two FFT bins would be all zero: that warns.
    """
    _check_choice("norm", norm, MEL_NORMS)
    _check_choice("mel_scale", mel_scale, MEL_SCALES)
    if not 0.0 <= f_min < f_max <= sample_rate / 2 + 1e-9:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2 = {sample_rate / 2}, got f_min={f_min}, "
                         f"f_max={f_max}")
    if n_mels < 1 or n_freqs < 2:
        raise ValueError(f"need n_mels >= 1 and n_freqs >= 2, got n_mels={n_mels}, n_freqs={n_freqs}")
    if n_fft is None:
        freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)
    else:
        freqs = torch.arange(n_freqs, dtype=torch.float64) * (sample_rate / n_fft)
    lo, hi = hz_to_mel(torch.tensor([float(f_min), float(f_max)], dtype=torch.float64), mel_scale)
    f_pts = mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64), mel_scale)
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1,)
    slopes = f_pts[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    rising = -slopes[:, :-2] / f_diff[:-1]
    falling = slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    if norm == "slaney":
        fb = fb * (2.0 / (f_pts[2:] - f_pts[:-2]))[None, :]
    empty = (fb.max(dim=0).values == 0).nonzero().flatten().tolist()
    if empty:
        warnings.warn(f"mel filters {empty} of {n_mels} are empty: too many mel bands ({n_mels}) for the FFT "
                      f"resolution ({n_freqs} bins); use fewer bands or a larger n_fft", stacklevel=2)
    return fb.float()


def dct_matrix(n_mfcc: int, n_mels: int) -> torch.Tensor:
    """Orthonormal DCT-II as a float32 matrix ``(n_mels, n_mfcc)``: ``logmel.T @ dct`` = scipy's
    ``dct(logmel, type=2, norm="ortho")[:n_mfcc]``."""
    if not 1 <= n_mfcc <= n_mels:
        raise ValueError(f"need 1 <= n_mfcc <= n_mels, got n_mfcc={n_mfcc}, n_mels={n_mels}")
    n = torch.arange(n_mels, dtype=torch.float64)
    k = torch.arange(n_mfcc, dtype=torch.float64)
    dct = torch.cos(math.pi / n_mels * (n[:, None] + 0.5) * k[None, :]) * math.sqrt(2.0 / n_mels)
    dct[:, 0] *= 1.0 / math.sqrt(2.0)
    return dct.float()


class LogMel(nn.Module):
    """Log-mel spectrogram of a batch: float waves ``(N, T)`` -> ``(N, n_mels, frames)`` (a 1-D wave ``(T,)``
    gives ``(n_mels, frames)``).

    Args:
        sample_rate: of the input, Hz.
        n_fft: FFT size, samples (512 = 32 ms at 16 kHz).
        win_length: Hann window length, samples, <= n_fft (400 = 25 ms); :func:`ms_to_samples` converts ms.
        hop_length: frame step, samples (160 = 10 ms); ``frames = 1 + T // hop_length`` with ``center``.
        n_mels: mel bands.
        f_min, f_max: filterbank range, Hz; ``f_max=None`` is ``sample_rate / 2``. 20 Hz drops DC and hum.
        power: 2 for a power spectrogram, 1 for magnitude.
        log_floor: mel energies are clamped to at least this before the log (1e-6: about 87 dB below a
            full-scale tone's band energy, and above int16 quantisation noise, so digital silence is flat).
        top_db: if set, also clamp each utterance to at most ``top_db`` decibels below its own maximum.
        center: pad ``n_fft // 2`` on both sides so frame ``t`` is centred on sample ``t * hop_length``.
        pad_mode: padding for ``center`` (``"constant"``: zeros, as librosa >= 0.10; ``"reflect"``: torch's default).
        norm, mel_scale: see :func:`mel_filterbank`.

    Output is the natural log of the mel energies (not dB; multiply by 10 / ln 10 for dB of power).
    Computed in the module's dtype (float32 unless moved with ``.to(dtype)``) whatever the input's; run it
    outside autocast (``AudioPipeline`` does), since a bf16 filterbank product loses the quiet bands.
    """

    def __init__(self, sample_rate: int = 16000, n_fft: int = 512, win_length: int = 400, hop_length: int = 160,
                 n_mels: int = 40, f_min: float = 20.0, f_max: float | None = None, power: float = 2.0,
                 log_floor: float = 1e-6, top_db: float | None = None, center: bool = True,
                 pad_mode: str = "constant", norm: str | None = "slaney", mel_scale: str = "slaney"):
        super().__init__()
        if not 0 < win_length <= n_fft:
            raise ValueError(f"need 0 < win_length <= n_fft, got win_length={win_length}, n_fft={n_fft}")
        if hop_length <= 0:
            raise ValueError(f"hop_length must be > 0 samples, got {hop_length}")
        if power <= 0 or log_floor <= 0:
            raise ValueError(f"power and log_floor must be > 0, got power={power}, log_floor={log_floor}")
        if top_db is not None and top_db <= 0:
            raise ValueError(f"top_db must be > 0 dB or None, got {top_db}")
        _check_choice("pad_mode", pad_mode, ("constant", "reflect", "replicate", "circular"))
        self.sample_rate, self.n_fft, self.win_length, self.hop_length = sample_rate, n_fft, win_length, hop_length
        self.n_mels, self.f_min = n_mels, float(f_min)
        self.f_max = float(f_max) if f_max is not None else sample_rate / 2
        self.power, self.log_floor, self.top_db = float(power), float(log_floor), top_db
        self.center, self.pad_mode = center, pad_mode
        # Buffers follow .to(device) but are derived from the arguments, so they stay out of the state dict.
        self.register_buffer("window", torch.hann_window(win_length, periodic=True), persistent=False)
        self.register_buffer("fb", mel_filterbank(n_fft // 2 + 1, self.f_min, self.f_max, n_mels, sample_rate,
                                                  norm, mel_scale, n_fft=n_fft), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        """Frames for a wave of ``num_samples`` samples."""
        if self.center:
            return 1 + num_samples // self.hop_length
        return 1 + (num_samples - self.n_fft) // self.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        single = wave.dim() == 1
        if single:
            wave = wave[None]
        if wave.dim() != 2:
            raise ValueError(f"expected float waves (N, T) or (T,), got shape {tuple(wave.shape)}")
        spec = torch.stft(wave.to(self.window.dtype), self.n_fft, self.hop_length, self.win_length, window=self.window,
                          center=self.center, pad_mode=self.pad_mode, normalized=False, onesided=True,
                          return_complex=True)  # (N, n_fft // 2 + 1, frames)
        power = spec.real.square() + spec.imag.square()  # |X|^2 without the sqrt of abs()
        if self.power != 2.0:
            power = power.pow(self.power / 2.0)
        mel = torch.matmul(self.fb.T, power)  # (n_mels, F) @ (N, F, frames) -> (N, n_mels, frames)
        logmel = torch.log(mel.clamp_min(self.log_floor))
        if self.top_db is not None:
            # value = |X|^power, so 1 dB is ln(10) * power / 20 in natural-log units.
            floor = logmel.amax(dim=(1, 2), keepdim=True) - self.top_db * math.log(10.0) * self.power / 20.0
            logmel = torch.maximum(logmel, floor)
        return logmel[0] if single else logmel

    def extra_repr(self) -> str:
        return (f"sample_rate={self.sample_rate}, n_fft={self.n_fft}, win_length={self.win_length}, "
                f"hop_length={self.hop_length}, n_mels={self.n_mels}, f_min={self.f_min}, f_max={self.f_max}")


class MFCC(nn.Module):
    """MFCCs of a batch: float waves ``(N, T)`` -> ``(N, n_mfcc, frames)``.

    The first ``n_mfcc`` coefficients of an orthonormal DCT-II over the :class:`LogMel` bands (natural-log
    energies; torchaudio's and librosa's MFCC take the DCT of dB values, 10 / ln 10 = 4.34 times larger).
    No liftering. Other keyword arguments go to :class:`LogMel`.
    """

    def __init__(self, n_mfcc: int = 40, **logmel_kwargs):
        super().__init__()
        self.logmel = LogMel(**logmel_kwargs)
        self.n_mfcc = n_mfcc
        self.register_buffer("dct", dct_matrix(n_mfcc, self.logmel.n_mels), persistent=False)

    def num_frames(self, num_samples: int) -> int:
        return self.logmel.num_frames(num_samples)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.dct.T, self.logmel(wave))  # (n_mfcc, n_mels) @ (..., n_mels, frames)


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
