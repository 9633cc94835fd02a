"""The audio pipeline: int16 waves from the cache, on the device -> augmented, normalised features -> model input.

Training order: waves as float -> speed perturbation -> time shift -> background noise -> log-mel or MFCC ->
normalisation -> SpecAugment masks -> layout. Evaluation: features -> normalisation -> layout, deterministic.
``config()`` holds every setting, so a checkpoint rebuilds the exact front-end with ``build_pipeline``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from resnetlab.data import audio_augment as aug
from resnetlab.data.audio import INT16_SCALE
from resnetlab.data.features import MFCC, LogMel, ms_to_samples
from resnetlab.data.pipeline_base import Pipeline, register_pipeline

FEATURES = ("logmel", "mfcc")
LAYOUTS = ("2d", "1d")
NORMALIZATIONS = ("utterance", "global", "none")
_EPS = 1e-5


@register_pipeline("audio")
class AudioPipeline(Pipeline):
    """Speech front-end and augmentation for a batch of fixed-length int16 waves ``(N, num_samples)``.

    Args (units in the names; sizes in samples unless ``_ms``):
        num_classes: classes of the targets (recorded for checkpoints; targets pass through unchanged).
        sample_rate, num_samples: what the cache holds (e.g. 16000 and 16000 for 1 s clips).
        features: ``"logmel"`` (``n_mels`` bands) or ``"mfcc"`` (the first ``n_mfcc`` DCT coefficients of
            ``n_mels`` log-mel bands); see :mod:`resnetlab.data.features`.
        n_fft, win_length, hop_length, f_min, f_max: STFT and filterbank, as in :class:`LogMel`. The defaults
            (25 ms windows, 10 ms hop, 40 bands from 20 Hz) give 1 s -> ``(40, 101)``, the input of res8/res15
            and of the TC-ResNets.
        layout: ``"2d"`` -> ``(N, 1, F, frames)`` for 2-D nets (res8, res15, any image ResNet with
            ``in_chans=1``); ``"1d"`` -> ``(N, F, frames)`` for 1-D nets whose channels are the F features.
        normalize: ``"utterance"``: each example minus its own mean, over its own std (one scalar each over all
            features and frames: removes the recording level, keeps the spectral shape, and does not blow up
            empty bands the way per-band normalisation does on 8 kHz audio upsampled to 16 kHz); ``"global"``:
            fixed ``mean`` and ``std`` scalars from :meth:`fit_normalization`; ``"none"``.
        time_shift_ms: each training clip moves by up to this much, either way (0: off).
        noise_prob, snr_db: probability of mixing background noise into a training clip, and the SNR range in
            dB it is drawn from. ``noise_dir``: a folder of noise recordings (loaded on first use, cut into
            segments of ``2 * num_samples`` so each draw also gets a random offset); ``None``: white/pink noise.
        spec_augment, freq_masks, freq_width, time_masks, time_width: SpecAugment masking after
            normalisation (masked values become 0, the mean); widths are maxima, in feature rows and frames.
        speed_perturb, speed_factors: per-clip speed change by a factor drawn from ``speed_factors``.

    Defaults follow common keyword-spotting practice (Tang & Lin's res8/res15 front-end: 40 bands, 25/10 ms;
    100 ms shift as in honk; SNRs of 10-30 dB are typical background levels for Speech Commands). Speed
    perturbation is off: it also changes pitch, and costs ``len(speed_factors)`` resamplings per batch.
    """

    def __init__(self, *, num_classes: int = 0, sample_rate: int = 16000, num_samples: int = 16000,
                 features: str = "logmel", n_mels: int = 40, n_mfcc: int = 40, n_fft: int = 512,
                 win_length: int = 400, hop_length: int = 160, f_min: float = 20.0, f_max: float | None = None,
                 layout: str = "2d", normalize: str = "utterance", mean: float | None = None,
                 std: float | None = None, time_shift_ms: float = 100.0, noise_prob: float = 0.5,
                 snr_db: Sequence[float] = (10.0, 30.0), noise_dir: str | os.PathLike | None = None,
                 spec_augment: bool = True, freq_masks: int = 2, freq_width: int = 7, time_masks: int = 2,
                 time_width: int = 12, speed_perturb: bool = False,
                 speed_factors: Sequence[float] = (0.9, 1.0, 1.1)):
        _check_choice("features", features, FEATURES)
        _check_choice("layout", layout, LAYOUTS)
        _check_choice("normalize", normalize, NORMALIZATIONS)
        for name, value in (("num_samples", num_samples), ("sample_rate", sample_rate)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= noise_prob <= 1.0:
            raise ValueError(f"noise_prob must be in [0, 1], got {noise_prob}")
        if time_shift_ms < 0 or min(freq_masks, freq_width, time_masks, time_width) < 0:
            raise ValueError("time_shift_ms and the SpecAugment counts and widths must be >= 0")
        if not speed_factors or min(speed_factors) <= 0:
            raise ValueError(f"speed_factors must be positive numbers, got {list(speed_factors)}")
        if (mean is None) != (std is None) or (std is not None and not std > 0):
            raise ValueError(f"give both mean and std (std > 0) or neither, got mean={mean}, std={std}")
        self.num_classes = int(num_classes)
        self.sample_rate, self.num_samples = sample_rate, num_samples
        self.features, self.layout, self.normalize = features, layout, normalize
        self.n_mels, self.n_mfcc, self.n_fft = n_mels, n_mfcc, n_fft
        self.win_length, self.hop_length = win_length, hop_length
        self.f_min, self.f_max = float(f_min), (float(f_max) if f_max is not None else None)
        self.mean = float(mean) if mean is not None else None
        self.std = float(std) if std is not None else None
        self.time_shift_ms, self.noise_prob = float(time_shift_ms), float(noise_prob)
        self.snr_db = aug._check_range("snr_db", snr_db)
        self.noise_dir = os.fspath(noise_dir) if noise_dir is not None else None
        self.spec_augment, self.freq_masks, self.freq_width = bool(spec_augment), freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.speed_perturb, self.speed_factors = bool(speed_perturb), tuple(float(f) for f in speed_factors)

        logmel_args = dict(sample_rate=sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length,
                           n_mels=n_mels, f_min=self.f_min, f_max=self.f_max)
        self.frontend = MFCC(n_mfcc, **logmel_args) if features == "mfcc" else LogMel(**logmel_args)
        self.num_features = n_mfcc if features == "mfcc" else n_mels
        self._noise_bank: torch.Tensor | None = None

    # --- the Pipeline protocol ---------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, train: bool,
                 generator: torch.Generator | None = None, index: torch.Tensor | None = None,
                 epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x``: int16 waves ``(N, num_samples)`` (float waves in [-1, 1) are accepted too), on the device.

        Returns float32 model input, ``(N, 1, F, frames)`` or ``(N, F, frames)``, and ``y`` unchanged. With
        ``train=True`` the augmentations draw from ``generator`` (reproducible for a given seed).
        """
        wave = self._as_float(x)
        with _no_autocast(wave.device):
            if train:
                wave = self._augment_waves(wave, generator)
            feats = self._normalized(self.frontend(wave))
            if train and self.spec_augment:
                feats = aug.spec_augment(feats, self.freq_masks, self.freq_width, self.time_masks,
                                         self.time_width, generator)
        return (feats[:, None] if self.layout == "2d" else feats), y

    def input_size(self) -> tuple[int, ...]:
        frames = self.frontend.num_frames(self.num_samples)
        return (1, self.num_features, frames) if self.layout == "2d" else (self.num_features, frames)

    def config(self) -> dict:
        return {
            "modality": "audio", "num_classes": self.num_classes,
            "sample_rate": self.sample_rate, "num_samples": self.num_samples,
            "features": self.features, "n_mels": self.n_mels, "n_mfcc": self.n_mfcc, "n_fft": self.n_fft,
            "win_length": self.win_length, "hop_length": self.hop_length, "f_min": self.f_min, "f_max": self.f_max,
            "layout": self.layout, "normalize": self.normalize, "mean": self.mean, "std": self.std,
            "time_shift_ms": self.time_shift_ms, "noise_prob": self.noise_prob, "snr_db": list(self.snr_db),
            "noise_dir": self.noise_dir, "spec_augment": self.spec_augment, "freq_masks": self.freq_masks,
            "freq_width": self.freq_width, "time_masks": self.time_masks, "time_width": self.time_width,
            "speed_perturb": self.speed_perturb, "speed_factors": list(self.speed_factors),
        }

    @classmethod
    def from_config(cls, config: dict) -> AudioPipeline:
        """Rebuild from :meth:`config` (e.g. after a JSON round trip). The noise folder is only read if the
        rebuilt pipeline is used for training, so ``predict`` works where it no longer exists."""
        cfg = dict(config)
        modality = cfg.pop("modality", "audio")
        if modality != "audio":
            raise ValueError(f"not an audio pipeline config (modality={modality!r})")
        return cls(**cfg)

    def to(self, device: torch.device | str) -> AudioPipeline:
        self.frontend.to(device)
        if self._noise_bank is not None:
            self._noise_bank = self._noise_bank.to(device)
        return self

    def eval_transform(self) -> AudioEvalTransform:
        if self.normalize == "global" and self.mean is None:
            raise ValueError("the audio pipeline normalises with global statistics but has none (mean/std unset)")
        return AudioEvalTransform(copy.deepcopy(self.frontend), self.normalize, self.mean, self.std,
                                  self.layout).eval()

    # --- beyond the protocol -----------------------------------------------------------------------------

    @torch.no_grad()
    def features_only(self, x: torch.Tensor) -> torch.Tensor:
        """Un-augmented, un-normalised features ``(N, F, frames)`` (log-mel in natural-log units, or MFCC),
        e.g. to plot example spectrograms."""
        wave = self._as_float(x)
        with _no_autocast(wave.device):
            return self.frontend(wave)

    @torch.no_grad()
    def fit_normalization(self, x: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
        """Set and return the global ``(mean, std)`` of the un-augmented features of waves ``x``
        (int16 ``(N, num_samples)``, e.g. a few thousand clips drawn from the training cache; any device, it is
        processed in chunks on the pipeline's device). Used when ``normalize="global"``."""
        device = self._device()
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, x.shape[0], batch_size):
            feats = self.features_only(x[start:start + batch_size].to(device)).double()
            total += feats.sum().item()
            total_sq += feats.square().sum().item()
            count += feats.numel()
        if count == 0:
            raise ValueError("fit_normalization needs at least one clip")
        mean = total / count
        std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
        if not std > 0:
            raise ValueError("the features of these clips are constant (silence?); cannot normalise by their std")
        self.mean, self.std = mean, std
        return mean, std

    def noise_bank(self) -> torch.Tensor | None:
        """The noise clips from ``noise_dir`` as int16 ``(K, 2 * num_samples)`` on the pipeline's device
        (read on the first call), or ``None`` without a folder (then noise is generated)."""
        if self.noise_dir is None:
            return None
        if self._noise_bank is None:
            self._noise_bank = aug.load_noise_bank(self.noise_dir, self.sample_rate,
                                                   2 * self.num_samples).to(self._device())
        return self._noise_bank

    @property
    def device(self) -> torch.device:
        """Where the front-end's buffers are, and so where batches are featurised (the run report reads it)."""
        return self._device()

    def __repr__(self) -> str:
        size = "x".join(str(s) for s in self.input_size())
        return (f"AudioPipeline({self.features} {self.num_features} @ {self.sample_rate} Hz, "
                f"{self.num_samples} samples -> {size}, normalize={self.normalize})")

    # --- internals ---------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return next(self.frontend.buffers()).device

    def _as_float(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.num_samples:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected waves of shape (N, {self.num_samples}) (int16 at {self.sample_rate} Hz), "
                             f"got {shape}")
        if x.device != self._device():
            self.to(x.device)  # once: the pipeline follows the data
        if x.dtype == torch.int16:
            return x.float() / INT16_SCALE
        if x.is_floating_point():
            return x.float()
        raise TypeError(f"expected int16 (or float) waves, got {x.dtype}")

    def _augment_waves(self, wave: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.speed_perturb:
            wave = aug.speed_perturb(wave, self.speed_factors, generator)
        max_shift = ms_to_samples(self.time_shift_ms, self.sample_rate)
        if max_shift > 0:
            wave = aug.time_shift(wave, max_shift, generator)
        if self.noise_prob > 0:
            wave = aug.add_noise(wave, self.snr_db, self.noise_prob, generator, self.noise_bank())
        return wave

    def _normalized(self, feats: torch.Tensor) -> torch.Tensor:
        if self.normalize == "global" and self.mean is None:
            raise RuntimeError("normalize='global' needs mean and std: call fit_normalization() on a sample "
                               "of the training set first (or pass mean= and std=)")
        return normalize_features(feats, self.normalize, self.mean, self.std)


def normalize_features(feats: torch.Tensor, mode: str, mean: float | None, std: float | None) -> torch.Tensor:
    """Features ``(N, F, frames)`` normalised as ``AudioPipeline(normalize=mode)`` says: the one definition, in
    training, evaluation and exported graphs. ``"utterance"``: each example by its own mean and std;
    ``"global"``: by the fixed ``mean`` and ``std``; ``"none"``: unchanged."""
    if mode == "utterance":
        m = feats.mean(dim=(1, 2), keepdim=True)
        s = feats.std(dim=(1, 2), keepdim=True)
        return (feats - m) / (s + _EPS)
    if mode == "global":
        return (feats - mean) / std
    return feats


class AudioEvalTransform(nn.Module):
    """Waves -> features -> normalisation -> layout, un-augmented (see ``Pipeline.eval_transform``). Takes int16
    waves (as cached) or float waves in [-1, 1) (as exported graphs do), ``(N, num_samples)``."""

    def __init__(self, frontend: nn.Module, normalize: str, mean: float | None, std: float | None, layout: str):
        super().__init__()
        self.frontend = frontend
        self.normalize, self.layout_2d = normalize, layout == "2d"
        self.feat_mean = float(mean) if mean is not None else 0.0
        self.feat_std = float(std) if std is not None else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No autocast guard here (AudioPipeline.__call__ has one): exporters trace this module, and callers that
        # run a network under autocast run this transform outside it (deploy.predictor).
        wave = x.float() / INT16_SCALE if x.dtype == torch.int16 else x.float()
        feats = normalize_features(self.frontend(wave), self.normalize, self.feat_mean, self.feat_std)
        return feats[:, None] if self.layout_2d else feats


def _no_autocast(device: torch.device):
    """Features are computed in float32 even inside an autocast region (log of a bf16 matmul loses bands)."""
    if device.type in ("cuda", "cpu", "mps", "xpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
