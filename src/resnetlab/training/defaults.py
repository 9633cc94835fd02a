"""Good defaults chosen from the data: architecture, batch size, epochs, learning rate, augmentation.

Each rule is here, in one place, so a user can read why a run used what it used (the resolved values are
saved in ``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import time

from resnetlab.training.config import TrainConfig

BUDGET_EPOCH_CAP = 1000  # epochs of a --time-budget run without --epochs: the budget ends it long before


def default_arch(modality: str, facts: dict, n_train: int) -> str:
    if modality == "audio":
        # The 1-D TC-ResNet: several times faster than res8 (2-D) on the same features, and as accurate on FSDD
        # (99.4% on the official split, BENCHMARKS.md)
        return "tc_resnet8" if n_train < 20_000 else "tc_resnet14"
    side = facts["img_size"]
    if side <= 64:
        return "resnet20"  # He et al.'s CIFAR net: 3x3 stem, no early downsampling for small images
    return "resnet18" if n_train < 50_000 else "resnet50"


def default_batch_size(n_train: int, device_type: str) -> int:
    if device_type == "cuda":
        return 128 if n_train < 5_000 else 512
    return 32 if n_train < 2_000 else 64 if n_train < 20_000 else 128


def default_epochs(n_train: int) -> int:
    """Fewer passes over large sets: about 15k-60k optimiser steps' worth of samples, at least 5 epochs."""
    if n_train < 1_000:
        return 30
    if n_train < 10_000:
        return 15
    if n_train < 60_000:
        return 10
    return 5


def resolve(cfg: TrainConfig, *, modality: str, facts: dict, n_train: int, device_type: str) -> TrainConfig:
    """A copy of ``cfg`` with every ``None`` ("auto") replaced by the rule's choice."""
    c = dataclasses.replace(cfg)
    c.arch = c.arch or default_arch(modality, facts, n_train)
    c.batch_size = c.batch_size or min(default_batch_size(n_train, device_type), max(n_train, 1))
    c.epochs = c.epochs or (BUDGET_EPOCH_CAP if c.time_budget else default_epochs(n_train))
    if c.lr is None:
        if modality == "audio":  # Tang & Lin's rate for keyword spotting, at batches of 32-64
            c.lr = 2e-3 if c.optimizer == "adamw" else 0.1
        else:  # 0.1 at batch 128, the CIFAR ResNet rate, scaled linearly with the batch (Goyal et al. 2017)
            c.lr = (2e-3 if c.optimizer == "adamw" else 0.2) * c.batch_size / 256
    if c.weight_decay is None:
        c.weight_decay = 0.05 if c.optimizer == "adamw" else 5e-4
    if modality == "image":
        c.img_size = facts["img_size"]
        c.channels = facts["channels"]
        if c.rrc is None:
            c.rrc = c.img_size >= 96
        if c.crop_pad is None:
            c.crop_pad = 0 if c.rrc else max(c.img_size // 8, 1)
    else:
        c.duration = facts["duration"]
    if c.out is None:
        c.out = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{c.arch}"
    return c
