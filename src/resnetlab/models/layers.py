"""Dimension-agnostic building pieces: pick conv / norm / pool by ``ndim`` (1 = signals, 2 = images).

One set of blocks then builds 1-D temporal nets (input ``(N, C, T)``) and 2-D nets (``(N, C, H, W)``),
the way fastai's XResNet does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
_ADAPTIVE_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


def _check_ndim(ndim: int) -> None:
    if ndim not in _CONV:
        raise ValueError(f"ndim must be 1 (signals) or 2 (images), got {ndim!r}")


def conv(ndim: int, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, *,
         groups: int = 1, dilation: int = 1, bias: bool = False) -> nn.Module:
    """A 'same'-padded convolution of ``ndim`` dimensions (padding = dilation * (k - 1) / 2)."""
    _check_ndim(ndim)
    padding = dilation * (kernel_size - 1) // 2
    return _CONV[ndim](in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                       groups=groups, dilation=dilation, bias=bias)


def norm(ndim: int, channels: int, *, affine: bool = True) -> nn.Module:
    _check_ndim(ndim)
    return _NORM[ndim](channels, affine=affine)


class GlobalMaxPool(nn.Module):
    """The maximum over every spatial position, keeping them as size-1 dims: ``AdaptiveMaxPool{1,2}d(1)``'s output.

    Written as ``amax`` because its backward is a deterministic elementwise mask (gradient shared among tied
    maxima), whereas ``AdaptiveMaxPool2d``'s CUDA backward scatters with atomics and refuses to run under
    ``torch.use_deterministic_algorithms`` (``--deterministic``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def max_pool(ndim: int, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> nn.Module:
    _check_ndim(ndim)
    return _MAXPOOL[ndim](kernel_size, stride=stride, padding=padding)


def avg_pool(ndim: int, kernel_size, stride=None, *, ceil_mode: bool = False,
             count_include_pad: bool = True) -> nn.Module:
    _check_ndim(ndim)
    return _AVGPOOL[ndim](kernel_size, stride=stride, ceil_mode=ceil_mode,
                          count_include_pad=count_include_pad)


def global_avg_pool(ndim: int) -> nn.Module:
    _check_ndim(ndim)
    return _ADAPTIVE_AVG[ndim](1)


class PadShortcut(nn.Module):
    """Option A of He et al. (2015): strided identity, extra channels filled with zeros. No parameters.

    This is the shortcut of the paper's CIFAR-10 experiments (ResNet-20 ... 110 at 0.27M ... 1.7M params).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, ndim: int):
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"zero-pad shortcut cannot shrink channels ({in_ch} -> {out_ch})")
        self.pad = out_ch - in_ch
        self.stride = stride
        self.ndim = ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[(..., *([slice(None, None, self.stride)] * self.ndim))]
        if self.pad:
            # F.pad pads from the last dim backwards: (spatial dims..., channels)
            x = F.pad(x, (0, 0) * self.ndim + (0, self.pad))
        return x

    def extra_repr(self) -> str:
        return f"pad={self.pad}, stride={self.stride}"


SHORTCUTS = ("B", "A", "D")


def make_shortcut(kind: str, ndim: int, in_ch: int, out_ch: int, stride: int, *,
                  bias: bool = False, with_norm: bool = True) -> nn.Module | None:
    """Shortcut for a block whose input and output shapes differ; ``None`` when they match (identity).

    kind: ``"B"`` projection (1x1 conv with stride + BN, the paper's option B, torchvision's ``downsample``);
    ``"A"`` zero-padding identity; ``"D"`` average-pool then 1x1 conv + BN (ResNet-D, Bag of Tricks 2019),
    which keeps the information the strided 1x1 projection throws away. ``with_norm=False`` drops the BN
    after the projection (pre-activation nets, whose next block normalises first).
    """
    if stride == 1 and in_ch == out_ch:
        return None
    if kind == "B":
        proj = conv(ndim, in_ch, out_ch, 1, stride, bias=bias)
        return nn.Sequential(proj, norm(ndim, out_ch)) if with_norm else nn.Sequential(proj)
    if kind == "A":
        return PadShortcut(in_ch, out_ch, stride, ndim)
    if kind == "D":
        pool = (avg_pool(ndim, stride, stride, ceil_mode=True, count_include_pad=False)
                if stride > 1 else nn.Identity())
        proj = conv(ndim, in_ch, out_ch, 1, 1, bias=bias)
        return nn.Sequential(pool, proj, norm(ndim, out_ch)) if with_norm else nn.Sequential(pool, proj)
    raise ValueError(f"unknown shortcut {kind!r}; allowed: {', '.join(SHORTCUTS)}")
