"""Run a model over a loader: logits, labels and loss, for validation, ``evaluate`` and the report."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from resnetlab.data.loader import DeviceLoader
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


@torch.no_grad()
def predict_loader(model: torch.nn.Module, pipeline: Pipeline, loader: DeviceLoader, prec: Precision,
                   tta: bool = False) -> Predictions:
    """Logits for every sample of ``loader`` (in eval mode, no augmentation; ``tta`` averages with a flip)."""
    was_training = model.training
    model.eval()
    outs, ys = [], []
    try:
        for xb, yb in loader.epoch(0):
            x, _ = pipeline(xb, None, train=False)
            x = prec.format_input(x)
            with prec.autocast():
                logits = model(x).float()
                if tta:
                    logits = (logits.softmax(1) + model(prec.format_input(x.flip(-1))).float().softmax(1)).div(2).log()
            outs.append(logits.cpu())
            ys.append(yb.cpu())
    finally:
        model.train(was_training)
    order = np.concatenate([b.sort().values.numpy() for b in loader._batches(0, 0)]) if len(ys) else np.zeros(0, int)
    if not outs:
        return Predictions(torch.zeros(0, pipeline.num_classes), torch.zeros(0, dtype=torch.long), order)
    return Predictions(torch.cat(outs), torch.cat(ys), order)
