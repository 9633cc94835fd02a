"""Data-parallel training under ``torchrun``: one process per device, gradients averaged by DDP.

``torchrun --nproc-per-node N -m resnetlab train ...`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`setup` joins
them into one process group (NCCL on CUDA, gloo on the CPU) and gives each its device. Without those variables,
or with a single process, every function here is a no-op and the single-process path is unchanged.

Who does what in a run of N processes:

- data: every process reads the same decoded cache; the first process of each node builds it while the others
  wait (:func:`main_first`), then they open it;
- training: each rank takes its slice of the epoch's permutation (``ArrayLoader(rank=, world_size=)``); the
  batch size is per process; DDP averages the gradients; loss and accuracy sums are all-reduced, so the
  metrics cover the whole epoch;
- validation: every rank evaluates the full validation set, with rank 0's buffers (BatchNorm statistics)
  broadcast first, so all ranks compute the numbers of the model that rank 0 saves (simple, and correct for
  any size of validation set; it costs N times the validation compute);
- writing: rank 0 alone writes the run directory (config, metrics, checkpoints, report); checkpoints hold the
  unwrapped model (no ``module.`` prefix) and every rank's random-number states.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def launched_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def is_enabled() -> bool:
    """True in a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0) if launched_world_size() > 1 else 0


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``; 0 without torchrun)."""
    return _env_int("LOCAL_RANK", 0) if launched_world_size() > 1 else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and logs."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once per process) and return this rank's device.

    ``device`` is the device type picked for the run. On CUDA each process takes GPU ``LOCAL_RANK``.
    """
    world = launched_world_size()
    if world <= 1:
        return device
    if device.type == "cuda":
        index = local_rank()
        if index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {index} but only {torch.cuda.device_count()} CUDA device(s) on this node: "
                             "start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    if not dist.is_initialized():
        if not dist.is_available():
            raise ValueError("this PyTorch build has no torch.distributed: run without torchrun")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return device


def teardown() -> None:
    """Leave the process group (at the end of a run, so NCCL frees its resources)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_enabled():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextlib.contextmanager
def main_first():
    """The first process of each node runs the block first (e.g. builds the data cache), then the others.

    If the first process fails inside the block it never reaches the barrier; torchrun then stops the others.
    """
    leader = local_rank() == 0
    if not leader:
        barrier()
    yield
    if leader:
        barrier()


def main_only(log):
    """``log`` on rank 0; nothing on the other ranks."""

    def log_main(msg: str) -> None:
        if is_main():
            log(msg)

    return log_main


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (e.g. the run directory, whose default name holds the time)."""
    if not is_enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_enabled():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    """Sum ``values`` element-wise over the ranks (float64, so counts stay exact). A 1-D tensor already on
    ``device`` is reduced as it is (flags computed there need no trip through the host first); the result is
    read once."""
    if torch.is_tensor(values):
        if not is_enabled():
            return values.tolist()
        t = values.to(device=device, dtype=torch.float64).clone()
    elif not is_enabled():
        return list(values)
    else:
        t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    DDP is built with ``broadcast_buffers=False`` (``wrap_ddp``): each rank's running statistics follow its own
    batches during an epoch (training normalises with batch statistics, so the gradients do not depend on them),
    and this makes them rank 0's again before validating and saving.
    """
    if not is_enabled():
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers that compute their statistics over the global batch (only with more than one process)."""
    if not is_enabled():
        return model
    if device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU implementation); "
                         "drop --sync-bn on the CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel, replicating the parameters that require gradients now.

    Built again when a fine-tuning phase changes which parameters are trainable, so DDP never waits for the
    gradient of a frozen one.
    """
    from torch.nn.parallel import DistributedDataParallel

    # no buffer broadcast before every forward (a collective per step): broadcast_buffers() syncs them per epoch
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)
