"""Run a model over a loader: logits, labels and loss, for validation, ``evaluate`` and the report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from resnetlab.data.loader import ArrayLoader
from resnetlab.data.pipeline import Pipeline
from resnetlab.training.precision import Precision


@dataclass
class Predictions:
    logits: torch.Tensor  # (N, num_classes) float32, on the CPU
    targets: torch.Tensor  # (N,) int64
    indices: np.ndarray  # (N,) positions in the dataset, in loader order

    @property
    def loss(self) -> float:
        return float(F.cross_entropy(self.logits, self.targets)) if len(self.targets) else float("nan")

    @property
    def accuracy(self) -> float:
        return float((self.logits.argmax(1) == self.targets).float().mean()) if len(self.targets) else float("nan")


TTA_MODES = ("flip", "flip-shift")


def tta_mode(tta: bool | str | None) -> str | None:
    """``True`` means ``"flip"``; ``False``/``None`` none; else one of ``TTA_MODES`` (ValueError otherwise)."""
    if tta is True:
        return "flip"
    if tta in (False, None, ""):
        return None
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; allowed: {', '.join(TTA_MODES)}")
    return tta


def _tta_views(x: torch.Tensor, mode: str) -> list[tuple[torch.Tensor, float]]:
    """The views of a batch test-time augmentation averages, with their weights. ``flip``: the batch and its
    mirror image. ``flip-shift`` (airbench's): those two weighted 1/4 each, plus the batch moved one pixel up-left
    and one pixel down-right (reflected borders), each with its mirror image, 1/8 each."""
    views = [(x, 0.5), (x.flip(-1), 0.5)]
    if mode == "flip-shift" and x.ndim == 4:
        pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        shifted = [pad[..., :h, :w], pad[..., 2:, 2:]]
        views = [(v, 0.25) for v, _ in views] + [(v, 0.125) for s in shifted for v in (s, s.flip(-1))]
    return views


@torch.no_grad()
def predict_loader(model: torch.nn.Module, pipeline: Pipeline, loader: ArrayLoader, prec: Precision,
                   tta: bool | str | None = False) -> Predictions:
    """Logits for every sample of ``loader`` (in eval mode, no augmentation). ``tta``: ``"flip"`` (or ``True``)
    averages the probabilities with those of the mirrored input, ``"flip-shift"`` also with 1-pixel shifts."""
    mode = tta_mode(tta)
    was_training = model.training
    model.eval()
    outs, ys = [], []
    try:
        for xb, yb in loader.epoch(0):
            x, _ = pipeline(xb, None, train=False)
            x = prec.format_input(x)
            with prec.autocast():
                if mode is None:
                    logits = model(x).float()
                else:  # the mean of the views' probabilities, as log-probabilities
                    logits = sum(wt * model(prec.format_input(v)).float().softmax(1)
                                 for v, wt in _tta_views(x, mode)).log()
            outs.append(logits.cpu())
            ys.append(yb.cpu())
    finally:
        model.train(was_training)
    order = np.concatenate([b.sort().values.numpy() for b in loader._batches(0, 0)]) if len(ys) else np.zeros(0, int)
    if not outs:
        return Predictions(torch.zeros(0, pipeline.num_classes), torch.zeros(0, dtype=torch.long), order)
    return Predictions(torch.cat(outs), torch.cat(ys), order)
