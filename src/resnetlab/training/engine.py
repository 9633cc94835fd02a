"""The one training loop of resnetlab, for every modality.

A ``Trainer`` gets a model, a pipeline (images or audio: how cached batches become model input), the
cached train/val arrays and a config, and writes the run directory:

    RUN_DIR/config.yaml          the resolved config and the code version
    RUN_DIR/metrics.jsonl        one line per epoch: losses, accuracies, lr, seconds, samples/s
    RUN_DIR/metrics.csv          the same records as a table; steps.csv: every cfg.log_every steps (loggers.py)
    RUN_DIR/grad_norms.jsonl     per-stage gradient norms over training
    RUN_DIR/checkpoints/last.safetensors, best.safetensors   (atomic; see checkpoint.py)

Speed tricks (bf16 autocast, channels-last, compile, data on the device) sit behind ``precision.py``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from resnetlab.data.loader import ArrayLoader
from resnetlab.data.pipeline import Pipeline
from resnetlab.fileio import atomic_write
from resnetlab.training import checkpoint as ckpt
from resnetlab.training import distributed
from resnetlab.training.config import TrainConfig
from resnetlab.training.ema import WeightEMA
from resnetlab.training.evaluate import Predictions, predict_loader
from resnetlab.training.loggers import RunLoggers, write_epoch_csv
from resnetlab.training.optim import build_optimizer, lr_at, param_groups, set_lr, stage_of
from resnetlab.training.precision import Precision


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; training stops and the last good checkpoint is kept."""


class _StopRequested(KeyboardInterrupt):
    """SIGTERM or Ctrl-C (SIGINT) seen by some rank, agreed on by all at an optimizer-step boundary."""


@dataclass
class Phase:
    """A span of epochs with its own trainable parameters and learning rates (fine-tuning strategies).

    ``freeze``: name patterns of parameters kept frozen; ``lr_mult``: name pattern -> lr multiplier;
    ``frozen_bn``: keep the backbone's BatchNorm layers in eval mode (running statistics frozen) in this phase.
    """

    name: str
    epochs: int
    freeze: list[str] = field(default_factory=list)
    lr_mult: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    frozen_bn: bool = False


@dataclass
class FitResult:
    run_dir: Path
    best_acc: float
    best_epoch: int
    epochs: int
    seconds: float
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)


def _soft_accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    t = target.argmax(1) if target.dim() == 2 else target
    return (logits.argmax(1) == t).float().sum()


class Trainer:
    """Fit ``model`` on ``train_loader`` with ``pipeline``; validate on ``val_loader`` every epoch.

    ``meta`` is what a checkpoint must carry to rebuild the model for prediction (arch, num_classes,
    in_chans, model_overrides, classes); the trainer adds the pipeline config and the counters.
    ``phases`` (fine-tuning) split the epochs into spans with their own frozen parts and learning rates;
    by default one phase trains everything.

    Under torchrun (see ``distributed.py``) the model is trained through DistributedDataParallel, built again
    at each phase; ``self.model`` stays the plain module that is validated and saved. ``is_main`` (default:
    rank 0) is the process that writes files. ``cfg.accum_steps`` batches make one optimizer step.

    ``callbacks`` (see ``loggers.CallbackLogger``) and the loggers named in ``cfg.loggers`` get each epoch's record and,
    every ``cfg.log_every`` steps, the step's values (on the process that writes files).
    """

    def __init__(self, model: nn.Module, pipeline: Pipeline, train_loader: ArrayLoader,
                 val_loader: ArrayLoader | None, cfg: TrainConfig, run_dir: str | Path, meta: dict,
                 prec: Precision, *, phases: list[Phase] | None = None, log=print, is_main: bool | None = None,
                 callbacks=None):
        self.model = model.to(prec.device)
        if prec.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.distributed = distributed.is_enabled()
        self.rank = distributed.rank()
        if cfg.sync_bn:  # before the EMA copy, the optimizer and DDP; a no-op in a single process
            self.model = distributed.convert_sync_batchnorm(self.model, prec.device)
        self.pipeline = pipeline.to(prec.device)
        if hasattr(self.pipeline, "set_output"):  # training batches straight in the autocast dtype and layout
            self.pipeline.set_output(prec.dtype, prec.channels_last)
        self._per_sample = _takes_sample_index(self.pipeline)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.meta = dict(meta)
        self.prec = prec
        self.log = log
        self.is_main = distributed.is_main() if is_main is None else is_main
        self.phases = phases or [Phase("train", cfg.epochs)]
        # parameters the model froze itself (FastResNet's whitening filters and BN scales) stay frozen in every phase;
        # its own lr multipliers (FastResNet's fast BN biases) apply when it trains from scratch (no phases given)
        self.fixed = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        self.model_lr_mult = getattr(ckpt.unwrap(self.model), "lr_multipliers", dict)() if phases is None else {}
        self.min_side = getattr(ckpt.unwrap(self.model), "min_input_size", 8)  # for progressive resizing
        self.total_epochs = sum(p.epochs for p in self.phases)
        if cfg.time_budget and len(self.phases) > 1:
            raise ValueError(f"--time-budget works with single-phase training (train, or finetune --strategy full or "
                             f"linear-probe); this run has {len(self.phases)} phases")
        # a time budget: wall seconds of training so far (this run's earlier sessions included), agreed by every
        # rank (rank 0's clock), and where the warm-up ended, in seconds and steps: the decay is spread over the rest
        self.budget_s = cfg.time_budget * 60.0
        self.clock = 0.0
        self.warmup_end: tuple[float, int, float] | None = None  # (seconds, steps, the lr factor it reached)
        self.steps_per_epoch = len(train_loader)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        # each rank its own augmentation stream; rank 0's is the single-process one
        self.aug_gen = torch.Generator(device=prec.device).manual_seed(cfg.seed + 1 + 1000 * self.rank)
        self.scaler = prec.scaler()
        self.ema = WeightEMA(self.model, cfg.ema) if cfg.ema > 0 else None
        # lookahead: the slow copy of every floating-point weight and buffer (see _lookahead)
        self.slow: dict[str, torch.Tensor] | None = (
            {k: v.detach().clone() for k, v in self.model.state_dict().items() if v.is_floating_point()}
            if cfg.lookahead else None)
        self.ddp: nn.Module | None = None  # DistributedDataParallel(self.model), built by _enter_phase
        # static shapes: progressive resizing uses a few fixed sizes (COMPILE_SIZE_BUCKETS), one compilation each
        self.forward_model = torch.compile(self.model, dynamic=False) if cfg.compile else self.model
        self._compiled_shapes: set[tuple] = set()
        self._compile_s = 0.0  # seconds of steps that compiled (a new input shape): not charged to a time budget
        self._compile_s_recorded = 0.0  # of which in earlier epochs' records
        self._accum = (0, 1)  # (index in its accumulation group, group size) of the next train_step's batch
        self._saved_step = 0  # self.step at the latest save of checkpoints/last (for checkpoint_every)
        self._last_saved: str | None = None  # where that checkpoint stands, for the divergence message
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.best_acc, self.best_epoch = -1.0, -1
        self.history: list[dict] = []
        self._phase_index = -1
        self.opt: torch.optim.Optimizer | None = None
        self._stop_requested = False
        # whether the counters, weights, optimizer, RNG states and epoch sums describe one moment (between two
        # optimizer steps, or while an epoch's end is validated): only then can a KeyboardInterrupt save them
        self._consistent = True
        self._pending_best: nn.Module | None = None  # checkpoints/best to write right after checkpoints/last
        self.best_source = "model"  # which weights checkpoints/best holds: "model" or "ema"
        # the budget's clock: this session's start, the seconds spent before it, and the latest value written to
        # checkpoints/clock.json (see _save_clock)
        self._t_start, self._clock_base, self._clock_saved = 0.0, 0.0, 0.0  # (set by fit)
        # (loss sum, correct, samples) of the batches done so far in this epoch; checkpointed, so the epoch's
        # train_loss / train_acc after a mid-epoch resume cover the whole epoch, not only the resumed part
        self.epoch_sums = (0.0, 0.0, 0.0)
        self.callbacks = callbacks
        self.loggers: RunLoggers | None = None  # opened by fit, on the main process
        # per-step logging: the latest batch's loss (a device tensor, read only when logged), the latest gradient
        # norm the engine computed (clipping or grad_norm_every) with the step it belongs to, and the samples and
        # time since the last logged step
        self._step_loss: torch.Tensor | None = None
        self._grad_norm: tuple[int, torch.Tensor | float] | None = None
        self._log_mark = (0.0, 0)
        # The same sums of this session's batches, this rank's, kept on the device and read once per epoch (and at
        # saves and checks), not after every step: each read is a host sync on a GPU. _sums_base holds the part
        # from before a mid-epoch resume (every rank's).
        self._sums = torch.zeros(3, dtype=torch.float64, device=prec.device)
        self._sums_base = (0.0, 0.0, 0.0)
        # (step, loss) of this rank's first non-finite loss (step -1: none yet), recorded on the device and read
        # every FINITE_CHECK_EVERY steps (every optimizer step under torchrun, all-reduced with the stop flag)
        self._first_bad = torch.full((2,), -1.0, dtype=torch.float64, device=prec.device)
        self._checked_step = 0

    # --- phases, optimizer ---------------------------------------------------------------------------
    def _phase_for_epoch(self, epoch: int) -> tuple[int, Phase, int]:
        start = 0
        for i, p in enumerate(self.phases):
            if epoch < start + p.epochs:
                return i, p, start
            start += p.epochs
        return len(self.phases) - 1, self.phases[-1], start - self.phases[-1].epochs

    def _enter_phase(self, index: int) -> None:
        import fnmatch

        phase = self.phases[index]
        for name, p in self.model.named_parameters():
            p.requires_grad_(name not in self.fixed and not any(fnmatch.fnmatch(name, pat) for pat in phase.freeze))
        lr = phase.lr if phase.lr is not None else self.cfg.lr
        groups = param_groups(self.model, self.cfg.weight_decay, lr, lr_mult=phase.lr_mult or self.model_lr_mult)
        if not groups:
            raise ValueError(f"phase {phase.name!r} freezes every parameter: nothing to train")
        # the Muon part's lr follows the phase's lr (lp-ft's tenth) in the configured ratio
        muon_lr = self.cfg.muon_lr * lr / self.cfg.lr if self.cfg.lr else self.cfg.muon_lr
        self.opt = build_optimizer(groups, self.cfg.optimizer, lr, self.cfg.momentum, muon_lr=muon_lr,
                                   muon_momentum=self.cfg.muon_momentum,
                                   stage_names=getattr(ckpt.unwrap(self.model), "stage_names", ()))
        self.base_lr = lr
        self._phase_index = index
        if self.distributed:  # DDP replicates the parameters trainable in this phase (a collective: every rank)
            self.ddp = distributed.wrap_ddp(self.model, self.prec.device)
            self.forward_model = torch.compile(self.ddp) if self.cfg.compile else self.ddp
        if len(self.phases) > 1:
            n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            self.log(f"phase {phase.name}: {phase.epochs} epochs, {n_train:,} trainable parameters, lr {lr:g}")

    def _set_train_mode(self, phase: Phase) -> None:
        (self.ddp if self.ddp is not None else self.model).train()
        # BN layers that keep their (pretrained) running statistics, in eval mode: the whole backbone's with
        # frozen_bn, and always those of frozen parts, so a frozen stage is frozen whole (as timm's freeze does).
        # Affine-free BN (res8/15/26) has no parameters to match the patterns: its buffer's name stands in.
        import fnmatch

        for name, m in self.model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith("fc"):
                if phase.frozen_bn or any(fnmatch.fnmatch(f"{name}.running_mean", p) for p in phase.freeze):
                    m.eval()

    # --- checkpoints ---------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {**self.meta, "pipeline": self.pipeline.config(), "epoch": self.epoch, "step": self.step,
                "batch_in_epoch": self.batch_in_epoch, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "phase": self._phase_index, "precision": self.prec.name, "epoch_sums": list(self.epoch_sums),
                "clock": self.clock, "warmup_end": self.warmup_end, "best_source": self.best_source}

    def _model_tensors(self, model: nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
        return {prefix + k: v for k, v in ckpt.unwrap(model).state_dict().items()}

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state(), "aug": self.aug_gen.get_state()}
        if self.prec.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.prec.device)
        return state

    def _position(self) -> str:
        if self.batch_in_epoch:
            return f"epoch {self.epoch + 1}, batch {self.batch_in_epoch}"
        return f"end of epoch {self.epoch}" if self.epoch else "start"

    def _kept(self) -> str:
        if self._last_saved is None:
            return "no checkpoint was written before it"
        return f"training stopped; checkpoints/last ({self._last_saved}) is kept"

    def _check_finite(self) -> None:
        """TrainingDiverged if a weight or buffer is NaN or infinite, so such a model is never saved."""
        state = {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        ok = torch.stack([torch.isfinite(v).all() for v in state.values()]) if state else torch.ones(0, dtype=bool)
        if not bool(ok.all()):
            name = next(k for k, good in zip(state, ok.tolist()) if not good)
            raise TrainingDiverged(f"{name} became NaN or infinite at epoch {self.epoch + 1}, step {self.step}: lower "
                                   f"--lr or turn on --grad-clip; {self._kept()}")

    def save_last(self) -> None:
        """Write ``checkpoints/last`` (rank 0; under torchrun every rank must call it: it gathers RNG states)."""
        if not self.distributed:  # (under torchrun a bad loss was caught, on every rank, at the step's all-reduce)
            self._raise_if_diverged()
        self._check_finite()
        self.epoch_sums = self._epoch_totals() if self.batch_in_epoch else (0.0, 0.0, 0.0)
        rng = distributed.all_gather_object(self._rng_state()) if self.distributed else [self._rng_state()]
        if not self.is_main:
            self._saved_step, self._last_saved = self.step, self._position()
            self._pending_best = None
            distributed.barrier()
            return
        self._save_clock(force=True)
        tensors = self._model_tensors(self.model)
        meta = self._meta()
        if self.scaler is not None:  # fp16: the loss scale it had found, so a resumed run does not search again
            meta["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            tensors.update({"ema." + k: v for k, v in self.ema.module.state_dict().items()})
            tensors["ema_n_averaged"] = torch.tensor([self.ema.n_averaged], dtype=torch.int64)
        if self.slow is not None:
            tensors.update({"lookahead." + k: v for k, v in self.slow.items()})
        if self.opt is not None:
            opt_tensors, opt_info = ckpt.flatten_optimizer(self.opt)
            tensors.update(opt_tensors)
            meta["optimizer"] = opt_info
        for r, state in enumerate(rng):  # rank 0's as rng.torch, rng.aug, rng.cuda; rank r's as rng.rankR.*
            prefix = "rng." if r == 0 else f"rng.rank{r}."
            tensors.update({prefix + k: v for k, v in state.items()})
        meta["history"] = self.history
        meta["world_size"] = len(rng)
        ckpt.save_checkpoint(self.run_dir / "checkpoints" / "last.safetensors", tensors, meta)
        self._saved_step, self._last_saved = self.step, self._position()
        # best after last, so that best's record is never ahead of last's: a run killed between the two writes
        # has last saying which epoch is best, and its resume rebuilds best from last's weights (_repair_best)
        if self._pending_best is not None:
            self.save_best(self._pending_best)
            self._pending_best = None
        distributed.barrier()

    def save_best(self, model: nn.Module) -> None:
        if self.is_main:
            ckpt.save_checkpoint(self.run_dir / "checkpoints" / "best.safetensors", self._model_tensors(model),
                                 self._meta(), keep_previous=False)

    def _repair_best(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """``checkpoints/best`` from last's weights when it is behind last's record of the best epoch (a run killed
        between writing last and best): what the uninterrupted run wrote, since best is written right after last
        from the same weights (``best_source``: the model's or the EMA's)."""
        if not self.is_main or self.best_epoch < 0 or meta.get("best_source") not in ("model", "ema"):
            return
        path = self.run_dir / "checkpoints" / "best.safetensors"
        try:
            _, best_meta = ckpt.read_checkpoint(path, prefixes=())  # the header only
            if int(best_meta.get("best_epoch", -1)) >= self.best_epoch:
                return
        except (ckpt.CheckpointError, ValueError, TypeError):
            pass  # missing or unreadable: rebuilt
        weights = ckpt.strip_prefix(tensors, meta["best_source"] + ".")
        if not weights:
            return
        record = {k: v for k, v in meta.items() if k not in ("history", "optimizer", "world_size")}
        ckpt.save_checkpoint(path, {"model." + k: v for k, v in weights.items()}, record, keep_previous=False)
        self.log(f"checkpoints/best rebuilt from {path.parent / 'last.safetensors'} (epoch {self.best_epoch}): "
                 "the run had stopped between writing the two")

    def _save_clock(self, force: bool = False) -> None:
        """Under a time budget, rank 0 writes the seconds spent so far to ``checkpoints/clock.json`` at most every
        ``CLOCK_SAVE_EVERY_S`` (and at every save of last), so a run killed between checkpoints resumes with the
        time it spent, not with its last checkpoint's."""
        if not self.is_main or self.budget_s <= 0:
            return
        now = self._own_clock() if force else self.clock
        if force or now - self._clock_saved >= CLOCK_SAVE_EVERY_S:
            atomic_write(self.run_dir / "checkpoints" / CLOCK_FILE, json.dumps({"clock": now, "step": self.step}))
            self._clock_saved = now

    def _saved_clock(self) -> float:
        """The seconds in ``checkpoints/clock.json`` (0 when it is missing or unreadable)."""
        try:
            return float(json.loads((self.run_dir / "checkpoints" / CLOCK_FILE).read_text())["clock"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def _own_clock(self) -> float:
        """What this process adds to the all-reduce of the clock: the budget's seconds so far on rank 0 (this run's
        earlier sessions included), 0 on the others."""
        if self.rank != 0:
            return 0.0
        return self._clock_base + time.perf_counter() - self._t_start - self._compile_s  # compiling: not charged

    def resume(self) -> bool:
        """Restore model, optimizer, EMA, RNG states and counters from ``checkpoints/last``."""
        path = self.run_dir / "checkpoints" / "last.safetensors"
        if not path.exists() and not ckpt.previous_path(path).exists():
            return False
        tensors, meta, used = ckpt.read_latest(path, log=self.log)
        saved_world, world = int(meta.get("world_size", 0)), distributed.world_size()
        if saved_world and saved_world != world:
            # each rank's share of an epoch, the batch position inside it and the global batch all depend on the
            # number of processes: the run would not continue its own schedule on other samples
            raise ValueError(f"cannot resume {self.run_dir} with {world} process{'es' if world > 1 else ''}: its "
                             f"checkpoint was written by {saved_world}; resume it with {saved_world} "
                             f"(torchrun --nproc-per-node), or start a new run")
        ckpt.load_weights(ckpt.unwrap(self.model), ckpt.strip_prefix(tensors, "model."), used)
        if self.ema is not None and any(k.startswith("ema.") for k in tensors):
            self.ema.module.load_state_dict(ckpt.strip_prefix(tensors, "ema."))
            self.ema.n_averaged = int(tensors["ema_n_averaged"].reshape(()))
        if self.slow is not None:  # a checkpoint without it (lookahead turned on later): start from the weights
            saved = ckpt.strip_prefix(tensors, "lookahead.")
            state = self.model.state_dict()
            for k, v in self.slow.items():
                v.copy_(saved[k] if k in saved else state[k])
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
        self.batch_in_epoch = int(meta.get("batch_in_epoch", 0))
        self.best_acc, self.best_epoch = float(meta["best_acc"]), int(meta["best_epoch"])
        self.history = list(meta.get("history", []))
        # the time spent up to the kill, when clock.json has more than the checkpoint (a kill between checkpoints)
        self.clock = max(float(meta.get("clock", 0.0)), self._saved_clock() if self.budget_s > 0 else 0.0)
        self.best_source = meta.get("best_source", "model")
        if meta.get("warmup_end"):
            start_s, steps, *peak = meta["warmup_end"]
            self.warmup_end = (float(start_s), int(steps), float(peak[0]) if peak else 1.0)
        if self.batch_in_epoch and "epoch_sums" in meta:
            self.epoch_sums = tuple(float(v) for v in meta["epoch_sums"])
            self._sums_base = self.epoch_sums
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        phase_index = int(meta.get("phase", -1))
        if phase_index >= 0:
            self._enter_phase(phase_index)
            if "optimizer" in meta:
                self.opt.load_state_dict(ckpt.unflatten_optimizer(tensors, meta["optimizer"]))
                for g in self.opt.param_groups:  # a checkpoint from before fused optimizers would switch it off
                    g["fused"] = self.opt.defaults.get("fused")
        prefix = "rng." if self.rank == 0 else f"rng.rank{self.rank}."
        if prefix + "aug" in tensors:  # absent in checkpoints from before they were saved
            torch.set_rng_state(tensors[prefix + "torch"])
            self._restore_aug_state(tensors[prefix + "aug"])
            if prefix + "cuda" in tensors and self.prec.device.type == "cuda":
                torch.cuda.set_rng_state(tensors[prefix + "cuda"], self.prec.device)
        norms = self.run_dir / "grad_norms.jsonl"
        if norms.exists() and self.is_main:  # drop records of steps that the resumed run will redo
            kept = [ln for ln in norms.read_text().splitlines() if 0 <= _step_of(ln) < self.step]
            atomic_write(norms, "".join(ln + "\n" for ln in kept))
        self._saved_step, self._last_saved = self.step, self._position()
        self._repair_best(tensors, meta)
        self.log(f"resumed from {used} at epoch {self.epoch + 1}, batch {self.batch_in_epoch}")
        return True

    def _restore_aug_state(self, state: torch.Tensor) -> None:
        """The augmentation generator's saved state, when it was saved by a generator of this device type. A CPU
        generator's state (5,056 bytes) does not fit a CUDA one (16 bytes) or the reverse, and ``--device`` may
        change on resume: then the stream restarts from a seed of (seed, rank, step), the same on every resume
        at that step, and the run says so."""
        if state.numel() == self.aug_gen.get_state().numel():
            self.aug_gen.set_state(state)
            return
        self.aug_gen.manual_seed((self.cfg.seed + 1 + 1000 * self.rank) * 1_000_003 + self.step)
        self.log(f"note: the augmentation stream was saved on another device type than {self.prec.device.type}; it "
                 f"restarts from a seed of step {self.step}, so later augmentations differ from an uninterrupted run's")

    # --- one step, one epoch ---------------------------------------------------------------------------
    def _grad_norms(self) -> dict[str, float]:
        """Per-stage gradient norms: one ``_foreach_norm`` and one transfer to the host (not one per tensor)."""
        stages = getattr(ckpt.unwrap(self.model), "stage_names", [])
        by_stage: dict[str, list[torch.Tensor]] = {}
        for name, p in ckpt.unwrap(self.model).named_parameters():
            if p.grad is not None:
                by_stage.setdefault(stage_of(name, stages), []).append(p.grad.detach())
        order = [s for s in ("stem", *stages, "final", "head") if s in by_stage]
        if not order:
            return {}
        norms = torch._foreach_norm([g for s in order for g in by_stage[s]])
        sq, i = [], 0
        for s in order:
            n = len(by_stage[s])
            sq.append(torch.stack(norms[i:i + n]).double().pow(2).sum())
            i += n
        return dict(zip(order, torch.stack(sq).sqrt().tolist()))

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor,
                   sample_index: torch.Tensor | None = None) -> tuple[float, float, int]:
        """Forward and backward of one batch, then the optimizer step if the batch ends its accumulation group
        (always without accumulation). ``sample_index``: the batch's positions in the dataset, for the pipeline's
        per-sample augmentations. Returns this rank's ``(loss x samples, correct, samples)``, the first two as
        device tensors (reading them is a host sync; the loop adds them up on the device instead).

        A non-finite loss is recorded (see ``_raise_if_diverged``), not raised here: checking it every step would
        sync the host with the device every step."""
        self._consistent = False  # from here until the group's counters and sums are updated (fit)
        index, size = self._accum
        final = index == size - 1
        per_sample = {"index": sample_index, "epoch": self.epoch} if self._per_sample else {}
        x, y = self.pipeline(xb, yb, train=True, generator=self.aug_gen, **per_sample)
        x = self.prec.format_input(x)
        # DDP all-reduces the gradients during backward; before a group's last batch they only accumulate locally
        no_sync = self.ddp.no_sync() if self.ddp is not None and not final else contextlib.nullcontext()
        with no_sync:
            with self.prec.autocast():
                logits = self.forward_model(x)
            loss = self.criterion(logits.float(), y)
            self._note_loss(loss.detach())
            if index == 0:
                self.opt.zero_grad(set_to_none=True)
            scaled = loss / size if size > 1 else loss  # the group's gradient is the mean over its batches
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        self._step_loss = loss.detach()
        if final:
            self._optimizer_step()
        with torch.no_grad():
            correct = _soft_accuracy(logits.float(), y)
            loss_sum = loss.detach().double() * len(xb)
            self._sums[0] += loss_sum
            self._sums[1] += correct
            self._sums[2] += len(xb)
        return loss_sum, correct, len(xb)

    @torch.no_grad()
    def _note_loss(self, loss: torch.Tensor) -> None:
        """Record (step, loss) if this is the first non-finite loss: device operations only, no sync."""
        fresh = ~torch.isfinite(loss) & (self._first_bad[0] < 0)
        self._first_bad.copy_(torch.where(fresh, torch.stack([torch.full_like(self._first_bad[0], self.step),
                                                              loss.double()]), self._first_bad))

    def _raise_if_diverged(self) -> None:
        """TrainingDiverged if a loss of this rank since the start was NaN or infinite (one read of the device)."""
        self._checked_step = self.step
        step, loss = self._first_bad.tolist()
        if step >= 0:
            raise TrainingDiverged(f"loss is {loss} at epoch {self.epoch + 1}, step {int(step)}: lower --lr or turn on "
                                   f"--grad-clip; {self._kept()}")

    def _epoch_totals(self) -> tuple[float, float, float]:
        """This epoch's ``(loss x samples, correct, samples)`` over every rank, batches from before a resume
        included: one read of the device (under torchrun an all-reduce, so every rank must call it)."""
        sums = self._sums
        if self.distributed:
            sums = sums.clone()
            torch.distributed.all_reduce(sums)
        loss_sum, correct, seen = sums.tolist()
        base = self._sums_base
        return base[0] + loss_sum, base[1] + correct, base[2] + seen

    def _reset_epoch_sums(self, base: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        self._sums.zero_()
        self._sums_base = base

    def _optimizer_step(self) -> None:
        """Unscale, record gradient norms, clip, step, update the EMA: the end of an accumulation group."""
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        group_step = self.step // self.cfg.accum_steps
        if self.cfg.grad_norm_every and group_step % self.cfg.grad_norm_every == 0 and self.is_main:
            norms = self._grad_norms()
            self._grad_norm = (self.step, math.sqrt(sum(v * v for v in norms.values())))
            with open(self.run_dir / "grad_norms.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "epoch": self.epoch + self.batch_in_epoch /
                                    max(self.steps_per_epoch, 1), "norms": norms}) + "\n")
        if self.cfg.grad_clip > 0:  # (the norm before clipping, kept on the device for the step loggers)
            self._grad_norm = (self.step, nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.slow is not None and (group_step + 1) % LOOKAHEAD_EVERY == 0:
            self._lookahead()

    @torch.no_grad()
    def _lookahead(self) -> None:
        """airbench's lookahead: the slow weights move toward the fast ones by ``1 - alpha``, then the fast ones
        restart from them; ``alpha`` grows with the cube of the run's progress (0 at the start: the slow weights
        follow; 0.77 at the end: an average over the last few hundred steps)."""
        alpha = 0.95 ** LOOKAHEAD_EVERY * self._progress() ** 3
        state = self.model.state_dict()
        slow = list(self.slow.values())
        fast = [state[k] for k in self.slow]
        torch._foreach_lerp_(slow, fast, 1.0 - alpha)
        torch._foreach_copy_(fast, slow)

    # --- time budget ---------------------------------------------------------------------------------
    def _budget_spent(self) -> bool:
        return self.budget_s > 0 and self.clock >= self.budget_s

    def _lr_factor(self, phase_step: int, phase_steps: int, warmup: int) -> float:
        """The schedule's factor at ``phase_step``; under a time budget the decay also follows the clock.

        The warm-up keeps its steps unless it would eat more than a fifth of the budget (then the decay starts
        there, from the factor the warm-up had reached); from its end the decay reaches zero when the budget runs
        out, or at the last step if sooner.
        """
        if self.budget_s <= 0:
            return lr_at(phase_step, phase_steps, warmup, self.cfg.schedule)
        if self.warmup_end is None and (phase_step >= warmup or self.clock >= BUDGET_WARMUP_SHARE * self.budget_s):
            steps = min(phase_step, warmup)
            self.warmup_end = (self.clock, steps, max(steps, 1) / warmup if steps < warmup else 1.0)
        if self.warmup_end is None:
            return lr_at(phase_step, phase_steps, warmup, self.cfg.schedule)
        start_s, warmup_steps, peak = self.warmup_end
        fraction = (self.clock - start_s) / max(self.budget_s - start_s, 1e-9)
        return peak * lr_at(phase_step, phase_steps, warmup_steps, self.cfg.schedule, time_fraction=fraction)

    def _train_scale(self) -> float:
        """Progressive resizing: the training input's share of the full size now, from ``cfg.progressive_resize``
        at the start to 1 at ``RESIZE_RAMP`` of the run (of its steps, or of its time budget if that is ahead).
        Compiled, in ``COMPILE_SIZE_BUCKETS`` steps: each new size compiles the model again."""
        start = self.cfg.progressive_resize
        ramp = min(self._progress() / RESIZE_RAMP, 1.0)
        if self.cfg.compile:
            ramp = math.floor(ramp * COMPILE_SIZE_BUCKETS) / COMPILE_SIZE_BUCKETS
        return start + (1.0 - start) * ramp

    def _progress(self) -> float:
        """The run's share done, in [0, 1]: of its steps, or of its time budget if that is further on."""
        progress = self.step / max(self.total_epochs * self.steps_per_epoch, 1)
        if self.budget_s > 0:
            progress = max(progress, self.clock / self.budget_s)
        return min(progress, 1.0)

    def validate(self, model: nn.Module) -> Predictions | None:
        if self.val_loader is None:
            return None
        return predict_loader(model, self.pipeline, self.val_loader, self.prec)

    def fit(self) -> FitResult:
        """Train all phases; returns the best validation accuracy. Ctrl-C saves ``last`` first.

        ``checkpoints/last`` is saved at the end of every epoch, every ``cfg.checkpoint_every`` batches and on
        SIGTERM / Ctrl-C; a run killed outright resumes from the latest one (``cfg.resume``) as if uninterrupted.

        SIGTERM and Ctrl-C (SIGINT) are deferred: the optimizer step in flight (its whole accumulation group)
        completes and is counted, then ``last`` is saved and ``fit`` returns ``interrupted``. In a single process a
        second Ctrl-C stops at once: ``last`` is saved if that moment lies between two steps (e.g. during
        validation), else the latest ``last`` is kept, which the resumed run continues from exactly. (Under
        torchrun a rank can get each Ctrl-C twice, from the terminal and from torchrun: there it never escalates.)
        """
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        if self.cfg.resume:
            self.resume()
            if self.is_main and self.history:  # a run killed between saving last and rewriting metrics.jsonl
                self._write_metrics()
        elif self.is_main:  # a new run in an old run's folder: its clock is not this run's
            (self.run_dir / "checkpoints" / CLOCK_FILE).unlink(missing_ok=True)
        if self.cfg.progressive_resize and hasattr(self.pipeline, "train_size"):
            self.pipeline.set_train_scale(self._train_scale(), self.min_side)
            now, full = self.pipeline.train_size, self.pipeline.size
            self.log(f"progressive resizing: training images at {now[0]}x{now[1]} px, growing to {full[0]}x{full[1]} "
                     f"by {RESIZE_RAMP:.0%} of the run" if now != full else
                     f"progressive resizing has no effect: {full[0]}x{full[1]} px images cannot shrink below "
                     f"{max(8, self.min_side)} px")
        if self.is_main:  # after resume: steps.csv and TensorBoard drop what a killed session logged past last
            self.loggers = RunLoggers.open(self.cfg.loggers, self.run_dir, every=self.cfg.log_every,
                                           start_step=self.step, config=self.cfg.to_dict(), callbacks=self.callbacks)
        t_start = self._t_start = time.perf_counter()
        self._clock_base = self._clock_saved = self.clock  # the budget's seconds spent before this session
        own_clock = self._own_clock
        interrupted = False
        old_handlers = {}
        if (self.is_main or self.distributed) and threading.current_thread() is threading.main_thread():
            # under torchrun Ctrl-C reaches every rank: stop them all at the same step boundary, then save
            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        # Bars on a terminal; in logs and pipes (or --quiet) one line per epoch instead.
        bars = not self.cfg.quiet and self.is_main and sys.stderr.isatty()
        shown_total = None if self.budget_s else self.total_epochs  # a budget run ends on time, not at a count
        epoch_bar = tqdm(total=shown_total, initial=self.epoch, desc="epochs", unit="ep",
                         disable=not bars, dynamic_ncols=True, leave=True)
        try:
            while self.epoch < self.total_epochs:
                if self._stop_requested and not self.distributed:  # seen during the last validation or save
                    raise _StopRequested
                if self.budget_s > 0 and self.step > 0 and not self.batch_in_epoch:
                    # the last validation may have spent the rest: no new epoch of one batch at lr 0. (A run always
                    # trains a batch; an epoch cut by the budget, or by Ctrl-C after it, is always validated.)
                    self.clock = distributed.all_reduce_sum([own_clock()], self.prec.device)[0]
                    if self._budget_spent():
                        last = self.history[-1] if self.history else {"best_acc": None}
                        if "best_acc" not in last:  # --val-every skipped the epoch that turned out to be the last
                            self._consistent = False  # the record and best change: the previous last stands
                            self._keep_best(last, self._validation_candidates(last))
                            self._consistent = True
                            self.save_last()
                            if self.is_main:
                                self._write_metrics()
                        elif self._saved_step != self.step:  # --save-at-end: not saved when that epoch ended
                            self.save_last()
                        break
                index, phase, phase_start = self._phase_for_epoch(self.epoch)
                if index != self._phase_index:
                    self._enter_phase(index)
                self._set_train_mode(phase)
                phase_steps = phase.epochs * self.steps_per_epoch
                # at most a quarter of the phase: a 1-epoch run with the default 1-epoch warm-up would end at its peak
                warmup = min(int(self.cfg.warmup_epochs * self.steps_per_epoch), phase_steps // 4) if index == 0 else 0
                self._log_mark = (time.perf_counter(), 0)  # (throughput of a step log spans no validation)
                t0 = time.perf_counter()
                self._reset_epoch_sums(self.epoch_sums if self.batch_in_epoch else (0.0, 0.0, 0.0))
                seen_before = self._sums_base[2]  # samples of this epoch trained before a resume: not in its time
                # the lr of the epoch's latest step: what the record shows when a run interrupted after the last
                # batch (during validation) resumes with no batch left to train
                last_b = max(self.batch_in_epoch - 1, 0)  # (a group's lr is that of its first batch)
                last_step = (self.epoch - phase_start) * self.steps_per_epoch + last_b - last_b % self.cfg.accum_steps
                lr = self.base_lr * self._lr_factor(last_step, phase_steps, warmup)
                bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, leave=False, unit="batch",
                           desc=f"epoch {self.epoch + 1}" + (f"/{shown_total}" if shown_total else ""),
                           dynamic_ncols=True,
                           disable=not bars)
                accum, first_batch = self.cfg.accum_steps, self.batch_in_epoch
                for xb, yb, sample_index in self.train_loader.epoch(self.epoch, self.batch_in_epoch, with_index=True):
                    if self._budget_spent() and self.step > 0:
                        break  # a resumed epoch whose budget had run out: straight to its validation
                    # groups of accum_steps batches from each epoch's start; the epoch's last may be shorter (and the
                    # first after a resume inside a group, which only a hard Ctrl-C can leave)
                    b = self.batch_in_epoch
                    g_end = min(b - b % accum + accum, self.steps_per_epoch)
                    g_start = max(b - b % accum, first_batch)
                    self._accum = (b - g_start, g_end - g_start)
                    # the schedule counts batches; a group steps with the lr of its first (as one big batch would)
                    phase_step = (self.epoch - phase_start) * self.steps_per_epoch + b - b % accum
                    lr = set_lr(self.opt, self.base_lr, self._lr_factor(phase_step, phase_steps, warmup))
                    if self.cfg.progressive_resize:
                        self.pipeline.set_train_scale(self._train_scale(), self.min_side)
                    compiling = self.cfg.compile and self._first_of_shape(xb)
                    t_step = time.perf_counter() if compiling else 0.0
                    self.train_step(xb, yb, sample_index)
                    if compiling:  # compilation (tens of seconds) is not charged to a time budget
                        if self.prec.device.type == "cuda":
                            torch.cuda.synchronize(self.prec.device)
                        self._compile_s += time.perf_counter() - t_step
                    self.step += 1
                    self.batch_in_epoch += 1
                    self._log_mark = (self._log_mark[0], self._log_mark[1] + len(xb))
                    bar.update(1)
                    if self.batch_in_epoch < g_end:
                        continue  # the optimizer steps with the group's last batch; stops and saves wait for it
                    if self.distributed:  # a bad loss on any rank, one decision to stop, and rank 0's clock
                        flags = torch.tensor([float(self._stop_requested), own_clock()], dtype=torch.float64)
                        flags = torch.cat([(self._first_bad[:1] >= 0).double(), flags.to(self.prec.device)])
                        bad, stop, self.clock = distributed.all_reduce_sum(flags, self.prec.device)
                        if bad:  # every rank stops here, at this step, with the same error
                            raise TrainingDiverged(  # (the step of the group's last batch, as a single process counts)
                                f"loss is NaN or infinite in {int(bad)} of {distributed.world_size()} processes at "
                                f"epoch {self.epoch + 1}, step {self.step - 1}: lower --lr or turn on --grad-clip; "
                                f"{self._kept()}")
                    else:
                        stop, self.clock = self._stop_requested, own_clock()
                        if self.step - self._checked_step >= FINITE_CHECK_EVERY:
                            self._raise_if_diverged()
                    self._consistent = True  # the step and its group are counted: a save here resumes exactly
                    if self.loggers is not None and self.loggers.due(self.step):
                        self._log_step(lr)
                    self._save_clock()
                    if bars and self.step % FINITE_CHECK_EVERY == 0:
                        self._show_progress(bar, lr, t0, seen_before)
                    if stop:
                        raise _StopRequested
                    if self._budget_spent():
                        self.log(f"time budget of {self.cfg.time_budget:g} min reached at epoch {self.epoch + 1}, "
                                 f"batch {self.batch_in_epoch}: the schedule has ended, validating")
                        break
                    if (self.cfg.checkpoint_every and self.step - self._saved_step >= self.cfg.checkpoint_every
                            and self.batch_in_epoch < self.steps_per_epoch):  # the epoch's end saves anyway
                        self.save_last()
                bar.close()
                train_seconds = time.perf_counter() - t0
                loss_sum, correct, seen = self._epoch_totals()
                record = self._end_epoch(loss_sum, correct, seen, train_seconds, lr, seen - seen_before)
                epoch_bar.update(1)
                epoch_bar.set_postfix(val_acc=f"{record.get('val_acc', float('nan')):.4f}",
                                      best=f"{self.best_acc:.4f}")
                if not bars and self.is_main:
                    self.log(_epoch_line(record, shown_total))
                if self.loggers is not None:
                    self.loggers.log_epoch(record["epoch"], {**record, "step": self.step})
        except KeyboardInterrupt as e:
            interrupted = True
            if isinstance(e, _StopRequested) or (self._consistent and not self.distributed):
                self.log(f"\ninterrupted at epoch {self.epoch + 1}, batch {self.batch_in_epoch}: "
                         f"saving checkpoints/last (to continue: --out {self.run_dir} --resume)")
                self.save_last()
            else:  # inside a step (a second Ctrl-C), or ranks stopped at different points: saving would mix states
                self.log(f"\ninterrupted inside a step at epoch {self.epoch + 1}: {self._kept()}")
        finally:
            epoch_bar.close()
            if self.loggers is not None:
                self.loggers.close()
                self.loggers = None
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        return FitResult(self.run_dir, self.best_acc, self.best_epoch, self.epoch,
                         time.perf_counter() - t_start, interrupted, self.history)

    def _log_step(self, lr: float) -> None:
        """Send the step loggers this step's values: the latest batch's loss (one read of the device), the lr, the
        samples per second (every process's) since the last logged step or the epoch's start, and the gradient norm
        when the engine computed one at this step (``grad_clip``, ``grad_norm_every``)."""
        values = {"epoch": round(self.epoch + self.batch_in_epoch / max(self.steps_per_epoch, 1), 4), "lr": lr}
        if self._step_loss is not None:
            values["loss"] = float(self._step_loss)
        if self._grad_norm is not None and self._grad_norm[0] == self.step - 1:  # (recorded before the count)
            values["grad_norm"] = float(self._grad_norm[1])
        t, n = self._log_mark  # (timed after the loss's read: the device's queue is done)
        values["samples_per_s"] = round(n * distributed.world_size() / max(time.perf_counter() - t, 1e-9), 1)
        self.loggers.log_step(self.step, values)
        self._log_mark = (time.perf_counter(), 0)

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM / SIGINT: ask the loop to stop at the next step boundary; a second Ctrl-C in a single process
        stops at once (see ``fit``)."""
        if signum == signal.SIGINT and self._stop_requested and not self.distributed:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and self.is_main and not self._stop_requested:
            with contextlib.suppress(OSError):  # os.write: print() may be in the middle of a write of its own
                os.write(sys.stderr.fileno(), b"\nCtrl-C: stopping after this step and saving checkpoints/last "
                                              b"(Ctrl-C again: stop at once)\n")
        self._stop_requested = True

    def _first_of_shape(self, xb: torch.Tensor) -> bool:
        """Whether this batch's model input has a shape not trained on yet in this process (``--compile``
        compiles again for it)."""
        key = (tuple(xb.shape), getattr(self.pipeline, "train_size", None))
        if key in self._compiled_shapes:
            return False
        self._compiled_shapes.add(key)
        return True

    def _show_progress(self, bar, lr: float, t0: float, seen_before: float) -> None:
        """The progress bar's running loss, accuracy and speed, from this rank's device sums (one read)."""
        loss_sum, correct, seen = (a + b for a, b in zip(self._sums_base, self._sums.tolist()))
        elapsed = time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}", acc=f"{correct / max(seen, 1):.3f}", lr=f"{lr:.3g}",
                        ips=f"{(seen - seen_before) / max(elapsed, 1e-9):.0f}/s")

    def _end_epoch(self, loss_sum: float, correct: float, seen: float, seconds: float, lr: float,
                   timed: float) -> dict:
        """``seen`` samples in the epoch, of which ``timed`` in ``seconds`` (fewer after a mid-epoch resume)."""
        record = {"epoch": self.epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                  "lr": lr, "seconds": round(seconds, 3), "samples_per_s": round(timed / max(seconds, 1e-9), 1)}
        if self._compile_s > self._compile_s_recorded:  # --compile: of ``seconds``, the steps that compiled
            record["compile_seconds"] = round(self._compile_s - self._compile_s_recorded, 3)
            self._compile_s_recorded = self._compile_s
        if self.batch_in_epoch < self.steps_per_epoch:  # an epoch cut short by the time budget
            record["batches"] = self.batch_in_epoch
        if not self.distributed:
            self._raise_if_diverged()
        self._check_finite()  # weights that diverged on the epoch's last step are never validated or saved
        if self.distributed:  # rank 0's BN statistics everywhere: every rank validates the model rank 0 saves
            distributed.broadcast_buffers(self.model)
            if self.ema is not None:  # (its n_averaged is the same everywhere, and may sit on the CPU)
                distributed.broadcast_buffers(self.ema.module)
        # validated before the epoch counts as done: Ctrl-C during validation resumes into it
        candidates = self._validation_candidates(record) if self._validates_now() else []
        self._consistent = False
        final = self._is_last_epoch()
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_sums = (0.0, 0.0, 0.0)
        self._reset_epoch_sums()
        self.history.append(record)
        if candidates:
            self._keep_best(record, candidates)
        self._consistent = True
        if final or not self.cfg.save_at_end or self._pending_best is not None:  # (best is written with last)
            self.save_last()
        if self.is_main:
            self._write_metrics()
        return record

    def _validation_candidates(self, record: dict) -> list[tuple[float, nn.Module]]:
        """Validate the model and its EMA into ``record``: ``(accuracy, model)`` of each. Without validation data
        the training accuracy stands in."""
        candidates = []
        pred = self.validate(self.model)
        if pred is not None:
            record.update(val_loss=pred.loss, val_acc=pred.accuracy)
            candidates.append((pred.accuracy, self.model))
        if self.ema is not None:
            ema_pred = self.validate(self.ema.module)
            if ema_pred is not None:
                record.update(ema_val_loss=ema_pred.loss, ema_val_acc=ema_pred.accuracy)
                candidates.append((ema_pred.accuracy, self.ema.module))
        if not candidates:
            candidates.append((record["train_acc"], self.model))
        return candidates

    def _keep_best(self, record: dict, candidates: list[tuple[float, nn.Module]]) -> None:
        """Keep the best of ``candidates`` as ``checkpoints/best`` if it beats every earlier epoch (written by the
        next ``save_last``, after last)."""
        acc, model = max(candidates, key=lambda c: c[0])
        if acc > self.best_acc:
            self.best_acc, self.best_epoch = acc, self.epoch
            self.best_source = "ema" if self.ema is not None and model is self.ema.module else "model"
            self._pending_best = model
        record["best_acc"] = self.best_acc

    def _validates_now(self) -> bool:
        """``cfg.val_every``: every N-th epoch, and always the run's last (its final epoch, or one the budget cut)."""
        every = self.cfg.val_every
        return self._is_last_epoch() or (every > 0 and (self.epoch + 1) % every == 0)

    def _is_last_epoch(self) -> bool:
        """Whether the epoch now ending is the run's last: its final epoch, or one the time budget cut."""
        return self.epoch + 1 >= self.total_epochs or self.batch_in_epoch < self.steps_per_epoch or \
            self._budget_spent()

    def _write_metrics(self) -> None:
        """metrics.jsonl from the checkpointed history, so a resumed run never duplicates or loses a line."""
        atomic_write(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        write_epoch_csv(self.run_dir / "metrics.csv", self.history)


def _takes_sample_index(pipeline: Pipeline) -> bool:
    """Whether ``pipeline`` takes ``index`` and ``epoch`` (a custom pipeline written before they existed does not:
    it gets the batch as it always did)."""
    params = inspect.signature(pipeline.__call__).parameters
    return {"index", "epoch"} <= params.keys() or any(p.kind is p.VAR_KEYWORD for p in params.values())


CLOCK_FILE = "clock.json"  # in checkpoints/: the time budget's seconds spent, written more often than checkpoints
CLOCK_SAVE_EVERY_S = 5.0  # at most this much of a budget's time is lost to a kill between checkpoints
LOOKAHEAD_EVERY = 5  # optimizer steps between lookahead syncs (airbench)
FINITE_CHECK_EVERY = 20  # steps between reads of the non-finite-loss flag (one host sync each); also at epoch ends
COMPILE_SIZE_BUCKETS = 3  # --compile with progressive resizing: the size grows in this many steps (one compile each)
BUDGET_WARMUP_SHARE = 0.2  # a warm-up may take at most this share of a time budget
RESIZE_RAMP = 0.75  # progressive resizing reaches the full size at this share of the run; the rest trains at it


def _epoch_line(r: dict, total: int | None) -> str:
    val = f" val_loss {r['val_loss']:.4f} val_acc {r['val_acc']:.4f}" if "val_acc" in r else ""
    of = f"/{total}" if total else ""
    part = f" ({r['batches']} batches)" if "batches" in r else ""
    return (f"epoch {r['epoch']}{of}{part}: train_loss {r['train_loss']:.4f} train_acc {r['train_acc']:.4f}{val}"
            f" lr {r['lr']:.4g} {r['seconds']:.1f}s {r['samples_per_s']:.0f}/s")


def _step_of(line: str) -> int:
    """The step of a grad_norms.jsonl line; -1 for a blank or torn one (a process killed mid-write)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1
