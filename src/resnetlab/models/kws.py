"""Keyword-spotting ResNets of Tang & Lin (2018), "Deep Residual Learning for Small-Footprint Keyword Spotting".

2-D nets over an MFCC or log-mel "image" ``(N, 1, n_mels, frames)``, all convolutions 45 (or 19, "narrow")
channels wide, no striding. Their layer order differs from He et al.'s block, so they get their own block:
conv-ReLU-BN, conv-ReLU, add the shortcut, then BN. The paper's BN has no affine parameters.
Parameter counts match Table 1 of the paper (res15: 238K, res8: 110K, res26: 438K with 12 classes).
"""

from __future__ import annotations

import torch
from torch import nn

from resnetlab.models.layers import conv, norm
from resnetlab.models.resnet import ClassifierBase


class TangLinBlock(nn.Module):
    """conv-ReLU-BN, conv-ReLU, + shortcut, BN (the order of the paper's reference code, honk)."""

    def __init__(self, channels: int, dilation1: int = 1, dilation2: int = 1, residual: bool = True):
        super().__init__()
        self.conv1 = conv(2, channels, channels, 3, dilation=dilation1)
        self.bn1 = norm(2, channels, affine=False)
        self.conv2 = conv(2, channels, channels, 3, dilation=dilation2)
        self.bn2 = norm(2, channels, affine=False)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.relu(self.conv1(x)))
        out = self.relu(self.conv2(out))
        if self.residual:
            out = out + x
        return self.bn2(out)


class KWSResNet(ClassifierBase):
    """res8 / res15 / res26 and their narrow versions.

    Args:
        n_layers: convolutions after the first one (res8: 6, res15: 13, res26: 24); pairs form residual
            blocks, an odd one out is a last plain conv-ReLU-BN.
        channels: 45 (paper) or 19 (narrow).
        pool: average pooling after the first conv, e.g. ``(4, 3)`` for res8, ``(2, 2)`` for res26.
        dilation: exponentially growing dilation ``2 ** (i // 3)`` for conv i (res15), so the receptive
            field covers the whole 1 s clip without pooling.
    """

    def __init__(self, n_layers: int = 13, channels: int = 45, pool: tuple[int, int] | None = None,
                 dilation: bool = True, *, num_classes: int = 12, in_chans: int = 1, residual: bool = True,
                 drop_rate: float = 0.0, head_hidden: int | None = None):
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"n_layers must be >= 2, got {n_layers}")
        self.ndim = 2
        self.in_chans = in_chans
        self.conv1 = conv(2, in_chans, channels, 3)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(pool) if pool else nn.Identity()

        def dil(i: int) -> int:
            return 2 ** (i // 3) if dilation else 1

        self.layer1 = nn.Sequential(*[TangLinBlock(channels, dil(2 * b), dil(2 * b + 1), residual)
                                      for b in range(n_layers // 2)])
        if n_layers % 2:
            last = n_layers - 1
            self.tail = nn.Sequential(conv(2, channels, channels, 3, dilation=dil(last)),
                                      nn.ReLU(inplace=True), norm(2, channels, affine=False))
        else:
            self.tail = nn.Identity()
        self.stage_names = ["layer1"]
        self.num_features = channels
        self._init_head(num_classes, drop_rate, head_hidden)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        return self.tail(self.layer1(x))
