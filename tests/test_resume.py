"""Exact resume after SIGKILL: ``python -m resnetlab train`` killed at seeded random points (during start-up,
mid-epoch, mid-validation, and once while a checkpoint is being written), resumed with ``--resume`` until it
finishes, ends with the same bits as an uninterrupted run: every tensor of ``checkpoints/last`` (weights, BN
statistics, optimizer, EMA, lookahead, RNG states), the best checkpoint, the metrics and the gradient-norm log.

Deterministic mode on the CPU, fp32, one thread per process (``OMP_NUM_THREADS=1`` for every run, the reference
included: the thread count changes how sums are split, hence their rounding).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from conftest import write_class_folders
from resnetlab.data.loader import ArrayLoader
from resnetlab.data.pipeline import Pipeline
from resnetlab.training import checkpoint as ckpt
from resnetlab.training import distributed, engine
from resnetlab.training.checkpoint import read_checkpoint
from resnetlab.training.config import TrainConfig, make_config
from resnetlab.training.engine import Trainer
from resnetlab.training.precision import pick_precision

EPOCHS, STEPS_PER_EPOCH = 4, 9  # 36 training images (3 classes x 16, a quarter held out), batches of 4
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
TIMING_KEYS = {"seconds", "samples_per_s"}


def _argv(data: Path, out: Path, cache: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--arch", "resnet20",
            "--img-size", "16", "--batch-size", "4", "--epochs", str(EPOCHS), "--lr", "0.05", "--warmup-epochs", "0.5",
            "--val-fraction", "0.25", "--ema", "0.9", "--lookahead", "--cutout", "4", "--deterministic",
            "--precision", "fp32", "--device", "cpu", "--no-channels-last", "--grad-norm-every", "1",
            "--checkpoint-every", "3", "--quiet"]


def _env(cache: Path, **extra: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RESNETLAB_CACHE": str(cache), **extra}


def _launch(data: Path, out: Path, cache: Path, **env: str) -> subprocess.Popen:
    """A fresh run until its config exists, then ``--resume`` (a run killed before writing it starts over)."""
    argv = (["train", "--out", str(out), "--resume", "--quiet"] if (out / "config.yaml").exists()
            else _argv(data, out, cache))
    return subprocess.Popen([sys.executable, "-m", "resnetlab", *argv], env=_env(cache, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps_done(out: Path) -> int:
    """Optimizer steps recorded so far (one grad-norm line per step; a resume drops the lines it will redo)."""
    try:
        return len((out / "grad_norms.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _kill(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return out


def _finish(data: Path, out: Path, cache: Path) -> str:
    proc = _launch(data, out, cache)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    return log


def _assert_same_run(run: Path, ref: Path) -> None:
    for name in ("last.safetensors", "best.safetensors"):
        a, meta_a = read_checkpoint(run / "checkpoints" / name)
        b, meta_b = read_checkpoint(ref / "checkpoints" / name)
        assert a.keys() == b.keys(), name
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: {len(differ)} of {len(a)} tensors differ, e.g. {differ[:5]}"
        assert (meta_a["epoch"], meta_a["step"], meta_a["best_epoch"]) == (meta_b["epoch"], meta_b["step"],
                                                                           meta_b["best_epoch"])

    def untimed(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(ln).items() if k not in TIMING_KEYS}
                for ln in path.read_text().splitlines() if ln.strip()]

    assert untimed(run / "metrics.jsonl") == untimed(ref / "metrics.jsonl")
    assert untimed(run / "grad_norms.jsonl") == untimed(ref / "grad_norms.jsonl")
    assert not [p.name for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]  # no debris of killed saves


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``(data, cache, run_dir)`` of an uninterrupted run (which also builds the cache the others reuse)."""
    base = tmp_path_factory.mktemp("resume")
    data = write_class_folders(base / "data", classes=3, per_class=16, size=16, seed=1)
    cache, ref = base / "cache", base / "reference"
    _finish(data, ref, cache)
    assert _steps_done(ref) == TOTAL_STEPS
    return data, cache, ref


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_exact(tmp_path, reference):
    data, cache, ref = reference
    out = tmp_path / "killed"
    rnd = random.Random(20240611)
    kills = []

    # 1. during start-up (imports, data, model): nothing or only the config is written yet
    proc = _launch(data, out, cache)
    time.sleep(rnd.uniform(0.5, 3.0))
    if proc.poll() is None:
        _kill(proc)
        kills.append("start-up")

    # 2. at random optimizer steps: mid-epoch, at epoch ends, during validation (a few ms after the step)
    targets = sorted(rnd.sample(range(2, TOTAL_STEPS - 1), 4))
    for target in targets:
        proc = _launch(data, out, cache)
        while proc.poll() is None and _steps_done(out) < target:
            time.sleep(0.005)
        time.sleep(rnd.uniform(0, 0.05))
        if proc.poll() is None:
            _kill(proc)
            kills.append(f"after step {target}")

    # 3. while a checkpoint is being written: the test hook sleeps between the temporary file and the rename
    proc = _launch(data, out, cache, RESNETLAB_TEST_SLOW_SAVE="2")
    ckpts = out / "checkpoints"
    while proc.poll() is None and not list(ckpts.glob(".last.safetensors.tmp*")):
        time.sleep(0.005)
    if proc.poll() is None:
        _kill(proc)
        kills.append("mid-save")
        assert list(ckpts.glob(".last.safetensors.tmp*"))  # the half-done save: ignored by the resume

    log = _finish(data, out, cache)
    assert "resumed from" in log
    assert len(kills) >= 5, kills  # the run must not finish before the kills it was meant to survive
    print(f"survived {len(kills)} SIGKILLs: {', '.join(kills)}")
    _assert_same_run(out, ref)


@pytest.mark.slow
def test_truncated_last_checkpoint_falls_back_to_the_previous_one_and_stays_exact(tmp_path, reference):
    """``--resume`` with a damaged ``last``: a one-line warning naming it, the ``.prev`` copy used, same bits."""
    data, cache, ref = reference
    out = tmp_path / "damaged"
    proc = _launch(data, out, cache)
    while proc.poll() is None and _steps_done(out) < 14:  # past at least two saves, so a .prev exists
        time.sleep(0.005)
    _kill(proc)
    last = out / "checkpoints" / "last.safetensors"
    assert (out / "checkpoints" / "last.prev.safetensors").exists()
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    log = _finish(data, out, cache)
    warning = [ln for ln in log.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1, log[-2000:]
    assert str(last) in warning[0] and "truncated" in warning[0] and "last.prev.safetensors" in warning[0]
    assert "resumed from" in log and "last.prev.safetensors" in log
    _assert_same_run(out, ref)


# --- in-process: Ctrl-C at many points inside steps, best vs last, the budget's clock -------------------------
#
# A tiny model (conv, BatchNorm, dropout, linear) on 24 random 6x6 images, batches of 4 accumulated in pairs, an
# augmentation that draws noise from the trainer's generator, EMA, lookahead and momentum: every kind of state a
# resume must restore, in a run of 12 batches that takes a tenth of a second.


class _Noisy(Pipeline):
    modality = "image"
    num_classes = 3
    on_call = None  # a test hook, called at the start of every training batch

    def __call__(self, x, y, train, generator=None, index=None, epoch=0):
        if train and self.on_call is not None:
            self.on_call()
        x = x.float() / 255.0
        if train:
            x = x + 0.05 * torch.randn(x.shape, generator=generator)
        return x, y

    def input_size(self):
        return (1, 6, 6)

    def config(self):
        return {"modality": "image"}


def _tiny_trainer(run: Path, log=None, **overrides) -> Trainer:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(32, 1, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 3, size=32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
                          nn.Linear(64, 3))
    opts = {"batch_size": 4, "accum_steps": 2, "epochs": 2, "lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 0.0,
            "ema": 0.9, "lookahead": True, "checkpoint_every": 2, "grad_norm_every": 1, "quiet": True, "out": str(run),
            "resume": True, **overrides}
    cfg = make_config(TrainConfig, opts)
    train = ArrayLoader(x[:24], y[:24], opts["batch_size"], shuffle=True, drop_last=True, seed=0)
    val = ArrayLoader(x[24:], y[24:], 8, shuffle=False, drop_last=False)
    prec = pick_precision(torch.device("cpu"), "fp32", False)
    return Trainer(model, _Noisy(), train, val, cfg, run, {}, prec, log=log or (lambda m: None))


def _state(run: Path) -> tuple[dict[str, torch.Tensor], list[dict], str]:
    """``checkpoints/last``'s tensors (weights, BN statistics, optimizer, EMA, lookahead, RNG states), the
    epochs' records without their timings, and the gradient-norm log."""
    tensors, meta = read_checkpoint(run / "checkpoints" / "last.safetensors")
    history = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in meta["history"]]
    return tensors, history, (run / "grad_norms.jsonl").read_text()


POINTS = ("pipeline", "forward", "backward", "optimizer step", "ema update", "before the counter moves",
          "checkpoint write", "metrics write", "batch fetch")


class _Trigger:
    """Counts the calls at each of ``POINTS`` inside a trainer; at the ``k``-th call of ``point`` it sends this
    process SIGINT (a Ctrl-C, which the engine defers) or raises KeyboardInterrupt (as a second Ctrl-C does)."""

    def __init__(self, trainer: Trainer, monkeypatch, point: str | None = None, k: int = 0, action: str = ""):
        self.calls = dict.fromkeys(POINTS, 0)
        self.point, self.k, self.action, self.fired_at = point, k, action, None
        self.trainer = trainer
        fire = self.fire
        trainer.pipeline.on_call = lambda: fire("pipeline")
        trainer.model[1].register_forward_hook(lambda *a: fire("forward"))  # training and validation
        trainer.model[0].weight.register_hook(lambda g: fire("backward"))
        self.handle = register_optimizer_step_post_hook(lambda *a: fire("optimizer step"))  # every optimizer
        ema_update = trainer.ema.update_parameters
        trainer.ema.update_parameters = lambda m: (ema_update(m), fire("ema update"))
        accuracy = engine._soft_accuracy  # the last thing train_step does, after the optimizer step
        monkeypatch.setattr(engine, "_soft_accuracy", lambda *a: (accuracy(*a), fire("before the counter moves"))[0])
        st_save = ckpt.st_save  # inside save_checkpoint: serialised, nothing written yet
        monkeypatch.setattr(ckpt, "st_save", lambda *a, **kw: (fire("checkpoint write"), st_save(*a, **kw))[1])
        write_metrics = trainer._write_metrics
        trainer._write_metrics = lambda: (fire("metrics write"), write_metrics())
        fetch = trainer.train_loader._fetch  # runs in the loader's prefetch thread
        trainer.train_loader._fetch = lambda idx: (fire("batch fetch"), fetch(idx))[1]

    def fire(self, point: str) -> None:
        self.calls[point] += 1
        if point == self.point and self.calls[point] == self.k:
            self.fired_at = self.trainer.step
            if self.action == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise KeyboardInterrupt


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """An uninterrupted tiny run: its state, and how often each point was reached in it."""
    run = tmp_path_factory.mktemp("tiny") / "reference"
    mp = pytest.MonkeyPatch()
    try:
        trainer = _tiny_trainer(run)
        trigger = _Trigger(trainer, mp)
        result = trainer.fit()
        trigger.handle.remove()
    finally:
        mp.undo()
    assert not result.interrupted and result.epochs == 2
    return _state(run), trigger.calls, run


@pytest.mark.parametrize("action", ["sigint", "raise"])
def test_ctrl_c_at_many_points_inside_steps_then_resume_is_bit_exact(tmp_path, tiny_reference, monkeypatch,
                                                                     action):
    """Ctrl-C (SIGINT) anywhere, inside the forward, the backward, after the optimizer step and before the step
    counter moves, while the batch is fetched or a checkpoint written: the step in flight completes and is counted,
    then last is saved and the run stops. A second Ctrl-C (a KeyboardInterrupt at that point) stops at once and
    saves only between steps. Either way the resumed run ends with the uninterrupted run's bits."""
    (ref_tensors, ref_history, ref_norms), calls, _ = tiny_reference
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: None)  # speed: durability is not what is tested here
    rnd = random.Random(f"15-{action}")
    failures, stopped = [], 0
    for point in POINTS:
        assert calls[point] >= 2, (point, calls)
        for k in sorted({rnd.randint(1, calls[point] - 1) for _ in range(2)}):
            run = tmp_path / f"{point.replace(' ', '-')}-{k}"
            lines = []
            with monkeypatch.context() as mp:
                trainer = _tiny_trainer(run, log=lines.append)
                trigger = _Trigger(trainer, mp, point, k, action)
                try:
                    first = trainer.fit()
                finally:
                    trigger.handle.remove()
            where = f"{action} at call {k} of {point} (step {trigger.fired_at})"
            if not first.interrupted:  # it came while the last epoch was validated or saved: the run had ended
                assert point in ("forward", "checkpoint write", "metrics write") and action == "sigint", where
            else:
                stopped += 1
                assert lines[-1].startswith("\ninterrupted ") and "\n" not in lines[-1][1:], (where, lines[-1])
                if action == "sigint":  # the step in flight (its accumulation group) completed, was counted, saved
                    _, meta = read_checkpoint(run / "checkpoints" / "last.safetensors")
                    if not trigger.fired_at <= meta["step"] <= trigger.fired_at + 2 or meta["batch_in_epoch"] % 2:
                        failures.append(f"{where}: saved at step {meta['step']}, batch {meta['batch_in_epoch']}")
                assert not _tiny_trainer(run).fit().interrupted
            tensors, history, norms = _state(run)
            differ = [key for key, ref in ref_tensors.items()
                      if key not in tensors or not torch.equal(tensors[key], ref)]
            if differ or history != ref_history or norms != ref_norms:
                failures.append(f"{where}: {len(differ)} tensors differ, e.g. {differ[:3]}; history "
                                f"{'same' if history == ref_history else 'differs'}; grad norms "
                                f"{'same' if norms == ref_norms else 'differ'}")
    assert stopped >= 12, stopped
    assert not failures, "\n".join(failures)


class _Killed(BaseException):
    """A SIGKILL as far as the trainer can tell: nothing after it runs, no handler catches it."""


def test_a_kill_between_the_writes_of_last_and_best_never_leaves_best_ahead(tmp_path, tiny_reference, monkeypatch):
    """At an epoch that improves, last is written first, then best; killed between the two, best is behind last's
    record (here: not there yet), and the resume rebuilds it from last's weights: the finished run's best and last
    are the uninterrupted run's."""
    (ref_tensors, ref_history, _), _, ref_run = tiny_reference
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: None)
    save, written = ckpt.save_checkpoint, []

    def killed_after_the_first_write_of_epoch_1s_end(path, tensors, meta, **kw):
        save(path, tensors, meta, **kw)
        written.append(Path(path).name)
        if (meta["epoch"], meta["batch_in_epoch"]) == (1, 0):  # epoch 1 always improves on "no best yet"
            raise _Killed

    monkeypatch.setattr(ckpt, "save_checkpoint", killed_after_the_first_write_of_epoch_1s_end)
    run = tmp_path / "run"
    with pytest.raises(_Killed):
        _tiny_trainer(run).fit()
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    _, last = read_checkpoint(run / "checkpoints" / "last.safetensors")
    best_path = run / "checkpoints" / "best.safetensors"
    assert written[-1] == "last.safetensors", written
    assert (last["epoch"], last["best_epoch"]) == (1, 1)
    assert not best_path.exists() or read_checkpoint(best_path)[1]["epoch"] <= last["epoch"]

    lines = []
    trainer = _tiny_trainer(run, log=lines.append)
    trainer.resume()  # rebuilds best: the weights last holds for the epoch it names (model's or EMA's)
    best, best_meta = read_checkpoint(best_path)
    last_tensors, last = read_checkpoint(run / "checkpoints" / "last.safetensors")
    source = last["best_source"] + "."
    assert best.keys() == {"model." + k[len(source):] for k in last_tensors if k.startswith(source)}
    assert all(torch.equal(v, last_tensors[source + k[len("model."):]]) for k, v in best.items())
    assert (best_meta["epoch"], best_meta["best_epoch"]) == (1, 1)
    assert any(line.startswith("checkpoints/best rebuilt") for line in lines), lines

    assert not _tiny_trainer(run).fit().interrupted
    tensors, history, _ = _state(run)
    assert history == ref_history
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in ref_tensors)
    best, best_meta = read_checkpoint(best_path)
    ref_best, ref_best_meta = read_checkpoint(ref_run / "checkpoints" / "best.safetensors")
    assert best.keys() == ref_best.keys() and all(torch.equal(best[k], ref_best[k]) for k in best)
    assert {k: v for k, v in best_meta.items() if k != "clock"} == \
        {k: v for k, v in ref_best_meta.items() if k != "clock"}


class _StepClock:
    """``time`` for the engine: one second passes per training batch, none anywhere else."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_the_budget_clock_survives_a_kill_between_checkpoints(tmp_path, monkeypatch):
    """A 2-minute budget, one checkpoint per 24-second epoch: killed 20 s into the second epoch, the resumed run
    starts with (nearly) all the 44 s spent, not with the 24 s of its checkpoint."""
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: None)
    clock = _StepClock()
    monkeypatch.setattr(engine, "time", clock)
    run = tmp_path / "run"
    trainer = _tiny_trainer(run, batch_size=1, accum_steps=1, checkpoint_every=0, time_budget=2.0, epochs=50)
    assert trainer.steps_per_epoch == 24
    batches = {"n": 0}

    def one_second_per_batch():
        batches["n"] += 1
        clock.now += 1.0
        if batches["n"] == 45:  # killed as it starts batch 45: 44 s of training done
            raise _Killed

    trainer.pipeline.on_call = one_second_per_batch
    with pytest.raises(_Killed):
        trainer.fit()
    spent = 44.0
    _, last = read_checkpoint(run / "checkpoints" / "last.safetensors")
    assert (last["epoch"], last["batch_in_epoch"]) == (1, 0) and last["clock"] == 24.0  # the epoch's end

    clock.now = 1000.0  # a new process: its own clock
    resumed = _tiny_trainer(run, batch_size=1, accum_steps=1, checkpoint_every=0, time_budget=2.0, epochs=50)
    assert resumed.resume()
    # lost: at most CLOCK_SAVE_EVERY_S, and the batch that was under way
    assert spent - engine.CLOCK_SAVE_EVERY_S - 1.0 <= resumed.clock <= spent

    # a new run in that folder (no resume) killed before it wrote anything does not inherit the old run's clock
    fresh = _tiny_trainer(run, batch_size=1, accum_steps=1, checkpoint_every=0, time_budget=2.0, epochs=50,
                          resume=False)

    def killed_at_once():
        raise _Killed

    fresh.pipeline.on_call = killed_at_once
    with pytest.raises(_Killed):
        fresh.fit()
    assert not (run / "checkpoints" / engine.CLOCK_FILE).exists()


def test_resume_with_another_number_of_processes_is_refused_naming_both(tmp_path, tiny_reference, monkeypatch):
    """Each rank's share of an epoch (and the saved batch position in it) depends on the number of processes: a
    resume with another is refused in one line that names both; the same number resumes exactly."""
    (ref_tensors, ref_history, _), _, _ = tiny_reference
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: None)
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        trainer = _tiny_trainer(run)
        trigger = _Trigger(trainer, mp, "pipeline", 3, "sigint")  # stops mid-epoch 1, after batch 4
        try:
            assert trainer.fit().interrupted
        finally:
            trigger.handle.remove()
    last = run / "checkpoints" / "last.safetensors"
    tensors, meta = read_checkpoint(last)
    assert (meta["world_size"], meta["epoch"], meta["batch_in_epoch"]) == (1, 0, 4)
    before = last.read_bytes()

    with monkeypatch.context() as mp:  # 1 -> 2 processes
        mp.setattr(distributed, "world_size", lambda: 2)
        with pytest.raises(ValueError) as refused:
            _tiny_trainer(run).fit()
    msg = str(refused.value)
    assert "\n" not in msg and "with 2 processes" in msg and "written by 1" in msg, msg
    assert last.read_bytes() == before

    ckpt.save_checkpoint(last, tensors, {**meta, "world_size": 4}, keep_previous=False)  # 4 -> 1
    with pytest.raises(ValueError, match=r"with 1 process: its checkpoint was written by 4"):
        _tiny_trainer(run).fit()
    ckpt.save_checkpoint(last, tensors, meta, keep_previous=False)

    assert not _tiny_trainer(run).fit().interrupted  # the same number: exact
    tensors, history, _ = _state(run)
    assert history == ref_history and all(torch.equal(tensors[k], ref_tensors[k]) for k in ref_tensors)
