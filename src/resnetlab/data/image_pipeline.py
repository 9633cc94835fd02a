"""The image pipeline: uint8 batches from the cache -> augmented, normalised float model input."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.data.augment import (
    alternating_flip,
    alternating_mask,
    crop_flip_nhwc,
    crop_offsets,
    cutout,
    flip_mask,
    mix,
    random_crop,
    random_flip,
    random_resized_crop,
)
from resnetlab.data.pipeline_base import Pipeline, register_pipeline

FLIP_MODES = ("random", "alternate")


def normalize_images(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0, 1] float) images ``(N, C, H, W)`` -> ``(x / 255 - mean) / std``, with ``mean``/``std`` of shape
    ``(1, C, 1, 1)``: the one definition of the image normalisation, in training, evaluation and exported graphs."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return (x - mean.to(x.device)) / std.to(x.device)


class ImageEvalTransform(nn.Module):
    """:func:`normalize_images` with the pipeline's mean and std as buffers (see ``Pipeline.eval_transform``)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_images(x, self.mean, self.std)


@register_pipeline("image")
class ImagePipeline(Pipeline):
    """Augment (train only) and normalise image batches on the device.

    Args:
        size: (height, width) of the model input; cached images are already this size.
        channels: 1 or 3.
        mean, std: per-channel normalisation in [0, 1] units.
        crop_pad: random crop with reflect padding, pixels (0: off).
        flip: horizontal flips.
        flip_mode: ``"random"`` (each image mirrored with probability 1/2 in every epoch) or ``"alternate"``
            (:func:`~resnetlab.data.augment.alternating_flip`: each image mirrored every other epoch, from a
            random start drawn from ``flip_seed``). Alternating needs the batch's sample indices; a batch that
            comes without them (``lr-find``'s sweep) gets random flips.
        rrc: random-resized-crop (scale ``rrc_scale``) instead of padding crops.
        cutout: cutout square side, pixels (0: off).
        mixup, cutmix: alphas (0: off); targets become soft probabilities.
    """

    def __init__(self, size: tuple[int, int], channels: int, mean: list[float], std: list[float],
                 num_classes: int, *, crop_pad: int = 0, flip: bool = True, flip_mode: str = "random",
                 flip_seed: int = 0, rrc: bool = False, rrc_scale: tuple[float, float] = (0.35, 1.0), cutout: int = 0,
                 mixup: float = 0.0, cutmix: float = 0.0):
        if flip_mode not in FLIP_MODES:
            raise ValueError(f"flip_mode must be one of {', '.join(FLIP_MODES)}, got {flip_mode!r}")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values, got {list(mean)} / {list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.size = (int(size[0]), int(size[1]))
        self.channels = int(channels)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.num_classes = int(num_classes)
        self.crop_pad, self.flip, self.rrc = int(crop_pad), bool(flip), bool(rrc)
        self.flip_mode, self.flip_seed = flip_mode, int(flip_seed)
        self.rrc_scale = (float(rrc_scale[0]), float(rrc_scale[1]))
        self.cutout, self.mixup, self.cutmix = int(cutout), float(mixup), float(cutmix)
        self._mean_t = torch.tensor(self.mean).view(1, -1, 1, 1)
        self._std_t = torch.tensor(self.std).view(1, -1, 1, 1)
        self.train_size = self.size  # smaller while progressive resizing runs (set_train_scale); not saved
        # training batches' dtype and layout (set_output; not saved): float32 NCHW unless the trainer asks
        self.out_dtype, self.out_channels_last = torch.float32, False
        self._scale_t = (1.0 / (255.0 * torch.tensor(self.std)))  # x * scale + shift == (x / 255 - mean) / std
        self._shift_t = -torch.tensor(self.mean) / torch.tensor(self.std)

    def set_output(self, dtype: torch.dtype | None, channels_last: bool) -> None:
        """Write training batches in ``dtype`` (the autocast dtype; ``None``: float32) and, with
        ``channels_last``, in that layout: the model's first layer then reads them as they are, with no cast or
        layout pass over the batch (the uint8 crop/flip path writes them directly)."""
        self.out_dtype, self.out_channels_last = dtype or torch.float32, bool(channels_last)

    def set_train_scale(self, scale: float, min_side: int = 8) -> None:
        """Training batches at ``scale`` of the full size, rounded to a multiple of 4 pixels (few distinct shapes,
        so few new convolution kernels), at least 8 pixels and ``min_side``; the full size from ``scale`` 1 on."""
        if scale >= 1.0:
            self.train_size = self.size
        else:
            low = max(8, 4 * math.ceil(min_side / 4))
            self.train_size = tuple(min(max(low, 4 * round(side * scale / 4)), side) for side in self.size)

    def to(self, device) -> ImagePipeline:
        self._mean_t, self._std_t = self._mean_t.to(device), self._std_t.to(device)
        self._scale_t, self._shift_t = self._scale_t.to(device), self._shift_t.to(device)
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> normalised float (:func:`normalize_images`)."""
        return normalize_images(x, self._mean_t, self._std_t)

    def eval_transform(self) -> ImageEvalTransform:
        return ImageEvalTransform(self.mean, self.std).to(self._mean_t.device)

    def __call__(self, x, y, train, generator=None, index=None, epoch=0):
        if train and self._direct(x):
            return self._crop_flip_direct(x, generator, index, epoch), y
        x = x.float().div_(255)
        if train:
            if self.rrc:  # straight to the training size: one resampling
                x = random_resized_crop(x, self.train_size, self.rrc_scale, generator=generator)
            elif self.crop_pad:
                x = random_crop(x, self.crop_pad, generator)
            if self.flip and self.flip_mode == "alternate" and index is not None:
                x = alternating_flip(x, index, epoch, self.flip_seed)
            elif self.flip:
                x = random_flip(x, generator)
            if self.cutout:
                x = cutout(x, self.cutout, generator)
            if tuple(x.shape[-2:]) != self.train_size:
                x = F.interpolate(x, size=self.train_size, mode="bilinear", antialias=True, align_corners=False)
        x = self.normalize(x)
        if train and y is not None and (self.mixup or self.cutmix):
            x, y = mix(x, y, self.num_classes, self.mixup, self.cutmix)
        return x, y

    def _direct(self, x: torch.Tensor) -> bool:
        """Whether the training batch takes the direct path: uint8 images, at most a padded crop and a flip."""
        return (x.dtype == torch.uint8 and x.dim() == 4 and not self.rrc and not self.cutout and not self.mixup
                and not self.cutmix and self.train_size == self.size and self.crop_pad < min(self.size))

    def _crop_flip_direct(self, x: torch.Tensor, generator, index, epoch: int) -> torch.Tensor:
        """The crop and flip as one uint8 gather into channels-last, then one pass that normalises and writes
        ``out_dtype``: two passes over the batch, against about eight float32 passes and a layout change on the
        general path. Same random draws in the same order, so the same images (to float32 rounding)."""
        n, dev = x.shape[0], x.device
        offsets = crop_offsets(n, self.crop_pad, generator, dev) if self.crop_pad else None
        flip = None
        if self.flip and self.flip_mode == "alternate" and index is not None:
            flip = alternating_mask(index, epoch, self.flip_seed, dev)
        elif self.flip:
            flip = flip_mask(n, generator, dev)
        nhwc = crop_flip_nhwc(x, self.crop_pad, offsets, flip)
        out = torch.empty(nhwc.shape, dtype=self.out_dtype, device=dev)
        torch.addcmul(self._shift_t, nhwc, self._scale_t, out=out)  # computed in float32, stored as out_dtype
        out = out.permute(0, 3, 1, 2)  # NCHW indexing over channels-last memory
        return out if self.out_channels_last else out.contiguous()

    def input_size(self) -> tuple[int, ...]:
        return (self.channels, *self.size)

    def config(self) -> dict:
        cfg = {"modality": "image", "size": list(self.size), "channels": self.channels, "mean": self.mean,
               "std": self.std, "num_classes": self.num_classes, "crop_pad": self.crop_pad, "flip": self.flip,
               "rrc": self.rrc, "rrc_scale": list(self.rrc_scale), "cutout": self.cutout, "mixup": self.mixup,
               "cutmix": self.cutmix}
        if self.flip_mode != "random":  # only when used: checkpoints of random-flip runs stay readable by older code
            cfg.update(flip_mode=self.flip_mode, flip_seed=self.flip_seed)
        return cfg

    @classmethod
    def from_config(cls, cfg: dict) -> ImagePipeline:
        cfg = {k: v for k, v in cfg.items() if k != "modality"}
        return cls(**cfg)
