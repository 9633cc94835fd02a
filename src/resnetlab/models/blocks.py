"""Residual blocks, written plainly (torchvision style): explicit ``forward`` lines, an ``expansion`` attribute.

Post-activation blocks (He et al. 2015) and pre-activation blocks (He et al. 2016, "Identity Mappings in
Deep Residual Networks") are separate classes. Every block works in 1-D or 2-D (``ndim``) and can drop its
shortcut (``residual=False``) to give the paper's *plain* network of the same depth.
"""

from __future__ import annotations

import torch
from torch import nn

from resnetlab.models.layers import conv, norm


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34, CIFAR ResNets). The stride sits on the first conv."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, ndim: int = 2, groups: int = 1, base_width: int = 64, dilation: int = 1,
                 kernel_size: int = 3, bias: bool = False, residual: bool = True):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock supports only groups=1 and base_width=64, got {groups}, {base_width}")
        self.conv1 = conv(ndim, inplanes, planes, kernel_size, stride, dilation=dilation, bias=bias)
        self.bn1 = norm(ndim, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(ndim, planes, planes, kernel_size, dilation=dilation, bias=bias)
        self.bn2 = norm(ndim, planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4): ResNet-50/101/152, ResNeXt, Wide ResNet.

    Departure from the paper: by default the stride sits on the 3x3 conv ("ResNet v1.5", torchvision, timm),
    which is about 0.5% more accurate on ImageNet. ``stride_in_1x1=True`` puts it on the first 1x1 as in
    He et al. (2015) and Keras' ResNet50.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, ndim: int = 2, groups: int = 1, base_width: int = 64, dilation: int = 1,
                 kernel_size: int = 3, bias: bool = False, residual: bool = True,
                 stride_in_1x1: bool = False):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv(ndim, inplanes, width, 1, s1, bias=bias)
        self.bn1 = norm(ndim, width)
        self.conv2 = conv(ndim, width, width, kernel_size, s3, groups=groups, dilation=dilation, bias=bias)
        self.bn2 = norm(ndim, width)
        self.conv3 = conv(ndim, width, planes * self.expansion, 1, bias=bias)
        self.bn3 = norm(ndim, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv twice; the shortcut adds onto an un-activated path (He et al. 2016, Fig. 1b).

    When the block changes shape, the projection takes the *pre-activated* input, as in the authors' code.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, ndim: int = 2, groups: int = 1, base_width: int = 64, dilation: int = 1,
                 kernel_size: int = 3, bias: bool = False, residual: bool = True):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"PreActBasicBlock supports only groups=1 and base_width=64, got {groups}, {base_width}")
        self.bn1 = norm(ndim, inplanes)
        self.conv1 = conv(ndim, inplanes, planes, kernel_size, stride, dilation=dilation, bias=bias)
        self.bn2 = norm(ndim, planes)
        self.conv2 = conv(ndim, planes, planes, kernel_size, dilation=dilation, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut if self.residual else out

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)  # no BN closes the branch: zero its last conv instead


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al. 2016): BN-ReLU-1x1, BN-ReLU-3x3 (stride here), BN-ReLU-1x1."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 *, ndim: int = 2, groups: int = 1, base_width: int = 64, dilation: int = 1,
                 kernel_size: int = 3, bias: bool = False, residual: bool = True):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.bn1 = norm(ndim, inplanes)
        self.conv1 = conv(ndim, inplanes, width, 1, bias=bias)
        self.bn2 = norm(ndim, width)
        self.conv2 = conv(ndim, width, width, kernel_size, stride, groups=groups, dilation=dilation, bias=bias)
        self.bn3 = norm(ndim, width)
        self.conv3 = conv(ndim, width, planes * self.expansion, 1, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + shortcut if self.residual else out

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)


BLOCKS = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "preact_basic": PreActBasicBlock,
    "preact_bottleneck": PreActBottleneck,
}
PREACT_BLOCKS = (PreActBasicBlock, PreActBottleneck)
