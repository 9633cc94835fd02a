"""Fine-tuning strategies, as phases of the one training loop.

Each strategy is a list of :class:`~resnetlab.training.engine.Phase` (which parameters train, at which learning
rates, whether BatchNorm statistics are frozen). Parameters are chosen by name pattern (``fc.*``, ``layer4.*``),
never by position, so the same strategy works for any resnetlab model:

* ``linear-probe``: only the classifier trains; the backbone, its BatchNorm statistics included, is frozen.
* ``full``: everything trains, with discriminative learning rates (each stage ``lr_decay`` times the next).
* ``staged``: the head alone first (``head_epochs``), then everything with discriminative learning rates.
* ``gradual``: gradual unfreezing (Howard & Ruder 2018): the head, then one more stage per phase from the top.
* ``lp-ft``: linear probe, then full fine-tuning at a tenth of the learning rate, so the features are not
  distorted by a random head (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features").

A frozen part is frozen whole: the engine keeps its BatchNorm layers in eval mode, so their running statistics
stay the pretrained ones too (in the head phases and in gradual unfreezing's still-frozen stages).
``freeze_bn=True`` does the same for every backbone BatchNorm in every phase, trained parts included: the usual
choice for small batches.
"""

from __future__ import annotations

from torch import nn

from resnetlab.training.engine import Phase

STRATEGIES = ("linear-probe", "full", "staged", "gradual", "lp-ft")
HEAD = ["fc.*"]
HEAD_MODULES = ("fc", "dropout", "avgpool")  # after the body; only fc has parameters


def stage_patterns(model: nn.Module) -> list[list[str]]:
    """Parameter-name patterns from the input to the output: the stem, then each stage.

    Top-level modules registered before the first stage form the stem (``conv1``, ``bn1``); those after the
    last stage (the final ``norm`` of pre-activation nets, the ``tail`` conv of res15) join the last stage.
    The head (``fc``) is in none of the groups.
    """
    stages = list(getattr(model, "stage_names", []))
    tops: list[str] = []
    for name, _ in model.named_parameters():  # registration order: input to output
        top = name.split(".", 1)[0]
        if top not in tops and top not in HEAD_MODULES:
            tops.append(top)
    if not stages:  # not a staged network: the whole body is one group
        return [[f"{t}.*" for t in tops]] if tops else []
    first = min((tops.index(s) for s in stages if s in tops), default=len(tops))
    stem = [t for t in tops[:first] if t not in stages]
    after = [t for t in tops[first:] if t not in stages]
    groups = [[f"{t}.*" for t in stem]] if stem else []
    groups += [[f"{s}.*"] for s in stages]
    groups[-1] = groups[-1] + [f"{t}.*" for t in after]
    return groups


def discriminative_lr(model: nn.Module, decay: float) -> dict[str, float]:
    """``{pattern: multiplier}``: the head at 1, the last stage at ``decay``, the one before at ``decay**2``..."""
    mult: dict[str, float] = {p: 1.0 for p in HEAD}
    for depth, patterns in enumerate(reversed(stage_patterns(model)), start=1):
        for p in patterns:
            mult[p] = decay ** depth
    return mult


def make_phases(strategy: str, model: nn.Module, epochs: int, *, head_epochs: int | None = None,
                lr: float, lr_decay: float = 0.3, freeze_bn: bool = False) -> list[Phase]:
    """The phases of ``strategy`` over ``epochs`` in total. ``head_epochs``: the head-only part (default ~1/3)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
    backbone = [p for group in stage_patterns(model) for p in group]
    if strategy == "linear-probe":
        return [Phase("linear-probe", epochs, freeze=backbone, lr=lr, frozen_bn=True)]
    if strategy == "full":
        return [Phase("full", epochs, lr_mult=discriminative_lr(model, lr_decay), lr=lr, frozen_bn=freeze_bn)]
    if epochs < 2:
        raise ValueError(f"strategy {strategy!r} needs at least 2 epochs (a head phase, then more), got {epochs}")
    head = head_epochs if head_epochs is not None else max(1, epochs // 3)
    if not 1 <= head < epochs:
        raise ValueError(f"head_epochs must be between 1 and epochs - 1 ({epochs - 1}), got {head}")
    probe = Phase("head", head, freeze=backbone, lr=lr, frozen_bn=True)
    rest = epochs - head
    if strategy == "staged":
        return [probe, Phase("all", rest, lr_mult=discriminative_lr(model, lr_decay), lr=lr, frozen_bn=freeze_bn)]
    if strategy == "lp-ft":
        return [Phase("linear-probe", head, freeze=backbone, lr=lr, frozen_bn=True),
                Phase("fine-tune", rest, lr=lr / 10, frozen_bn=freeze_bn)]
    # gradual: unfreeze one stage group per phase from the top, spreading the remaining epochs.
    groups = stage_patterns(model)
    n = min(len(groups), rest)
    phases = [probe]
    sizes = [rest // n + (1 if i < rest % n else 0) for i in range(n)]
    for i, size in enumerate(sizes):
        unfrozen = len(groups) if i == n - 1 else i + 1
        frozen = [p for group in groups[: len(groups) - unfrozen] for p in group]
        phases.append(Phase(f"unfreeze-{i + 1}", size, freeze=frozen, lr=lr,
                            lr_mult=discriminative_lr(model, lr_decay), frozen_bn=freeze_bn))
    return phases
