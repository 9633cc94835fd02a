"""The ``Pipeline`` base class and the registry of pipelines by modality (see :mod:`resnetlab.data.pipeline`).

Apart from ``pipeline.py`` so that the pipelines (``image_pipeline.py``, ``audio_pipeline.py``) can import their
base class and register themselves without the module that builds them (``build_pipeline``) being imported back:
the imports run one way, registry -> members -> this module.
"""

from __future__ import annotations

import torch


class Pipeline:
    """Base class. Subclasses implement ``__call__``, ``config`` and ``from_config``.

    ``__call__(x, y, train)`` takes a batch already on the device (``x``: uint8 ``(N, C, H, W)`` images or
    int16 ``(N, T)`` waves; ``y``: int64 labels or ``None``) and returns ``(inputs, targets)``: float model
    input, and targets that are int64 class indices or, after mixup/cutmix, float ``(N, num_classes)``
    probabilities. With ``train=False`` it is deterministic (no augmentation). Training batches may come with
    ``index`` (the samples' positions in the dataset) and ``epoch``, for augmentations that follow each sample
    across epochs; pipelines that draw everything at random ignore them.
    """

    modality: str = ""
    num_classes: int = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, train: bool,
                 generator: torch.Generator | None = None, index: torch.Tensor | None = None,
                 epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def input_size(self) -> tuple[int, ...]:
        """One sample's model-input shape, without the batch axis (e.g. ``(3, 32, 32)`` or ``(1, 40, 101)``)."""
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Pipeline:
        """Move any tensors the pipeline holds (filterbanks, noise clips) to ``device``."""
        return self

    def eval_transform(self) -> torch.nn.Module:
        """The eval-time transform (``self(x, None, train=False)``) as a standalone, exportable module over a copy
        of the pipeline's state: decoded input in (uint8 images; int16 or float waves in [-1, 1)), network input
        out. The exported graph and the deployed predictor run exactly this module."""
        raise NotImplementedError(f"{type(self).__name__} has no eval_transform(): it cannot be exported")

    def set_train_scale(self, scale: float, min_side: int = 8) -> None:
        """Progressive resizing: training batches at ``scale`` (<= 1) of the full input size from now on, never
        below ``min_side`` pixels (the smallest input the model takes).

        Evaluation always runs at the full size. Pipelines without a spatial size (audio) ignore it.
        """


_PIPELINES: dict[str, type] = {}


def register_pipeline(modality: str):
    def deco(cls):
        cls.modality = modality
        _PIPELINES[modality] = cls
        return cls

    return deco
