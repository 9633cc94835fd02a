"""The learning-rate range test (Smith 2015; fastai's ``lr_find``): raise the lr exponentially, watch the loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

from resnetlab.training.engine import Phase, Trainer
from resnetlab.training.optim import set_lr


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]  # exponentially smoothed, bias-corrected
    suggestion: float  # a tenth of the lr at the minimum loss: safely before the loss blows up
    steepest: float  # where the smoothed loss falls fastest
    valley: float  # fastai's "valley" suggestion (its default since fastai 2.4): see valley()


def lr_range_test(trainer: Trainer, *, start_lr: float = 1e-6, end_lr: float = 10.0, steps: int = 100,
                  smooth: float = 0.9, diverge: float = 4.0) -> LRFindResult:
    """Train ``steps`` batches with the lr going from ``start_lr`` to ``end_lr`` geometrically; stop when the
    smoothed loss exceeds ``diverge`` times its minimum. The trainer's model is changed: use a throwaway copy.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr}, {end_lr}")
    if steps < 5:
        raise ValueError(f"steps must be >= 5, got {steps}")
    # groups keep their lr ratios (discriminative lrs, FastResNet's bias multiplier, the Muon part's lr): the
    # sweep moves them all in proportion, from the run's configured lr
    trainer.phases = [Phase("lr-find", 1, lr=trainer.cfg.lr or start_lr)]
    trainer._enter_phase(0)
    trainer.model.train()
    ratio = (end_lr / start_lr) ** (1 / (steps - 1))
    lrs, losses = [], []
    avg, best = 0.0, math.inf
    step = 0
    epoch = 0
    while step < steps:
        for xb, yb in trainer.train_loader.epoch(epoch):
            lr = start_lr * ratio ** step
            set_lr(trainer.opt, lr, 1.0)
            loss_sum, _, n = trainer.train_step(xb, yb)
            loss = float(loss_sum) / n  # one read per step: the sweep needs every step's loss
            if not math.isfinite(loss):
                break
            avg = smooth * avg + (1 - smooth) * loss
            smoothed = avg / (1 - smooth ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            step += 1
            if smoothed > diverge * best or step >= steps:
                break
        else:
            epoch += 1
            continue
        break
    if len(losses) < 3:
        raise ValueError("the loss diverged at once: lower start_lr")
    i_min = min(range(len(losses)), key=losses.__getitem__)
    slopes = [(losses[i + 1] - losses[i - 1]) for i in range(1, max(i_min, 2))]
    i_steep = 1 + min(range(len(slopes)), key=slopes.__getitem__) if slopes else 0
    return LRFindResult(lrs, losses, lrs[i_min] / 10, lrs[i_steep], lrs[valley(losses)])


def valley(losses: list[float]) -> int:
    """Index of fastai's "valley" suggestion in a range test's smoothed ``losses`` (fastai's ``valley``): the
    longest decreasing subsequence of the losses marks the valley, from its start to its end, and the suggestion
    sits at half of its first two thirds (index start + s + s // 2 with s a third of the valley's length), where the
    loss is still falling steeply, well before its minimum. As fastai, the first tenth and the last 5 points (the
    flat start, the blow-up) are left out when there are enough of them."""
    lo, hi = len(losses) // 10, len(losses) - 5
    if hi - lo < 3:
        lo, hi = 0, len(losses)
    xs = losses[lo:hi]
    run = [1] * len(xs)  # run[i]: the longest decreasing subsequence ending at i
    start = end = 0
    for i in range(1, len(xs)):
        for j in range(i):
            if xs[i] < xs[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
            if run[end] < run[i]:
                end = i
                start = end - run[end]
    third = (end - start) / 3
    return lo + start + int(third) + int(third / 2)
