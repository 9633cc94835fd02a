"""Run a model over a loader: logits, labels and loss, for validation, ``evaluate`` and the report (each batch
through :func:`resnetlab.training.inference.forward_logits`, the one inference core)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from resnetlab.data.loader import ArrayLoader
from resnetlab.data.pipeline import Pipeline
from resnetlab.training.inference import forward_logits, tta_mode
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
def predict_loader(model: torch.nn.Module, pipeline: Pipeline, loader: ArrayLoader, prec: Precision,
                   tta: bool | str | None = False) -> Predictions:
    """Logits for every sample of ``loader`` (in eval mode, no augmentation). ``tta``: ``"flip"`` (or ``True``)
    averages the probabilities with those of the mirrored input, ``"flip-shift"`` also with 1-pixel shifts."""
    mode = tta_mode(tta)
    was_training = model.training
    model.eval()
    outs, ys, idxs = [], [], []
    try:
        for xb, yb, idx in loader.epoch(0, with_index=True):
            outs.append(forward_logits(model, pipeline, xb, prec, mode).cpu())
            ys.append(yb.cpu())
            idxs.append(np.asarray(idx.cpu()))  # the samples the batch holds (streaming leaves undecodable ones out)
    finally:
        model.train(was_training)
    order = np.concatenate(idxs) if idxs else np.zeros(0, int)
    if not outs:
        return Predictions(torch.zeros(0, pipeline.num_classes), torch.zeros(0, dtype=torch.long), order)
    return Predictions(torch.cat(outs), torch.cat(ys), order)
