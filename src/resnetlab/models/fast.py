"""A ResNet built to train fast on small images: airbench's network (Jordan 2024) with residual units.

Where the classic CIFAR ResNet spends its compute on many 3x3 layers at full resolution, this one spends it
where short training pays back most (Page 2018, "How to train your ResNet"; Jordan 2024, "94% on CIFAR-10 in
3.29 seconds on a single GPU"):

- a patch-whitening stem: a 2x2 convolution, no padding, whose weights are set from the training data
  (``init_from_data``: the eigenvectors of the covariance of 2x2 patches, scaled to unit variance, with their
  negations) and then frozen; the network starts from decorrelated inputs;
- stages that convolve at the incoming resolution, then max-pool by 2, then BN-activation, then one residual
  unit (conv-BN added to its input, then the activation); no strided convolutions;
- a global max-pool head, and logits scaled down (1/9) so label smoothing and a high lr start gently;
- BatchNorm scales frozen at 1 (the biases train, at ``lr_multipliers()`` times the lr) and every 3x3
  convolution initialised as the identity on its first input channels (Dirac), as airbench does.

``residual=False`` gives airbench's plain network (the comparison the field keeps making). Parameter names follow
the rest of resnetlab: ``conv1`` (stem), ``layer1``.., ``fc``, so stages, heads and fine-tuning work the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from resnetlab.models.layers import GlobalMaxPool
from resnetlab.models.resnet import ClassifierBase

ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


def _norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    bn.weight.requires_grad_(False)  # a fixed scale of 1: the following layer's weights carry the scale
    return bn


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    c = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)  # PyTorch's default init, small beside the identity
    with torch.no_grad():  # the identity on the first min(in, out) channels: every layer starts passing its input on
        nn.init.dirac_(c.weight[: min(in_ch, out_ch)])
    return c


class FastStage(nn.Module):
    """conv 3x3 -> max-pool /2 -> BN -> act, then ``x + BN(conv 3x3(x))`` -> act (no sum when plain)."""

    def __init__(self, in_ch: int, out_ch: int, act: str, residual: bool, norm_momentum: float):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = _norm(out_ch, norm_momentum)
        self.act1 = ACTIVATIONS[act]()
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = _norm(out_ch, norm_momentum)
        self.act2 = ACTIVATIONS[act]()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.pool(self.conv1(x))))
        y = self.bn2(self.conv2(x))
        return self.act2(x + y if self.residual else y)

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


class FastResNet(ClassifierBase):
    """Patch-whitening stem, conv-pool residual stages, max-pool head (see the module's docstring).

    Args:
        widths: channels of each stage; each stage halves the resolution (32 px input: 31 -> 15 -> 7 -> 3).
        num_classes, in_chans, drop_rate, head_hidden: as for ``ResNet``.
        whiten_kernel: side of the whitening stem's patches; the stem has ``2 * in_chans * k * k`` channels.
        act: ``"gelu"`` (airbench) or ``"relu"`` (measured no faster for ``fastresnet_s`` on this project's
            2-core CPU: both about 830 img/s for the bf16 training step at batch 256).
        residual: ``False`` removes the residual sums (airbench's plain network).
        logit_scale: multiplies the logits.
        norm_momentum: BatchNorm running-statistics momentum (0.4: they follow the fast-moving weights of a
            short run; PyTorch's default 0.1 lags behind them).
    """

    def __init__(self, widths: Sequence[int] = (64, 256, 256), *, num_classes: int = 1000, in_chans: int = 3,
                 whiten_kernel: int = 2, act: str = "gelu", residual: bool = True, logit_scale: float = 1 / 9,
                 norm_momentum: float = 0.4, drop_rate: float = 0.0, head_hidden: int | None = None):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown act {act!r}; allowed: {', '.join(ACTIVATIONS)}")
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must list at least one stage of >= 1 channel, got {list(widths)}")
        if in_chans < 1 or num_classes < 0 or whiten_kernel < 1:
            raise ValueError(f"in_chans, whiten_kernel must be >= 1 and num_classes >= 0, got {in_chans}, "
                             f"{whiten_kernel}, {num_classes}")
        self.ndim = 2
        self.in_chans = in_chans
        self.logit_scale = logit_scale
        stem_width = 2 * in_chans * whiten_kernel ** 2
        self.conv1 = nn.Conv2d(in_chans, stem_width, whiten_kernel, bias=True)  # set by init_from_data, frozen
        nn.init.zeros_(self.conv1.bias)
        self.conv1.weight.requires_grad_(False)
        self.act = ACTIVATIONS[act]()
        self.stage_names = []
        inplanes = stem_width
        for i, width in enumerate(widths):
            self.add_module(f"layer{i + 1}", FastStage(inplanes, int(width), act, residual, norm_momentum))
            self.stage_names.append(f"layer{i + 1}")
            inplanes = int(width)
        self.num_features = inplanes
        self._init_head(num_classes, drop_rate, head_hidden)
        # (the name every resnetlab head uses for its global pool); amax: a deterministic backward on CUDA
        self.avgpool = GlobalMaxPool()

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten ``x``'s patches: normalised training images ``(N, C, H, W)``, a few thousand.

        Each filter is an eigenvector of the patches' covariance divided by the square root of its eigenvalue,
        twice (the filter and its negation, so the activation keeps both signs).
        """
        w = self.conv1.weight
        c, k = w.shape[1], w.shape[2]
        if x.ndim != 4 or x.shape[1] != c or min(x.shape[2:]) < k:
            raise ValueError(f"init_from_data wants (N, {c}, H, W) images of at least {k} px, got {tuple(x.shape)}")
        d = c * k * k
        cov, count = torch.zeros(d, d, dtype=torch.float64), 0
        per_image = (x.shape[2] - k + 1) * (x.shape[3] - k + 1)
        for chunk in x.split(max(1, 2 ** 20 // per_image)):  # about a million patches at a time: bounded memory
            patches = chunk.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, d).double().cpu()
            cov += patches.T @ patches
            count += len(patches)
        eigval, eigvec = torch.linalg.eigh(cov / count)  # ascending: the strongest directions last
        filters = (eigvec.T / torch.sqrt(eigval.clamp_min(0)[:, None] + eps)).flip(0).reshape(-1, c, k, k)
        w.copy_(torch.cat((filters, -filters)).to(w.dtype))

    def lr_multipliers(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name pattern the trainer applies when training from scratch:
        the BN biases (their scales are frozen) and the stem's bias learn 64x faster, as in airbench."""
        return {"layer*.bn*.bias": 64.0, "conv1.bias": 64.0}

    @property
    def min_input_size(self) -> int:
        """The smallest image side the stages can halve down to 1 pixel."""
        return self.conv1.kernel_size[0] - 1 + 2 ** len(self.stage_names)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"{type(self).__name__} with {len(self.stage_names)} stages needs images of at least "
                             f"{self.min_input_size} px, got {tuple(x.shape[-2:])}")
        x = self.act(self.conv1(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        out = super().forward_head(x, pre_logits)
        return out if pre_logits else out * self.logit_scale
