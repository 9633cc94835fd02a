"""One configurable ResNet. ImageNet, CIFAR and 1-D audio nets are configurations of this class, not copies.

Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1``.., ``downsample``, ``fc``) so the field's
checkpoints load with a plain ``load_state_dict``; the deep stem follows timm's ``resnet*d`` naming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from resnetlab.models.blocks import BLOCKS, PREACT_BLOCKS
from resnetlab.models.layers import SHORTCUTS, conv, global_avg_pool, make_shortcut, max_pool, norm

STEMS = ("imagenet", "cifar", "deep", "none")


class ClassifierBase(nn.Module):
    """The fine-tuning surface shared by every resnetlab model: features, head, classifier reset.

    Subclasses set ``self.num_features``, ``self.ndim`` and ``self.fc`` and implement ``forward_features``.
    """

    num_features: int
    ndim: int
    drop_rate: float = 0.0

    def _init_head(self, num_classes: int, drop_rate: float, head_hidden: int | None = None) -> None:
        self.avgpool = global_avg_pool(self.ndim)
        self.drop_rate = drop_rate
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.reset_classifier(num_classes, hidden=head_hidden)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, dropout, classifier. ``pre_logits=True`` stops before the classifier."""
        x = torch.flatten(self.avgpool(x), 1)
        x = self.dropout(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, *, hidden: int | None = None,
                         drop_rate: float | None = None) -> None:
        """Replace the classifier by a fresh one for ``num_classes`` (0: no classifier, features only).

        ``hidden`` makes a small MLP head (Linear-BN-ReLU-Dropout-Linear) instead of one linear layer.
        """
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if hidden is not None and hidden < 1:
            raise ValueError(f"head_hidden must be >= 1, got {hidden}")
        if drop_rate is not None:
            self.drop_rate = drop_rate
            self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.num_classes = num_classes
        self.head_hidden = hidden
        if num_classes == 0:
            self.fc = nn.Identity()
        elif hidden:
            self.fc = nn.Sequential(nn.Linear(self.num_features, hidden), nn.BatchNorm1d(hidden),
                                    nn.ReLU(inplace=True), nn.Dropout(self.drop_rate), nn.Linear(hidden, num_classes))
        else:
            self.fc = nn.Linear(self.num_features, num_classes)


def _as_list(value, n: int, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{name} needs one value per stage ({n}), got {list(value)}")
        return list(value)
    return [value] * n


class ResNet(ClassifierBase):
    """A residual network described by data.

    Args:
        block: ``"basic"``, ``"bottleneck"``, ``"preact_basic"`` or ``"preact_bottleneck"``.
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]`` for ResNet-50 or ``[3, 3, 3]`` for CIFAR ResNet-20.
        widths: base width of each stage (the bottleneck's output is ``width * 4``).
        strides: stride of each stage's first block; defaults to ``[1, 2, 2, ...]``.
        num_classes: classifier outputs; 0 gives a feature extractor.
        in_chans: input channels (3 for RGB, 1 for spectrograms, n_mels for 1-D audio nets).
        ndim: 2 for images and spectrograms ``(N, C, H, W)``, 1 for signals and feature sequences ``(N, C, T)``.
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool), ``"cifar"`` (3x3/1 conv), ``"deep"`` (three 3x3
            convs + max-pool, ResNet-C/D) or ``"none"``.
        stem_width: channels out of the stem; ``stem_kernel``/``stem_stride`` override the 7x7/2 conv of
            the imagenet stem (1-D nets use other kernels).
        shortcut: when a block changes shape: ``"B"`` projection, ``"A"`` zero-pad identity, ``"D"`` avg-pool
            then projection.
        groups, width_per_group: grouped bottlenecks (ResNeXt 32x4d: 32, 4; Wide ResNet-50-2: 1, 128).
        stride_in_1x1: bottleneck stride on the first 1x1 (v1, the paper, Keras) instead of the 3x3 (v1.5).
        bias: convolution biases (Keras' ResNet50 has them).
        kernel_size: kernel of the blocks' spatial convs (3; 1-D audio nets use 9).
        residual: ``False`` removes every shortcut: the paper's plain network of the same depth.
        zero_init_last: zero the last BN scale of each block so every block starts as the identity
            (Goyal et al. 2017).
        drop_rate: dropout before the classifier.
        head_hidden: a small MLP head (Linear-BN-ReLU-Dropout-Linear) with this many hidden units instead of
            one linear classifier.
        norm_eps: BatchNorm epsilon (Keras-trained weights use 1.001e-5).
    """

    def __init__(self, block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2),
                 widths: Sequence[int] = (64, 128, 256, 512), strides: Sequence[int] | None = None, *,
                 num_classes: int = 1000, in_chans: int = 3, ndim: int = 2, stem: str = "imagenet",
                 stem_width: int = 64, stem_kernel: int = 7, stem_stride: int = 2, stem_pool: bool = True,
                 shortcut: str = "B", groups: int = 1, width_per_group: int = 64, stride_in_1x1: bool = False,
                 bias: bool = False, kernel_size: int = 3, residual: bool = True, zero_init_last: bool = False,
                 drop_rate: float = 0.0, head_hidden: int | None = None, norm_eps: float = 1e-5):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; allowed: {', '.join(BLOCKS)}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; allowed: {', '.join(STEMS)}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; allowed: {', '.join(SHORTCUTS)}")
        if not layers or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must list at least one stage of >= 1 block, got {list(layers)}")
        if in_chans < 1 or num_classes < 0:
            raise ValueError(f"in_chans must be >= 1 and num_classes >= 0, got {in_chans}, {num_classes}")
        n_stages = len(layers)
        widths = _as_list(widths, n_stages, "widths")
        strides = _as_list(strides if strides is not None else [1] + [2] * (n_stages - 1), n_stages, "strides")
        block_cls = BLOCKS[block]
        self.ndim = ndim
        self.in_chans = in_chans
        preact = block_cls in PREACT_BLOCKS
        self.preact = preact

        # Stem. Pre-activation CIFAR nets start straight with a conv (He et al. 2016's code); every other
        # stem ends in BN-ReLU (the pre-activation ImageNet nets keep it too, as fb.resnet.torch does).
        if stem == "none":
            self.conv1, stem_width = nn.Identity(), in_chans
        elif stem == "deep":
            mid = stem_width // 2
            self.conv1 = nn.Sequential(
                conv(ndim, in_chans, mid, 3, 2, bias=bias), norm(ndim, mid), nn.ReLU(inplace=True),
                conv(ndim, mid, mid, 3, 1, bias=bias), norm(ndim, mid), nn.ReLU(inplace=True),
                conv(ndim, mid, stem_width, 3, 1, bias=bias))
        elif stem == "cifar":
            self.conv1 = conv(ndim, in_chans, stem_width, 3, 1, bias=bias)
        else:
            self.conv1 = conv(ndim, in_chans, stem_width, stem_kernel, stem_stride, bias=bias)
        stem_norm = stem != "none" and not (preact and stem == "cifar")
        self.bn1 = norm(ndim, stem_width) if stem_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if stem_norm else nn.Identity()
        self.maxpool = max_pool(ndim) if stem in ("imagenet", "deep") and stem_pool else nn.Identity()

        self.stage_names = []
        inplanes = stem_width
        for i, (n_blocks, width, stride) in enumerate(zip(layers, widths, strides)):
            out_ch = width * block_cls.expansion
            blocks = []
            for j in range(int(n_blocks)):
                s = stride if j == 0 else 1
                downsample = (make_shortcut(shortcut, ndim, inplanes, out_ch, s, bias=bias, with_norm=not preact)
                              if residual else None)
                extra = {"stride_in_1x1": stride_in_1x1} if block == "bottleneck" else {}
                blocks.append(block_cls(inplanes, width, s, downsample, ndim=ndim, groups=groups,
                                        base_width=width_per_group, kernel_size=kernel_size, bias=bias,
                                        residual=residual, **extra))
                inplanes = out_ch
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.num_features = inplanes
        # Pre-activation nets end with the BN-ReLU that the last block left out.
        self.norm = nn.Sequential(norm(ndim, inplanes), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self._init_head(num_classes, drop_rate, head_hidden)

        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.eps = norm_eps
                if m.affine:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        if zero_init_last and residual:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.norm(x)
