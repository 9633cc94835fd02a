"""Model statistics: parameters, multiply-accumulates (MACs) and receptive field."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of convolutions and linear layers for ONE sample of shape ``input_size``.

    Normalisation, activations, pooling and additions are left out, the usual convention (torchvision's
    "GFLOPS" column and fvcore count the same way: resnet50 at 224x224 is 4.09 G).
    """
    total = 0

    def conv_hook(m: nn.Module, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = 1
        for s in m.kernel_size:
            k *= s
        total += out.numel() * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_size, device=p.device if p is not None else "cpu")
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return int(total)


def receptive_field(model: nn.Module, input_size: Sequence[int]) -> int:
    """Receptive field of the last feature map along the last axis (time for 1-D nets, width for 2-D).

    Measured, not derived: the gradient of one central feature position with respect to the input is
    non-zero exactly over the receptive field (clipped to ``input_size``; dilations and pools included).
    """
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.ones(1, *input_size, device=p.device, requires_grad=True)
        feats = model.forward_features(x)
        centre = tuple(s // 2 for s in feats.shape[2:])
        feats[(0, slice(None), *centre)].sum().backward()
        g = x.grad.abs().sum(dim=tuple(range(x.dim() - 1)))
        nz = torch.nonzero(g > 0).flatten()
        return int(nz.max() - nz.min() + 1) if len(nz) else 0
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def model_info(model_or_name: nn.Module | str, input_size: Sequence[int] | None = None, *,
               with_receptive_field: bool = False) -> dict:
    """Parameters, trainable parameters and MACs (one sample) of a model or a registered name.

    ``input_size`` is one sample's shape without the batch axis, e.g. ``(3, 224, 224)`` or ``(40, 101)``;
    it defaults to the model's natural input size.
    """
    from resnetlab.models.registry import create_model, get_spec

    info: dict = {}
    if isinstance(model_or_name, str):
        spec = get_spec(model_or_name)
        model = create_model(model_or_name, num_classes=spec.num_classes)
        info.update(name=spec.name, description=spec.description, paper=spec.paper, modality=spec.modality,
                    num_classes=spec.num_classes)
    elif isinstance(model_or_name, nn.Module):
        model = model_or_name
        if getattr(model, "arch", None):
            info["name"] = model.arch
    else:
        raise ValueError(f"model_info takes a model or a registered name, got {type(model_or_name).__name__}")
    if input_size is None:
        input_size = getattr(model, "default_input_size", None)
        if input_size is None:
            raise ValueError("input_size is required for a model that was not built by create_model")
    input_size = tuple(int(s) for s in input_size)
    expected = getattr(model, "ndim", len(input_size) - 1) + 1
    if len(input_size) != expected or any(s < 1 for s in input_size):
        raise ValueError(f"input_size must be {expected} positive sizes (channels first, no batch axis), "
                         f"got {input_size}")
    info["params"] = sum(p.numel() for p in model.parameters())
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["input_size"] = list(input_size)
    info["macs"] = count_macs(model, input_size)
    if with_receptive_field:
        info["receptive_field"] = receptive_field(model, input_size)
    return info
