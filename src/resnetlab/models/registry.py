"""Named builders: every architecture resnetlab knows is a name, a configuration and a one-line description.

``create_model("resnet50", num_classes=10)`` builds one; ``list_models("resnet*")`` lists them.
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from resnetlab.models.fast import FastResNet
from resnetlab.models.kws import KWSResNet
from resnetlab.models.resnet import ResNet


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of one architecture."""

    name: str
    cls: type
    config: dict[str, Any]
    description: str
    paper: str
    input_size: tuple[int, ...]  # (C, H, W) for 2-D nets, (C, T) for 1-D nets, at in_chans' default
    modality: str = "image"  # image | audio
    num_classes: int = 1000  # the classes of the data set it is usually shown with (for tables, model_info)

    @property
    def ndim(self) -> int:
        return len(self.input_size) - 1


_REGISTRY: dict[str, ModelSpec] = {}

HE2015 = "He et al. 2015, Deep Residual Learning for Image Recognition"
HE2016 = "He et al. 2016, Identity Mappings in Deep Residual Networks"
IMAGENET_SIZE = (3, 224, 224)
CIFAR_SIZE = (3, 32, 32)
KWS_SIZE = (1, 40, 101)  # 40 MFCCs x 101 frames: 1 s at a 10 ms hop
AUDIO1D_SIZE = (40, 101)  # 40 log-mel bands as channels x 101 frames


def register_model(name: str, cls: type, config: dict[str, Any], description: str, paper: str,
                   input_size: tuple[int, ...], modality: str = "image", num_classes: int | None = None) -> None:
    """Add a named architecture. ``num_classes`` defaults to 1000 for ImageNet-size inputs, 10 for CIFAR-size
    ones and 12 (the Speech Commands task of Tang & Lin) for audio."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    if num_classes is None:
        num_classes = 12 if modality == "audio" else 1000 if input_size[-1] >= 224 else 10
    _REGISTRY[name] = ModelSpec(name, cls, dict(config), description, paper, tuple(input_size), modality,
                                num_classes)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is a shell-style filter such as ``"resnet*"``."""
    names = sorted(_REGISTRY, key=_natural_key)
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatch(n, glob)]
    return names


def _natural_key(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def get_spec(name: str) -> ModelSpec:
    if not isinstance(name, str) or name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name}*") if isinstance(name, str) else []
        hint = f" (did you mean {', '.join(sorted(close)[:5])}?)" if close else ""
        known = ", ".join(sorted(_REGISTRY, key=_natural_key))
        raise ValueError(f"unknown model {name!r}{hint}; known: {known}")
    return _REGISTRY[name]


def create_model(name: str, *, num_classes: int = 1000, in_chans: int | None = None, **overrides) -> nn.Module:
    """Build a registered architecture with fresh weights.

    Args:
        name: a name from :func:`list_models`, e.g. ``"resnet50"``, ``"resnet20"``, ``"res15"``.
        num_classes: classifier outputs (0: no classifier, the model returns pooled features).
        in_chans: input channels; ``None`` takes the model's natural input (3 for image nets, 1 for the
            spectrogram nets res8/15/26, 40 mel bands for the 1-D audio nets). Pass 3 to get an RGB net
            of any architecture.
        **overrides: any argument of the model class (``ResNet`` or ``KWSResNet``), e.g. ``drop_rate=0.2``,
            ``zero_init_last=True``, ``shortcut="D"``.
    """
    spec = get_spec(name)
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
    if in_chans is None:
        in_chans = spec.input_size[0]
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be an integer >= 1, got {in_chans!r}")
    allowed = [p for p in inspect.signature(spec.cls).parameters if p not in ("num_classes", "in_chans")]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for {name} ({spec.cls.__name__}); "
                         f"allowed: {', '.join(allowed)}")
    model = spec.cls(**{**spec.config, **overrides}, num_classes=num_classes, in_chans=in_chans)
    model.arch = name
    model.default_input_size = (in_chans, *spec.input_size[1:])
    return model


# --- ImageNet family (torchvision-compatible names and shapes) -------------------------------------------
_IMAGENET_DEPTHS = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
                    101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3])}
for _d, (_block, _layers) in _IMAGENET_DEPTHS.items():
    register_model(f"resnet{_d}", ResNet, {"block": _block, "layers": _layers},
                   f"ResNet-{_d}, ImageNet stem, v1.5 bottleneck (torchvision layout)", HE2015, IMAGENET_SIZE)
    register_model(f"preact_resnet{_d}", ResNet, {"block": f"preact_{_block}", "layers": _layers},
                   f"Pre-activation ResNet-{_d}, ImageNet stem", HE2016, IMAGENET_SIZE)
for _d in (18, 34):
    register_model(f"plain{_d}", ResNet, {"block": "basic", "layers": _IMAGENET_DEPTHS[_d][1], "residual": False},
                   f"Plain-{_d}: ResNet-{_d} without shortcuts (the paper's baseline)", HE2015, IMAGENET_SIZE)
register_model("resnext50_32x4d", ResNet, {"block": "bottleneck", "layers": [3, 4, 6, 3], "groups": 32,
                                           "width_per_group": 4},
               "ResNeXt-50 32x4d: grouped 3x3 convs", "Xie et al. 2017, Aggregated Residual Transformations",
               IMAGENET_SIZE)
register_model("wide_resnet50_2", ResNet, {"block": "bottleneck", "layers": [3, 4, 6, 3], "width_per_group": 128},
               "Wide ResNet-50-2: bottlenecks twice as wide", "Zagoruyko & Komodakis 2016, Wide Residual Networks",
               IMAGENET_SIZE)
for _d in (18, 50):
    _block, _layers = _IMAGENET_DEPTHS[_d]
    register_model(f"resnet{_d}d", ResNet, {"block": _block, "layers": _layers, "stem": "deep", "shortcut": "D"},
                   f"ResNet-{_d}-D: deep 3x3 stem, avg-pool shortcuts (timm layout)",
                   "He et al. 2019, Bag of Tricks for Image Classification", IMAGENET_SIZE)

# --- CIFAR family: 3 stages of 16/32/64, 6n+2 layers -----------------------------------------------------
_CIFAR = {"block": "basic", "widths": [16, 32, 64], "stem": "cifar", "stem_width": 16, "shortcut": "A"}
for _d in (20, 32, 44, 56, 110, 1202):
    _n = (_d - 2) // 6
    register_model(f"resnet{_d}", ResNet, {**_CIFAR, "layers": [_n] * 3},
                   f"CIFAR ResNet-{_d} (6n+2, n={_n}), zero-pad shortcuts (option A)", HE2015, CIFAR_SIZE)
    register_model(f"preact_resnet{_d}", ResNet, {**_CIFAR, "block": "preact_basic", "shortcut": "B",
                                                  "layers": [_n] * 3},
                   f"CIFAR pre-activation ResNet-{_d}", HE2016, CIFAR_SIZE)
    if _d != 1202:
        register_model(f"plain{_d}", ResNet, {**_CIFAR, "layers": [_n] * 3, "residual": False},
                       f"CIFAR Plain-{_d}: ResNet-{_d} without shortcuts", HE2015, CIFAR_SIZE)
for _d in (164, 1001):
    _n = (_d - 2) // 9
    register_model(f"preact_resnet{_d}", ResNet, {**_CIFAR, "block": "preact_bottleneck", "shortcut": "B",
                                                  "layers": [_n] * 3},
                   f"CIFAR pre-activation bottleneck ResNet-{_d} (9n+2, n={_n})", HE2016, CIFAR_SIZE)

# --- Speech: keyword-spotting ResNets over MFCC / log-mel images (2-D) ------------------------------------
TANG_LIN = "Tang & Lin 2018, Deep Residual Learning for Small-Footprint Keyword Spotting"
_KWS = {"res8": {"n_layers": 6, "pool": (4, 3), "dilation": False},
        "res15": {"n_layers": 13, "pool": None, "dilation": True},
        "res26": {"n_layers": 24, "pool": (2, 2), "dilation": False}}
for _name, _cfg in _KWS.items():
    register_model(_name, KWSResNet, {**_cfg, "channels": 45},
                   f"{_name}: keyword-spotting ResNet, 45 maps, on (1, mels, frames)", TANG_LIN, KWS_SIZE, "audio")
    register_model(f"{_name}_narrow", KWSResNet, {**_cfg, "channels": 19},
                   f"{_name}-narrow: 19 maps, fewer parameters", TANG_LIN, KWS_SIZE, "audio")

# --- Speech: 1-D temporal ResNets (mel bands as channels, convolution over time) -------------------------
# Input (N, n_mels, T). TC-ResNet layout (Choi et al. 2019): a k=3 stem, then stages of basic blocks with
# k=9 temporal kernels that halve the time axis; receptive field and sizes are in docs/models.md.
CHOI = "Choi et al. 2019, Temporal Convolution for Real-time Keyword Spotting on Mobile Devices"
_TC = {"block": "basic", "ndim": 1, "stem": "imagenet", "stem_kernel": 3, "stem_stride": 1, "stem_pool": False,
       "stem_width": 16, "kernel_size": 9, "strides": [2, 2, 2]}
register_model("tc_resnet8", ResNet, {**_TC, "layers": [1, 1, 1], "widths": [24, 32, 48]},
               "TC-ResNet8: 1-D temporal ResNet over log-mel bands", CHOI, AUDIO1D_SIZE, "audio")
register_model("tc_resnet14", ResNet, {**_TC, "layers": [2, 2, 2], "widths": [24, 32, 48]},
               "TC-ResNet14: deeper 1-D temporal ResNet", CHOI, AUDIO1D_SIZE, "audio")
register_model("tc_resnet14_w15", ResNet, {**_TC, "layers": [2, 2, 2], "widths": [36, 48, 72], "stem_width": 24},
               "TC-ResNet14-1.5: 1.5x wider", CHOI, AUDIO1D_SIZE, "audio")
register_model("resnet1d18", ResNet, {"block": "basic", "ndim": 1, "layers": [2, 2, 2, 2], "stem": "imagenet",
                                      "stem_kernel": 7, "stem_stride": 1, "stem_pool": False,
                                      "strides": [1, 2, 2, 2]},
               "ResNet-18 layout in 1-D, no stem downsampling (for ~100-frame feature sequences)", HE2015,
               AUDIO1D_SIZE, "audio")

# --- Fast-training nets for small images (airbench's network with residual units) --------------------------
FAST = ("Jordan 2024, 94% on CIFAR-10 in 3.29 Seconds on a Single GPU; Page 2018, How to Train Your ResNet")
register_model("fastresnet", FastResNet, {"widths": [64, 256, 256]},
               "Whitening stem, 3 conv-pool residual stages 64/256/256, max-pool head (airbench94's widths)", FAST,
               CIFAR_SIZE)
register_model("fastresnet_s", FastResNet, {"widths": [64, 128, 256]},
               "fastresnet with a 128-channel middle stage: 1.6x its speed, for CPUs", FAST, CIFAR_SIZE)
register_model("fastplain", FastResNet, {"widths": [64, 256, 256], "residual": False},
               "fastresnet without its residual sums: airbench94's network", FAST, CIFAR_SIZE)

# --- The seed model: the minimal ResNet of the material this project started from ------------------------
_SEED = {"block": "basic", "layers": [2], "widths": [64], "strides": [1]}
register_model("seed_resnet", ResNet, _SEED,
               "Seed model: 7x7/2 stem + max-pool, two residual blocks of 64, classifier", HE2015, (3, 64, 64))
register_model("seed_resnet1d", ResNet, {**_SEED, "ndim": 1},
               "Seed model in 1-D: Conv1D 7/2 stem + max-pool, two residual blocks of 64", HE2015, AUDIO1D_SIZE,
               "audio")
