"""A run directory's trained model, loaded back: ``load_model``, the precision to run it in, and the code version
saved beside every checkpoint.

Low in the stack on purpose: ``deploy/``, ``explain/`` and ``report/`` load models through this module, and
``resnetlab.api`` re-exports it (``resnetlab.load_model``); nothing here imports those layers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from resnetlab.data.pipeline import build_pipeline
from resnetlab.models import create_model
from resnetlab.training import checkpoint as ckpt
from resnetlab.training.precision import pick_device, pick_precision


def code_version() -> dict:
    """The package version and, in a git checkout, the commit (saved beside every checkpoint)."""
    from resnetlab import __version__

    info = {"resnetlab": __version__, "torch": str(torch.__version__)}
    try:
        root = Path(__file__).resolve().parents[3]  # src/resnetlab/training/run_dir.py -> the checkout
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            info["git"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def load_model(run_or_checkpoint: str | Path, *, device: str = "cpu", which: str = "best"):
    """``(model, pipeline, meta)`` from a run directory or a checkpoint file, ready for inference (eval mode).

    ``which``: ``"best"`` or ``"last"`` (a run directory's checkpoint). ``meta`` is the checkpoint's metadata
    plus ``"checkpoint"``, the file read. Raises ``CheckpointError`` naming the file when it is unreadable or
    lacks what a model needs.
    """
    path = ckpt.find_checkpoint(run_or_checkpoint, which)
    tensors, meta = ckpt.read_checkpoint(path)
    for key in ("arch", "num_classes", "in_chans", "pipeline", "classes"):
        if key not in meta:
            raise ckpt.CheckpointError(f"checkpoint {path} lacks {key!r} in its metadata")
    model = create_model(meta["arch"], num_classes=meta["num_classes"], in_chans=meta["in_chans"],
                         **meta.get("model_overrides", {}))
    ckpt.load_weights(model, ckpt.strip_prefix(tensors, "model."), path)
    dev = pick_device(device)
    model.to(dev).eval()
    pipeline = build_pipeline(meta["pipeline"]).to(dev)
    meta["checkpoint"] = str(path)
    return model, pipeline, meta


def inference_precision(device: torch.device, meta: dict, ndim: int, channels_last: bool | None):
    """The precision the model was trained (and validated) in, when this device has it; else ``auto``."""
    trained = meta.get("precision", "auto")
    if trained == "fp16" and device.type != "cuda":
        trained = "auto"
    return pick_precision(device, trained, channels_last, ndim)
