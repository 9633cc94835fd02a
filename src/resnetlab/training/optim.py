"""Optimizers and schedules. Parameter groups are chosen by name pattern, never by position."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.sgd import sgd as sgd_update


def stage_of(name: str, stage_names: Sequence[str]) -> str:
    """The stage a parameter belongs to: ``stem``, one of ``stage_names`` (``layer1``..), ``head`` or ``final``."""
    top = name.split(".", 1)[0]
    if top in stage_names:
        return top
    if top in ("fc", "dropout", "head", "classifier"):
        return "head"
    if top == "norm":
        return "final"
    return "stem"


def param_groups(model: nn.Module, weight_decay: float, lr: float, *,
                 lr_mult: dict[str, float] | None = None) -> list[dict]:
    """Split trainable parameters into groups: no weight decay on norms and biases (1-D tensors).

    ``lr_mult`` maps shell-style name patterns to learning-rate multipliers (discriminative learning rates:
    ``{"layer1.*": 0.1, "fc.*": 1.0}``); the first matching pattern wins, unmatched parameters get 1.0. Each group
    also lists its parameters' ``names`` and ``blocks`` (a grouped convolution's weight: its number of groups, the
    independent matrices it holds; 1 for everything else), which :func:`build_optimizer` uses for Muon.
    """
    conv_groups = {id(m.weight): m.groups for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    groups: dict[tuple[float, float], list] = {}
    names: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim <= 1 else weight_decay
        mult = 1.0
        for pattern, m in (lr_mult or {}).items():
            if fnmatch.fnmatch(name, pattern):
                mult = m
                break
        groups.setdefault((wd, mult), []).append(p)
        names.setdefault((wd, mult), []).append(name)
    return [{"params": ps, "weight_decay": wd, "lr": lr * mult, "lr_mult": mult, "names": names[(wd, mult)],
             "blocks": [conv_groups.get(id(p), 1) for p in ps]} for (wd, mult), ps in groups.items()]


def _fusable(groups: list[dict]) -> bool:
    """PyTorch's fused SGD/AdamW kernels take floating-point parameters on the CPU or CUDA (one device type)."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    return bool(params) and len(devices) == 1 and devices <= {"cpu", "cuda"} and all(
        p.is_floating_point() for p in params)


def build_optimizer(groups: list[dict], name: str, lr: float, momentum: float = 0.9, *,
                    muon_lr: float = 0.15, muon_momentum: float = 0.6,
                    stage_names: Sequence[str] = ()) -> torch.optim.Optimizer:
    """SGD (Nesterov when ``momentum`` > 0), AdamW or Muon over ``groups``, fused where PyTorch supports it.

    The fused step is one kernel over all parameters instead of a loop of small ones, the same update: on this
    project's CPUs the optimizer step of ResNet-18 takes 3.9 ms instead of 15.1 ms, 1-2% of a whole training step
    (``benchmarks/bench_precision.py``). ``muon``: :class:`Muon` for the filters and weight matrices inside
    ``stage_names`` (at ``muon_lr``, ``muon_momentum``), SGD as above for everything else.
    """
    clean = [{k: v for k, v in g.items() if k not in ("names", "blocks")} for g in groups]
    fused = {"fused": True} if _fusable(clean) else {}
    if name == "sgd":
        return torch.optim.SGD(clean, lr=lr, momentum=momentum, nesterov=momentum > 0, **fused)
    if name == "adamw":
        return torch.optim.AdamW(clean, lr=lr, betas=(0.9, 0.999), **fused)
    if name == "muon":
        if lr <= 0 or muon_lr <= 0:
            raise ValueError(f"muon needs lr > 0 and muon_lr > 0, got {lr} and {muon_lr}")
        split = []
        for g in groups:
            if "names" not in g:
                raise ValueError("muon picks its parameters by name: build the groups with param_groups()")
            hidden = [p.ndim >= 2 and stage_of(n, stage_names) in stage_names for n, p in zip(g["names"], g["params"])]
            blocks = g.get("blocks") or [1] * len(hidden)
            rest = {k: v for k, v in g.items() if k not in ("names", "blocks")}
            if not all(hidden):
                split.append({**rest, "params": [p for p, h in zip(g["params"], hidden) if not h]})
            if any(hidden):  # the same schedule: the group's lr multiplier carries the ratio of the two lrs
                mult = g.get("lr_mult", 1.0) * muon_lr / lr
                split.append({**rest, "params": [p for p, h in zip(g["params"], hidden) if h],
                              "blocks": [b for b, h in zip(blocks, hidden) if h], "muon": True,
                              "lr": lr * mult, "lr_mult": mult, "momentum": muon_momentum, "weight_decay": 0.0,
                              # for weights that start at zero (no norm to keep): SGD's update, at SGD's settings
                              "sgd_lr_ratio": lr / muon_lr, "sgd_momentum": momentum,
                              "sgd_weight_decay": g["weight_decay"]})
        return Muon(split, lr=lr, momentum=momentum, **fused)
    raise ValueError(f"unknown optimizer {name!r}; allowed: sgd, adamw, muon")


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About the nearest semi-orthogonal matrix to the matrix ``g`` (``U V^T`` of its SVD), or to each of a batch
    ``(..., m, n)`` of them: Newton-Schulz iterations in bf16 with Muon's quintic coefficients (Jordan et al.
    2024)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * (s @ s)) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, as in airbench94_muon) for the groups marked ``muon=True``, Nesterov SGD for the
    others: one optimizer, so schedules, checkpoints and the gradient scaler treat it as any other.

    A Muon group's update is its Nesterov momentum (``buf = momentum * buf + grad``; ``grad + momentum * buf``)
    replaced by the nearest semi-orthogonal matrix (a filter as an ``out x in*k*k`` matrix: every direction moves
    at the same rate; 5 Newton-Schulz steps, Muon's default, where airbench94_muon uses 3). As in airbench,
    each weight keeps a fixed norm and ``lr`` is the relative step: the weight
    is rescaled to the norm it had at its first step, then moves by ``lr * norm / sqrt(min(out, in*k*k))`` times
    the orthogonal matrix, a step of about ``lr`` times its norm whatever its shape (airbench fixes the norm at
    ``sqrt(out)``: the same step for its filters, all wider than tall; keeping the weight's own norm leaves
    pretrained layers at their scale, which frozen BatchNorm statistics rely on). What follows a convolution in a
    ResNet is a normalisation layer, or a sum the next one normalises, so the scale is the norm layers' to learn.
    No weight decay there: the norm is fixed. A weight that starts at zero (a zero-initialised residual branch)
    has no norm to keep; it takes the SGD update at the group's ``sgd_*`` settings instead. A grouped
    convolution (ResNeXt) holds ``groups`` independent matrices, each acting on its own inputs: each is
    orthogonalised on its own (the group's ``blocks``, aligned with its ``params``), so every group's every
    direction moves, and together they step ``lr`` times the weight's norm. (A depthwise filter's groups are single
    rows, whose one singular value the 5 quintic steps leave at about 0.7: they step about 0.7 ``lr``.)
    PyTorch's ``torch.optim.Muon`` takes 2-D parameters only; this one takes convolution filters of any rank.
    The other groups take ``torch.optim.SGD``'s update (weight decay coupled, Nesterov when momentum > 0).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, ns_steps: int = 5,
                 fused: bool | None = None):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "muon": False,
                                  "ns_steps": ns_steps, "fused": fused, "sgd_lr_ratio": 1.0, "sgd_momentum": momentum,
                                  "sgd_weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, momentum = group["lr"], group["momentum"]
            if not group["muon"]:
                self._sgd(params, lr, momentum, group["weight_decay"], group.get("fused"))
                continue
            free = []
            for p, n in zip(group["params"], group.get("blocks") or [1] * len(group["params"])):
                if p.grad is None:
                    continue
                state = self.state[p]
                if "norm" not in state:
                    state["norm"] = p.detach().norm()
                    state["free"] = bool(state["norm"] == 0)
                if state.get("free"):
                    free.append(p)
                    continue
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(momentum).add_(p.grad)
                update = orthogonalize(p.grad.add(buf, alpha=momentum).reshape(n, len(p) // n, -1),
                                       group["ns_steps"])
                p.mul_(state["norm"] / p.norm().clamp_min(1e-12))
                p.add_(update.view_as(p) * (state["norm"] * (-lr / (n * min(update.shape[-2:])) ** 0.5)))
            if free:
                self._sgd(free, lr * group["sgd_lr_ratio"], group["sgd_momentum"], group["sgd_weight_decay"],
                          group.get("fused"))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """PyTorch's, keeping each group's ``blocks``: they describe the model, not the run, and a checkpoint
        written before they existed has none."""
        blocks = [g.get("blocks") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, kept in zip(self.param_groups, blocks):
            if kept is not None:
                group["blocks"] = kept

    def _sgd(self, params: list[torch.Tensor], lr: float, momentum: float, weight_decay: float,
             fused: bool | None) -> None:
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        sgd_update(params, [p.grad for p in params], bufs, fused=fused or None, weight_decay=weight_decay,
                   momentum=momentum, lr=lr, dampening=0.0, nesterov=momentum > 0, maximize=False)
        if momentum > 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf


def lr_at(step: int, total_steps: int, warmup_steps: int, schedule: str, time_fraction: float | None = None) -> float:
    """Learning-rate factor in [0, 1] at ``step`` (0-based): linear warm-up, then the schedule.

    ``cosine`` decays to 0 by the last step; ``linear`` decays linearly to 0 (the shape that trains
    fastest in short budgets, as in airbench; the Hugging Face Trainer's ``linear``); ``constant`` stays at 1;
    ``step`` divides by 10 at half and at three quarters of the steps (He et al. 2015).
    (The config reads ``onecycle``, this schedule's old name, as ``linear``.) ``time_fraction`` (a time budget's
    share spent since the warm-up, in [0, 1]) moves the decay on when time runs out before the steps do.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    t = min(max((step - warmup_steps) / span, time_fraction or 0.0, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return max(1.0 - t, 0.0)
    if schedule == "step":  # He et al. 2015 (CIFAR): lr / 10 at 32k and again at 48k of 64k iterations
        return 0.1 ** ((t >= STEP_MILESTONES[0]) + (t >= STEP_MILESTONES[1]))
    raise ValueError(f"unknown schedule {schedule!r}; allowed: linear, cosine, constant, step")


STEP_MILESTONES = (0.5, 0.75)  # the step schedule's drops, as shares of the steps after the warm-up


def set_lr(opt: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    for g in opt.param_groups:
        g["lr"] = base_lr * g.get("lr_mult", 1.0) * factor
    return base_lr * factor
