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

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tiny_fit
from conftest import options_argv, write_class_folders
from resnetlab.models import create_model
from resnetlab.training import distributed
from resnetlab.training.checkpoint import read_checkpoint, strip_prefix


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
def test_two_processes_of_4_end_with_the_weights_of_one_process_of_8(tmp_path):
    """DDP, 2 processes x batch 4, against 1 process x batch 8: the same global batches (rank r takes every other
    sample of the epoch's permutation), a model without batch statistics, fp32: after 18 optimizer steps the
    weights agree within 1e-5 only if the gradients were averaged over the ranks (summed, or left per rank, they
    drift apart by far more). Rank 0 alone writes the run directory."""
    one = tiny_fit.fit(tmp_path / "one", batch_size=8)
    run = tmp_path / "two"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(Path(tiny_fit.__file__)), str(run), "4"],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    weights = load_file(str(run / "weights.safetensors"))
    assert weights.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(weights[k], one[k], rtol=0, atol=1e-5)
    moved = max(float((one[k] - tiny_fit.tiny_model().state_dict()[k]).abs().max()) for k in one)
    assert moved > 1e-2  # the runs trained: equal weights are not two untouched initialisations
    assert [r["epoch"] for r in _metrics(run)] == [1, 2, 3]  # one writer: each epoch's line once
    tensors, meta = read_checkpoint(run / "checkpoints" / "last.safetensors")
    assert meta["world_size"] == 2 and "rng.rank1.aug" in tensors and "rng.aug" in tensors


def _fit_rank(rank: int, world: int, init_file: str, out: str, nan_at: tuple[int, int], said) -> None:
    """One rank of a gloo group in a forked process: the tiny fit, with ``nan_at``'s rank's loss turning NaN."""
    import torch.distributed as dist

    from resnetlab.training.engine import TrainingDiverged

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tiny_fit.fit(Path(out), 4, nan_at=nan_at)
        said.put((rank, "finished"))
    except TrainingDiverged as e:
        said.put((rank, str(e)))
    finally:
        dist.destroy_process_group()


def test_a_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Rank 1's loss turns NaN at step 3, rank 0's stays finite: the flag rides on the step's all-reduce, so both
    ranks raise TrainingDiverged at that step with the same message (before: rank 1 raised alone and rank 0 waited
    in its next all-reduce, for the 30-minute timeout under torchrun). Two gloo processes, spawned: a fork would
    copy autograd's worker threads of the tests that ran before in this process, and backward refuses to run."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    said = ctx.Queue()
    procs = [ctx.Process(target=_fit_rank, args=(r, 2, str(tmp_path / "init"), str(tmp_path / "run"), (1, 3), said))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, "a rank was still waiting after 60 s"
    lines = dict(said.get(timeout=5) for _ in range(2))
    assert lines[0].startswith("loss is NaN or infinite in 1 of 2 processes at epoch 1, step 3:"), lines
    assert lines[1] == lines[0]  # the same step, the same words, on both ranks
    assert not (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()


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
    assert resumed.stdout.count("resumed from") == 1  # rank 0 speaks for all
    assert [r["epoch"] for r in _metrics(run)] == list(range(1, 9))
    steps = [json.loads(ln)["step"] for ln in norms.read_text().splitlines()]
    assert steps == sorted(set(steps))  # no record lost or repeated by the resume
    _loads_into_a_plain_model(run / "checkpoints" / "last.safetensors")


# --- gradient accumulation, in-process -----------------------------------------------------------------------


def test_accumulating_two_batches_of_4_steps_like_one_batch_of_8(tmp_path):
    """The mean loss over 8 samples has the gradient of the mean of two 4-sample means: same weights, up to
    float rounding (same order of samples, same number of optimizer steps, weight decay once per step)."""
    big = tiny_fit.fit(tmp_path / "big", batch_size=8, accum_steps=1)
    accumulated = tiny_fit.fit(tmp_path / "acc", batch_size=4, accum_steps=2)
    plain = tiny_fit.fit(tmp_path / "plain", batch_size=4, accum_steps=1)
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain["3.weight"], big["3.weight"], atol=1e-4)  # the test can tell them apart


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
