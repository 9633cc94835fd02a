"""A run's weights in the layouts other libraries load: ``resnetlab export RUN --format safetensors``.

``safetensors`` writes a folder with ``model.safetensors`` (the network's state dict under torchvision's and timm's
names: resnetlab keeps their parameter names, so only the checkpoint's ``model.`` prefix goes) and ``config.json``
in timm's pretrained-config layout (architecture, num_classes, label names, mean, std, input size, crop fraction):

    torchvision.models.resnet50(num_classes=N).load_state_dict(safetensors.torch.load_file(".../model.safetensors"))
    timm.create_model("resnet50", pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file=".../model.safetensors"))

The network only: the preprocessing (resize, centre-crop, ``/ 255``, mean/std) is the caller's, described by
``config.json``. ONNX, TorchScript and .pt2 exports (``export.py``) carry it inside the graph instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from resnetlab.fileio import atomic_write

WEIGHT_FORMATS = ("safetensors",)
# resnetlab architectures whose state dict has the same names and shapes in timm (and torchvision: TORCHVISION)
TIMM_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet18d", "resnet50d",
              "resnext50_32x4d", "wide_resnet50_2")
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                     "wide_resnet50_2")


def timm_config(meta: dict) -> dict:
    """timm's ``config.json`` layout (as on the Hugging Face hub) for a checkpoint's ``meta``: the architecture,
    the classes and the eval preprocessing of ``meta["pipeline"]`` (mean/std on [0, 1] pixel values)."""
    pipe = meta["pipeline"]
    if pipe.get("modality") != "image":
        raise ValueError(f"--format safetensors exports image models in timm's layout; this run's model is "
                         f"{pipe.get('modality')!r}")
    size = list(pipe["size"])
    crop_pct = float(pipe.get("crop_pct", 1.0))  # resnetlab's evaluation: the whole image scaled to the size
    classes = list(meta["classes"])
    return {
        "architecture": meta["arch"], "num_classes": int(meta["num_classes"]), "in_chans": int(meta["in_chans"]),
        "label_names": classes,
        "pretrained_cfg": {
            "tag": "resnetlab", "custom_load": False, "input_size": [int(meta["in_chans"]), *size],
            "fixed_input_size": False, "interpolation": "bilinear", "crop_pct": crop_pct, "crop_mode": "center",
            "mean": list(pipe["mean"]), "std": list(pipe["std"]), "num_classes": int(meta["num_classes"]),
            "first_conv": "conv1", "classifier": "fc", "label_names": classes},
    }


def export_weights(run_or_checkpoint: str | os.PathLike, fmt: str = "safetensors",
                   out: str | os.PathLike | None = None, *, which: str = "best") -> tuple[Path, list[str]]:
    """Write ``out`` (default ``RUN_DIR/export/<fmt>/``): ``model.safetensors`` and ``config.json``.

    Returns the folder and notes (e.g. that timm and torchvision have no model of this architecture's name)."""
    from resnetlab.training.run_dir import load_model

    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weights format {fmt!r}; allowed: {', '.join(WEIGHT_FORMATS)}")
    model, _, meta = load_model(run_or_checkpoint, device="cpu", which=which)
    config = timm_config(meta)
    checkpoint = Path(meta["checkpoint"])
    if out is None:
        run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        out = run / "export" / fmt
    folder = Path(out)
    if folder.suffix in (".safetensors", ".json"):
        raise ValueError(f"--out {folder}: --format {fmt} writes a folder (model.safetensors and config.json)")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / "model.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"format": "pt"}), keep_suffix=True)
    atomic_write(folder / "config.json", json.dumps(config, indent=2))
    notes = []
    arch = meta["arch"]
    if arch not in TIMM_ARCHS:
        notes.append(f"timm and torchvision have no {arch!r}: the weights keep resnetlab's names, which only "
                     "resnetlab's own model of that name loads")
    elif arch not in TORCHVISION_ARCHS:
        notes.append(f"torchvision has no {arch!r}; timm loads it")
    if meta.get("model_overrides", {}).get("drop_rate"):
        notes.append("trained with dropout before the classifier: pass drop_rate to timm (eval ignores it)")
    return folder, notes
