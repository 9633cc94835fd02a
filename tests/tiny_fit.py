"""A tiny deterministic fit through the real ``Trainer``: fixed data, a BatchNorm-free fp32 model, no augmentation.

Used in-process by the gradient-accumulation test, and as a script under torchrun by the data-parallel test
(``python -m torch.distributed.run --nproc-per-node 2 tests/tiny_fit.py OUT BATCH``): each rank trains its shard
through DistributedDataParallel and rank 0 writes the run directory and ``OUT/weights.safetensors``.
With no BatchNorm nothing depends on how a global batch is split, so 2 processes x batch 4 and 1 process x
batch 8 must end with the same weights, up to float rounding, if and only if DDP averages the gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnetlab.data.loader import ArrayLoader
from resnetlab.data.pipeline import Pipeline
from resnetlab.training import distributed
from resnetlab.training.config import TrainConfig, make_config
from resnetlab.training.engine import Trainer
from resnetlab.training.precision import pick_precision


class Identity(Pipeline):
    """uint8 images to floats in [0, ``scale``]; no augmentation, so two runs see exactly the same inputs."""

    modality = "image"
    num_classes = 3

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, x, y, train, generator=None):  # the signature from before index and epoch existed
        return x.float() * (self.scale / 255.0), y

    def input_size(self):
        return (1, 4, 4)

    def config(self):
        return {"modality": "image"}


def tiny_model() -> nn.Module:
    """A convolution, a ReLU and a linear head: no batch statistics, so the split of a batch does not matter."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def trainer(out: Path, x: np.ndarray, y: np.ndarray, batch_size: int, *, scale: float = 1.0,
            **options) -> Trainer:
    """A ``Trainer`` of a fresh ``tiny_model`` on uint8 ``x`` (N, 1, 4, 4) and labels ``y`` in 0..2, on the CPU in
    fp32, this rank's shard under torchrun; ``options`` are ``TrainConfig`` fields (lr, epochs, ...)."""
    cfg = make_config(TrainConfig, {"batch_size": batch_size, "warmup_epochs": 0.0, "grad_norm_every": 0,
                                   "quiet": True, "out": str(out), **options})
    loader = ArrayLoader(x, y, batch_size, shuffle=True, drop_last=True, seed=0, rank=distributed.rank(),
                         world_size=distributed.world_size())
    prec = pick_precision(torch.device("cpu"), "fp32", False)
    return Trainer(tiny_model(), Identity(scale), loader, None, cfg, out, {}, prec, log=lambda m: None)


def fit(out: Path, batch_size: int, accum_steps: int = 1, epochs: int = 3,
        nan_at: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Train ``tiny_model`` on 48 fixed samples (per-process ``batch_size``); return its final weights. Every rank
    returns its own copy (DDP keeps them equal). ``nan_at=(rank, step)``: that rank's loss is NaN from that step on
    (the others' stays finite)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(48, 1, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 3, size=48)
    t = trainer(out, x, y, batch_size, accum_steps=accum_steps, epochs=epochs, lr=0.1, weight_decay=1e-3,
                label_smoothing=0.1)
    if nan_at is not None and distributed.rank() == nan_at[0]:
        criterion = t.criterion
        t.criterion = lambda logits, y: criterion(logits, y) * (float("nan") if t.step >= nan_at[1] else 1)
    t.fit()
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


if __name__ == "__main__":  # under torchrun: OUT BATCH
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"))
    out_dir, batch = Path(sys.argv[1]), int(sys.argv[2])
    weights = fit(out_dir, batch)
    if distributed.is_main():
        save_file(weights, str(out_dir / "weights.safetensors"))
    distributed.teardown()
