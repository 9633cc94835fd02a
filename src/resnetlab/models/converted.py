"""What every checkpoint converter returns (:class:`ConvertedWeights`) and the architecture matching they share
(:func:`infer_resnet_kwargs`, :func:`match_arch`, :func:`arch_from_name`).

Apart from :mod:`resnetlab.models.convert` (the generic converters and the dispatcher ``read_weights``) so that
the format-specific converters (:mod:`resnetlab.models.convert_keras`) import these without importing the
dispatcher that imports them: convert -> convert_keras -> converted, one way.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resnetlab.models.weights import WeightsEntry


@dataclass
class ConvertedWeights:
    """A checkpoint renamed to resnetlab's parameter names, and what the file says about its architecture.

    Attributes:
        state_dict: tensors under resnetlab names (keys a converter could not map keep their original name,
            so that loading reports them as ignored).
        format: ``"resnetlab"``, ``"torchvision"``, ``"timm"``, ``"state-dict"`` (torchvision-style names, origin
            unknown),
            ``"hf-transformers"`` or ``"keras"``.
        path: the file (or folder) read.
        arch: a registered resnetlab name when the file or the weights table says which; ``None``: infer it
            from the tensors' shapes (:func:`infer_resnet_kwargs`).
        arch_kwargs: ``create_model`` overrides that, with ``arch``, describe the architecture.
        required_kwargs: overrides the weights need whichever architecture is chosen, because the tensors'
            shapes cannot show them (where the bottleneck stride sits: Keras, HF ``downsample_in_bottleneck``).
        bn_eps: the BatchNorm epsilon the weights were trained with, when it is not torch's 1e-5.
        meta: the file's own description (resnetlab metadata, config.json of a HF / timm folder).
        entry: the weights-table entry, when the source is a known one.
        notes: conversions a user should know about (e.g. Keras' BGR -> RGB).
        source: the source string the weights were read from.
    """

    state_dict: dict[str, torch.Tensor]
    format: str
    path: Path
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    required_kwargs: dict[str, Any] = field(default_factory=dict)
    bn_eps: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    entry: WeightsEntry | None = None
    notes: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def num_classes(self) -> int:
        """Classifier outputs: the metadata's ``num_classes``, else the rows of ``fc.weight``, else 0."""
        if isinstance(self.meta.get("num_classes"), int):
            return self.meta["num_classes"]
        w = self.state_dict.get("fc.weight")
        return int(w.shape[0]) if w is not None else 0

    @property
    def in_chans(self) -> int | None:
        """Input channels: the metadata's ``in_chans``, else the first conv's input channels (``None``: unknown)."""
        if isinstance(self.meta.get("in_chans"), int):
            return self.meta["in_chans"]
        for key in ("conv1.weight", "conv1.0.weight"):
            w = self.state_dict.get(key)
            if w is not None and w.dim() >= 3:
                return int(w.shape[1])
        return None


# --- architectures: names and shapes -> registered resnetlab models -------------------------------------------
def arch_from_name(name: str) -> tuple[str, dict[str, Any]] | None:
    """Translate a torchvision / timm ResNet name into ``(registered resnetlab name, create_model overrides)``.

    Registered names map to themselves; ``resnet{N}d`` -> ``resnet{N}`` + deep stem + avg-pool shortcuts;
    ``resnext{N}_{G}x{W}d`` -> ``resnet{N}`` with ``groups=G, width_per_group=W``; ``wide_resnet{N}_2`` ->
    ``resnet{N}`` with ``width_per_group=128``. ``None`` when the name is none of these.
    """
    from resnetlab.models.registry import list_models

    known = set(list_models())
    name = name.split(".")[0]  # timm's tag: resnet50.a1_in1k
    if name in known:
        return name, {}
    m = re.fullmatch(r"(resnet\d+)d", name)
    if m and m[1] in known:
        return m[1], {"stem": "deep", "shortcut": "D"}
    m = re.fullmatch(r"resnext(\d+)_(\d+)x(\d+)d", name)
    if m and f"resnet{m[1]}" in known:
        return f"resnet{m[1]}", {"groups": int(m[2]), "width_per_group": int(m[3])}
    m = re.fullmatch(r"wide_resnet(\d+)_2", name)
    if m and f"resnet{m[1]}" in known:
        return f"resnet{m[1]}", {"width_per_group": 128}
    return None


def _stage_blocks(state_dict: dict[str, torch.Tensor]) -> dict[int, int]:
    blocks: dict[int, int] = {}
    for key in state_dict:
        m = re.match(r"layer(\d+)\.(\d+)\.", key)
        if m:
            s, b = int(m[1]), int(m[2])
            blocks[s] = max(blocks.get(s, 0), b + 1)
    return blocks


def infer_resnet_kwargs(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``ResNet`` arguments a state dict in resnetlab names implies, read from key names and shapes.

    Finds block type, blocks and width per stage, stem, shortcut kind, groups / width per group, kernel
    size, conv biases and ``ndim``. Strides and where the bottleneck stride sits leave no trace in the
    shapes, so they are not returned (the caller's defaults apply).

    Raises:
        ValueError: the tensors are not a ResNet with stages ``layer1..layerN``.
    """
    blocks = _stage_blocks(state_dict)
    stages = sorted(blocks)
    if not stages or stages != list(range(1, len(stages) + 1)):
        raise ValueError(f"not a ResNet state dict: expected stages layer1..layerN, found "
                         f"{[f'layer{s}' for s in stages] or 'none'} (first keys: {list(state_dict)[:4]})")
    bottleneck = "layer1.0.conv3.weight" in state_dict
    preact = "norm.0.weight" in state_dict
    try:
        if bottleneck:
            planes = [int(state_dict[f"layer{s}.0.conv3.weight"].shape[0]) // 4 for s in stages]
            w2 = state_dict["layer1.0.conv2.weight"]
            groups = int(w2.shape[0]) // int(w2.shape[1])
            width_per_group = round(int(w2.shape[0]) / groups * 64 / planes[0])
        else:
            planes = [int(state_dict[f"layer{s}.0.conv1.weight"].shape[0]) for s in stages]
            w2, groups, width_per_group = state_dict["layer1.0.conv2.weight"], 1, 64
    except KeyError as e:
        raise ValueError(f"not a ResNet state dict: missing {e.args[0]}") from None
    kwargs: dict[str, Any] = {
        "block": ("preact_" if preact else "") + ("bottleneck" if bottleneck else "basic"),
        "layers": [blocks[s] for s in stages], "widths": planes, "groups": groups,
        "width_per_group": width_per_group, "kernel_size": int(w2.shape[-1]), "ndim": w2.dim() - 2,
        "bias": "layer1.0.conv1.bias" in state_dict}
    if "conv1.0.weight" in state_dict and "conv1.6.weight" in state_dict:
        kwargs.update(stem="deep", stem_width=int(state_dict["conv1.6.weight"].shape[0]))
    elif "conv1.weight" in state_dict:
        w = state_dict["conv1.weight"]
        k = int(w.shape[-1])
        kwargs["stem_width"] = int(w.shape[0])
        if kwargs["ndim"] == 2:
            kwargs.update(stem="cifar") if k == 3 else kwargs.update(stem="imagenet", stem_kernel=k)
        else:
            kwargs["stem_kernel"] = k
    else:
        kwargs["stem"] = "none"
    keys = list(state_dict)
    if any(re.fullmatch(r"layer\d+\.\d+\.downsample\.1\.weight", k) and state_dict[k].dim() > 2 for k in keys):
        kwargs["shortcut"] = "D"
    elif any(re.fullmatch(r"layer\d+\.\d+\.downsample\.0\.weight", k) for k in keys):
        kwargs["shortcut"] = "B"
    else:
        kwargs["shortcut"] = "A"
    return kwargs


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in config.items()}
    if "strides" in out and out["strides"] is None and "layers" in out:
        out["strides"] = [1] + [2] * (len(out["layers"]) - 1)
    return out


def match_arch(kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered ``ResNet`` whose configuration differs least from ``kwargs``, and the differences.

    Returns ``(name, overrides)`` such that ``create_model(name, **overrides)`` builds exactly the
    architecture ``kwargs`` describe; ``overrides`` is empty when a registered model matches exactly.
    """
    from resnetlab.models.registry import get_spec, list_models
    from resnetlab.models.resnet import ResNet

    defaults = _normalised({p.name: p.default for p in inspect.signature(ResNet).parameters.values()
                            if p.default is not inspect.Parameter.empty})
    wanted = _normalised(kwargs)
    best: tuple[tuple[int, int], str, dict[str, Any]] | None = None
    for name in list_models():
        spec = get_spec(name)
        if spec.cls is not ResNet:
            continue
        full = _normalised({**defaults, **spec.config})
        diff = {k: v for k, v in wanted.items() if full.get(k) != v}
        # Ties go to the model with fewer unseen departures from the defaults: resnet18 over plain18
        # (residual=False leaves no trace in the tensors).
        hidden = sum(1 for k, v in spec.config.items() if k not in wanted and _normalised({k: v})[k] != defaults.get(k))
        score = (len(diff), hidden)
        if best is None or score < best[0]:
            best = (score, name, diff)
    assert best is not None, "the registry holds no ResNet"
    return best[1], best[2]
