"""An exponential moving average of a model's weights and buffers, updated with one foreach call per step.

``torch.optim.swa_utils.AveragedModel`` tests ``n_averaged == 0`` on a device tensor at every update (a host
sync each step on a GPU) and walks the parameters in Python; this keeps the count on the host and updates every
floating-point tensor with one ``torch._foreach_lerp_``. Same arithmetic as ``AveragedModel`` with
``get_ema_multi_avg_fn(decay)`` and ``use_buffers=True``: the first update copies, each later one moves the
average ``1 - decay`` of the way to the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA(nn.Module):
    """``module``: the averaged copy (validated, saved as ``best`` when it wins); ``n_averaged``: updates so far.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are copied from the model, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.n_averaged = 0
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None
        self._source: nn.Module | None = None

    def _tensors(self, model: nn.Module):
        """(averaged floats, model floats, averaged others, model others), cached per source model: which tensors a
        module holds does not change between steps (load_state_dict copies into them)."""
        if self._source is not model or self._pairs is None:
            mine = [*self.module.parameters(), *self.module.buffers()]
            theirs = [*model.parameters(), *model.buffers()]
            if len(mine) != len(theirs):
                raise ValueError(f"EMA of a model with {len(mine)} tensors updated from one with {len(theirs)}")
            # the Parameter objects themselves (not detached views): a later ``.data`` swap stays visible
            floats = [(a, b) for a, b in zip(mine, theirs) if a.is_floating_point()]
            others = [(a, b) for a, b in zip(mine, theirs) if not a.is_floating_point()]
            self._pairs = ([a for a, _ in floats], [b for _, b in floats], [a for a, _ in others],
                           [b for _, b in others])
            self._source = model
        return self._pairs

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        avg, src, avg_other, src_other = self._tensors(model)
        if self.n_averaged == 0:
            torch._foreach_copy_(avg, src)
        else:
            torch._foreach_lerp_(avg, src, 1.0 - self.decay)
        if avg_other:
            torch._foreach_copy_(avg_other, src_other)
        self.n_averaged += 1

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
