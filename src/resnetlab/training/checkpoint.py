"""Checkpoints: one safetensors file per checkpoint, written atomically, verified by hash when read.

A checkpoint holds the model weights (``model.*``), optionally the EMA weights (``ema.*``), and for
resuming the optimizer state (``optim.*``) and random-number states (``rng.*``). Everything that is not a
tensor (architecture, classes, pipeline, config, counters) is JSON in the safetensors header. Loading never
unpickles anything, so a checkpoint cannot run code.

Writing: temporary file, fsync, the previous checkpoint kept as ``NAME.prev.safetensors``, rename. A
checkpoint that fails its hash (truncated, corrupted) is reported and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from resnetlab.fileio import atomic_write, remove_stale_temporaries, temporary_sibling

FORMAT = "resnetlab-checkpoint/1"


class CheckpointError(ValueError):
    """An unreadable, corrupt or foreign checkpoint; the message names the file."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and torch.compile wrappers (so saved keys have no ``module.`` prefix)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, state_json = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.state.{pid}.{k}"] = v
            else:
                state_json.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": state_json}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim.state."):
            pid, name = key[len("optim.state."):].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for pid, extra in info.get("state", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict, *,
                    keep_previous: bool = True) -> Path:
    """Write ``tensors`` and JSON ``meta`` to ``path`` atomically; the old file becomes ``*.prev.safetensors``.

    On failure (disk full, interrupted) the existing checkpoint is untouched and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT, "resnetlab": json.dumps(meta, default=str), "sha256": _digest(tensors),
              "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    data = st_save(tensors, metadata=header)
    slow = os.environ.get("RESNETLAB_TEST_SLOW_SAVE")

    def before_replace() -> None:
        if slow:  # test hook: a window in which the tests kill the process mid-save
            time.sleep(float(slow))
        if keep_previous and path.exists():
            _keep_previous(path)

    try:
        atomic_write(path, data, durable=True, before_replace=before_replace)
    except OSError as e:  # disk full, read-only, quota: one line naming the file; the old checkpoint is intact
        raise OSError(e.errno, f"cannot write checkpoint ({e.strerror or e})", str(path)) from None
    return path


def _keep_previous(path: Path) -> None:
    """``path`` also as ``*.prev.safetensors``: a hard link, so ``path`` itself exists at every moment of a save
    (a process killed between two renames would otherwise leave only the ``.prev`` copy, which ``read_latest``
    falls back to). Filesystems without hard links get the two renames."""
    prev = previous_path(path)
    remove_stale_temporaries(prev.parent, prev.name)
    link = temporary_sibling(prev)
    try:
        os.link(path, link)
        os.replace(link, prev)
    except OSError:
        if link.exists():
            link.unlink()
        os.replace(path, prev)


def previous_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".safetensors", "") + ".prev.safetensors")


def read_checkpoint(path: str | Path, *, verify: bool = True, prefixes: tuple[str, ...] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a resnetlab checkpoint: ``(tensors, meta)``. Raises CheckpointError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            keys = [k for k in f.keys() if prefixes is None or k.startswith(prefixes)]
            tensors = {k: f.get_tensor(k) for k in keys}
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        if _looks_pickled(path):
            raise CheckpointError(f"{path} is a pickled PyTorch file, not a resnetlab checkpoint: it is not opened, "
                                  "since unpickling can run code (to start from its weights: resnetlab finetune "
                                  "--pretrained FILE, which reads tensors only)") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              " (truncated or not a safetensors file)") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a resnetlab checkpoint (format {header.get('format')!r})")
    if verify and prefixes is None and header.get("sha256") != _digest(tensors):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the hash written with it")
    try:
        meta = json.loads(header["resnetlab"])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {path} has no readable resnetlab metadata") from None
    return tensors, meta


def _looks_pickled(path: Path) -> bool:
    """A ``torch.save`` zip archive or a raw pickle (protocol 2+), judged by the first bytes only."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_latest(path: str | Path, log=print) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """Read ``path``; if it is corrupt or missing, fall back to its ``.prev`` copy and say so."""
    path = Path(path)
    try:
        tensors, meta = read_checkpoint(path)
        return tensors, meta, path
    except CheckpointError as first:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        log(f"warning: {first}; using the previous checkpoint {prev.name}")
        tensors, meta = read_checkpoint(prev)
        return tensors, meta, prev


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)``; a one-line CheckpointError naming ``path`` when they do not fit (another
    number of classes or channels, another architecture) instead of PyTorch's multi-line RuntimeError."""
    own = model.state_dict()
    shapes = [(k, list(state[k].shape), list(v.shape)) for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        parts = []
        if shapes:
            k, theirs, ours = shapes[0]
            parts.append(f"{len(shapes)} tensor(s) of another shape, e.g. {k}: {theirs} in the file, {ours} in the "
                         "model")
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise CheckpointError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def find_checkpoint(run_or_file: str | Path, which: str = "best") -> Path:
    """A checkpoint file from a run directory (``checkpoints/best``, else ``last``) or a file path."""
    p = Path(run_or_file)
    if p.is_file():
        return p
    if p.is_dir():
        for name in (which, "last", "best"):
            for cand in (p / "checkpoints" / f"{name}.safetensors", p / f"{name}.safetensors"):
                if cand.is_file():
                    return cand
        raise CheckpointError(f"no checkpoint in {p} (expected {p}/checkpoints/{which}.safetensors)")
    raise CheckpointError(f"no such run directory or checkpoint file: {p}")
