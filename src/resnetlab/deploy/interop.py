"""A run's weights in the layouts other libraries load: ``resnetlab export RUN --format safetensors | hf``.

``safetensors`` writes a folder with ``model.safetensors`` (the network's state dict under torchvision's and timm's
names: resnetlab keeps their parameter names, so only the checkpoint's ``model.`` prefix goes) and ``config.json``
in timm's pretrained-config layout (architecture, num_classes, label names, mean, std, input size, crop fraction):

    torchvision.models.resnet50(num_classes=N).load_state_dict(safetensors.torch.load_file(".../model.safetensors"))
    timm.create_model("resnet50", pretrained=True, num_classes=N,
                      pretrained_cfg_overlay=dict(file=".../model.safetensors"))

``hf`` writes a Hugging Face transformers ResNet folder (``config.json``, ``model.safetensors`` under transformers'
names, ``preprocessor_config.json``), the reverse of ``models/convert.py``'s import of such folders, whose key rules
and config reading it reuses to check itself:

    transformers.ResNetForImageClassification.from_pretrained(".../export/hf")

The network only: the preprocessing (resize, centre-crop, ``/ 255``, mean/std) is the caller's, described by
``config.json``. ONNX, TorchScript and .pt2 exports (``export.py``) carry it inside the graph instead.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors.torch import save_file

from resnetlab.fileio import atomic_write

WEIGHT_FORMATS = ("safetensors", "hf")
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
    config = timm_config(meta)  # (an image model: the check is the same for both formats)
    checkpoint = Path(meta["checkpoint"])
    if out is None:
        run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        out = run / "export" / fmt
    folder = Path(out)
    if folder.suffix in (".safetensors", ".json"):
        raise ValueError(f"--out {folder}: --format {fmt} writes a folder (model.safetensors and config.json)")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fmt == "hf":
        config = hf_config(meta)
        tensors = {resnetlab_key_to_hf(k): v for k, v in tensors.items()}
        atomic_write(folder / "preprocessor_config.json", json.dumps(hf_preprocessor_config(meta), indent=2))
    atomic_write(folder / "model.safetensors",
                 lambda p: save_file(tensors, str(p), metadata={"format": "pt"}), keep_suffix=True)
    atomic_write(folder / "config.json", json.dumps(config, indent=2))
    notes = []
    if fmt == "hf":
        return folder, notes
    arch = meta["arch"]
    if arch not in TIMM_ARCHS:
        notes.append(f"timm and torchvision have no {arch!r}: the weights keep resnetlab's names, which only "
                     "resnetlab's own model of that name loads")
    elif arch not in TORCHVISION_ARCHS:
        notes.append(f"torchvision has no {arch!r}; timm loads it")
    if meta.get("model_overrides", {}).get("drop_rate"):
        notes.append("trained with dropout before the classifier: pass drop_rate to timm (eval ignores it)")
    return folder, notes


# --- Hugging Face transformers --------------------------------------------------------------------------------
_TO_HF = [  # the reverse of models/convert.py's _HF_RULES
    (re.compile(r"conv1\.(\w+)"), lambda m: f"embedder.embedder.convolution.{m[1]}"),
    (re.compile(r"bn1\.(\w+)"), lambda m: f"embedder.embedder.normalization.{m[1]}"),
    (re.compile(r"layer(\d+)\.(\d+)\.downsample\.0\.(\w+)"),
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.convolution.{m[3]}"),
    (re.compile(r"layer(\d+)\.(\d+)\.downsample\.1\.(\w+)"),
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.normalization.{m[3]}"),
    (re.compile(r"layer(\d+)\.(\d+)\.conv(\d)\.(\w+)"),
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.convolution.{m[4]}"),
    (re.compile(r"layer(\d+)\.(\d+)\.bn(\d)\.(\w+)"),
     lambda m: f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[3]) - 1}.normalization.{m[4]}"),
]


def resnetlab_key_to_hf(key: str) -> str:
    """transformers' ``ResNetForImageClassification`` name of a resnetlab ResNet key (``conv1.weight`` ->
    ``resnet.embedder.embedder.convolution.weight``, ``fc.weight`` -> ``classifier.1.weight``); checked against
    the import rules (``hf_key_to_resnetlab``), so export and import cannot drift apart."""
    from resnetlab.models.convert import hf_key_to_resnetlab

    m = re.fullmatch(r"fc\.(weight|bias)", key)
    hf = f"classifier.1.{m[1]}" if m else None
    for pattern, rename in _TO_HF:
        if hf is None and (m := pattern.fullmatch(key)):
            hf = "resnet." + rename(m)
    if hf is None or hf_key_to_resnetlab(hf) != key:
        raise ValueError(f"--format hf: the model's {key!r} has no place in a transformers ResNet")
    return hf


def hf_config(meta: dict) -> dict:
    """A transformers ``ResNetConfig`` (config.json) for the checkpoint's architecture; a one-line ValueError
    naming what differs when the architecture is not one transformers' ResNet can express (a CIFAR stem, an
    option-A shortcut, grouped convolutions, pre-activation, 1-D). Read back through ``hf_config_to_kwargs``."""
    import inspect

    from resnetlab.models.convert import hf_config_to_kwargs
    from resnetlab.models.registry import get_spec
    from resnetlab.models.resnet import ResNet

    spec = get_spec(meta["arch"])
    if spec.cls is not ResNet:
        raise ValueError(f"--format hf: {meta['arch']!r} is not a ResNet that transformers has")
    full = {p.name: p.default for p in inspect.signature(ResNet).parameters.values()
            if p.default is not inspect.Parameter.empty}
    full.update(spec.config)
    full.update({k: v for k, v in meta.get("model_overrides", {}).items() if k in full})
    block, layers, widths = full["block"], list(full["layers"]), list(full["widths"])
    strides = list(full["strides"]) if full.get("strides") else [1] + [2] * (len(layers) - 1)
    classes = list(meta["classes"])
    config = {
        "architectures": ["ResNetForImageClassification"], "model_type": "resnet",
        "num_channels": int(meta["in_chans"]), "embedding_size": int(full["stem_width"]),
        "hidden_sizes": [w * 4 for w in widths] if block == "bottleneck" else widths, "depths": layers,
        "layer_type": block, "hidden_act": "relu", "downsample_in_first_stage": strides[0] == 2,
        "downsample_in_bottleneck": bool(full["stride_in_1x1"]),
        "id2label": {str(i): c for i, c in enumerate(classes)}, "label2id": {c: i for i, c in enumerate(classes)},
    }
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"--format hf: {meta['arch']!r} has {block!r} blocks; transformers' ResNet has basic and "
                         "bottleneck ones")
    kwargs, required = hf_config_to_kwargs(config)
    wanted = {**kwargs, **required, "stem_kernel": 7, "stem_stride": 2, "stem_pool": True, "residual": True,
              "head_hidden": None, "norm_eps": 1e-5}
    differs = [k for k, v in wanted.items() if k != "strides" and k in full and _same(full[k]) != _same(v)]
    if list(kwargs["strides"]) != strides:
        differs.append("strides")
    if differs:
        raise ValueError(f"--format hf: {meta['arch']!r} is not a transformers ResNet (it differs in "
                         f"{', '.join(sorted(set(differs)))})")
    return config


def _same(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def hf_preprocessor_config(meta: dict) -> dict:
    """transformers' image processor for ResNets (``ConvNextImageProcessor``): resize the short side to
    size / crop_pct, centre-crop, ``/ 255``, mean/std, as resnetlab evaluates."""
    pipe = meta["pipeline"]
    return {"image_processor_type": "ConvNextImageProcessor", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pipe["mean"]),
            "image_std": list(pipe["std"]), "resample": 2, "crop_pct": float(pipe.get("crop_pct", 1.0)),
            "size": {"shortest_edge": int(min(pipe["size"]))}}
