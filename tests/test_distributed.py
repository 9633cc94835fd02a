"""Data-parallel training under torchrun (gloo, 2 CPU processes), gradient accumulation, the single-process no-ops.

The torchrun tests start real processes (``python -m torch.distributed.run --standalone``, which picks a free
port), so they are marked slow: each launch costs the import of torch twice over on a loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import options_argv, write_class_folders
from resnetlab.data.loader import ArrayLoader
from resnetlab.data.pipeline import Pipeline
from resnetlab.models import create_model
from resnetlab.training import distributed
from resnetlab.training.checkpoint import read_checkpoint, strip_prefix
from resnetlab.training.config import TrainConfig, make_config
from resnetlab.training.engine import Trainer
from resnetlab.training.precision import pick_precision

# Val accuracy both runs must reach on the easy task (4 classes, 6 val images each). Measured on this machine over
# seeds 0-2: 1.00 for the single process and 1.00 for 2 processes, every time; 0.9 leaves room for one or two
# borderline images either way without letting a run that did not learn (chance: 0.25) pass.
EASY_TASK_MIN_ACC = 0.9


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RESNETLAB_CACHE": str(tmp_path / "cache"),
            "PYTHONUNBUFFERED": "1"}


def _train_args(data: Path, out: Path, cache: Path, **overrides) -> list[str]:
    opts = {"arch": "resnet20", "img_size": 16, "epochs": 6, "lr": 0.05, "warmup_epochs": 0, "val_fraction": 0.25,
            "device": "cpu", "precision": "fp32", "seed": 0, "grad_norm_every": 1}
    opts.update(overrides)
    return ["train", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--quiet", "--no-flip",
            "--no-channels-last", *options_argv(opts)]


def _torchrun(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "resnetlab", *argv]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _loads_into_a_plain_model(path: Path) -> None:
    tensors, meta = read_checkpoint(path)
    assert not any(".module." in k or k.startswith("module.") for k in tensors)
    model = create_model(meta["arch"], num_classes=meta["num_classes"], in_chans=meta["in_chans"],
                         **meta["model_overrides"])
    model.load_state_dict(strip_prefix(tensors, "model."))  # strict: every key, every shape


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory) -> Path:
    return write_class_folders(tmp_path_factory.mktemp("ddp") / "data", classes=4, per_class=24, size=16, seed=5)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, easy_data):
    """The same global batch (2 x 4 vs 1 x 8), the same steps: both learn the easy task; rank 0 alone writes."""
    env, cache = _env(tmp_path), tmp_path / "cache"
    t0 = time.perf_counter()
    one = subprocess.run([sys.executable, "-m", "resnetlab", *_train_args(easy_data, tmp_path / "one", cache,
                                                                          batch_size=8)],
                         env=env, capture_output=True, text=True, timeout=600)
    t1 = time.perf_counter()
    two = subprocess.run(_torchrun(2, _train_args(easy_data, tmp_path / "runs" / "two", cache, batch_size=4)),
                         env=env, capture_output=True, text=True, timeout=600)
    t2 = time.perf_counter()
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    print(f"1 process: {t1 - t0:.1f} s, 2 processes: {t2 - t1:.1f} s (wall, with start-up)")

    run = tmp_path / "runs" / "two"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["two"]  # no second run directory
    assert len(list(run.rglob("metrics.jsonl"))) == 1
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]  # one line per epoch: one writer
    # rank 0 speaks for all: the epoch lines appear once in the combined output
    assert (two.stdout + two.stderr).count("epoch 6/6:") == 1
    _loads_into_a_plain_model(run / "checkpoints" / "best.safetensors")
    _loads_into_a_plain_model(run / "checkpoints" / "last.safetensors")
    tensors, meta = read_checkpoint(run / "checkpoints" / "last.safetensors")
    assert meta["world_size"] == 2 and "rng.rank1.aug" in tensors and "rng.aug" in tensors
    acc_one, acc_two = _metrics(tmp_path / "one")[-1]["val_acc"], records[-1]["val_acc"]
    train_s = [sum(r["seconds"] for r in _metrics(r)) for r in (tmp_path / "one", run)]
    print(f"final val accuracy: 1 process {acc_one:.3f}, 2 processes {acc_two:.3f}; training time (sum of epochs) "
          f"{train_s[0]:.1f} s vs {train_s[1]:.1f} s")
    assert acc_one >= EASY_TASK_MIN_ACC and acc_two >= EASY_TASK_MIN_ACC


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_one_step_then_resume_finishes(tmp_path, easy_data):
    """torchrun forwards SIGTERM: the ranks agree on a step, save (with each rank's RNG states), and exit; a
    resumed 2-process run finishes the schedule with every epoch recorded once. With accumulation (2 batches per
    optimizer step) and mid-epoch checkpoints."""
    env, cache, run = _env(tmp_path), tmp_path / "cache", tmp_path / "run"
    argv = _train_args(easy_data, run, cache, batch_size=2, epochs=8, accum_steps=2, checkpoint_every=4)
    proc = subprocess.Popen(_torchrun(2, argv), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    norms = run / "grad_norms.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if norms.exists() and len(norms.read_text().splitlines()) >= 3:  # training is under way
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]
    assert "saving checkpoints/last" in out, out[-3000:]
    tensors, meta = read_checkpoint(run / "checkpoints" / "last.safetensors")
    assert meta["world_size"] == 2 and "rng.rank1.aug" in tensors
    assert meta["batch_in_epoch"] % 2 == 0 or meta["batch_in_epoch"] == 0  # at an optimizer-step boundary
    # the optimizer steps once per 2 batches: grad norms (one record per optimizer step) at every other batch
    steps = [json.loads(ln)["step"] for ln in norms.read_text().splitlines()]
    assert steps and all(s % 2 == 1 for s in steps), steps

    resumed = subprocess.run(_torchrun(2, ["train", "--out", str(run), "--resume", "--quiet"]), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert [r["epoch"] for r in _metrics(run)] == list(range(1, 9))
    steps = [json.loads(ln)["step"] for ln in norms.read_text().splitlines()]
    assert steps == sorted(set(steps))  # no record lost or repeated by the resume
    _loads_into_a_plain_model(run / "checkpoints" / "last.safetensors")


# --- gradient accumulation, in-process -----------------------------------------------------------------------


class _Identity(Pipeline):
    """uint8 images to floats; no augmentation, so two runs see exactly the same inputs."""

    modality = "image"
    num_classes = 3

    def __call__(self, x, y, train, generator=None):  # the signature from before index and epoch existed
        return x.float() / 255.0, y

    def input_size(self):
        return (1, 4, 4)

    def config(self):
        return {"modality": "image"}


def _fit_linear(tmp_path: Path, name: str, batch_size: int, accum_steps: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(48, 1, 4, 4), dtype=np.uint8)
    y = rng.integers(0, 3, size=48)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))  # no BatchNorm: batch statistics would differ
    cfg = make_config(TrainConfig, {"batch_size": batch_size, "accum_steps": accum_steps, "epochs": 3, "lr": 0.1,
                                   "weight_decay": 1e-3, "warmup_epochs": 0.0, "label_smoothing": 0.1,
                                   "grad_norm_every": 0, "quiet": True, "out": str(tmp_path / name)})
    loader = ArrayLoader(x, y, batch_size, shuffle=True, drop_last=True, seed=0)
    prec = pick_precision(torch.device("cpu"), "fp32", False)
    trainer = Trainer(model, _Identity(), loader, None, cfg, tmp_path / name, {}, prec, log=lambda m: None)
    trainer.fit()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_accumulating_two_batches_of_4_steps_like_one_batch_of_8(tmp_path):
    """The mean loss over 8 samples has the gradient of the mean of two 4-sample means: same weights, up to
    float rounding (same order of samples, same number of optimizer steps, weight decay once per step)."""
    big = _fit_linear(tmp_path, "big", batch_size=8, accum_steps=1)
    accumulated = _fit_linear(tmp_path, "acc", batch_size=4, accum_steps=2)
    plain = _fit_linear(tmp_path, "plain", batch_size=4, accum_steps=1)
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain["1.weight"], big["1.weight"], atol=1e-4)  # the test can tell them apart


# --- without torchrun: every helper is a no-op ---------------------------------------------------------------


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.is_enabled()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main()
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert distributed.convert_sync_batchnorm(model, torch.device("cpu")) is model  # sync_bn: only when world > 1
    assert distributed.broadcast_object("runs/x") == "runs/x"
    assert distributed.all_reduce_sum([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    with distributed.main_first():
        pass
    distributed.barrier()
    said = []
    distributed.main_only(said.append)("hello")
    assert said == ["hello"]


def test_a_non_zero_rank_stays_silent(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    said = []
    distributed.main_only(said.append)("hello")
    assert said == [] and not distributed.is_main()


def test_bad_torchrun_environment_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        distributed.launched_world_size()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_with_sync_bn(tmp_path, easy_data):
    run = tmp_path / "run"
    argv = _train_args(easy_data, run, tmp_path / "cache", batch_size=4, device="cuda", sync_bn=True, epochs=3)
    done = subprocess.run(_torchrun(2, argv), env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _loads_into_a_plain_model(run / "checkpoints" / "last.safetensors")
