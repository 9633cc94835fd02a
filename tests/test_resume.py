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

import pytest
import torch

from conftest import write_class_folders
from resnetlab.training.checkpoint import read_checkpoint

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
