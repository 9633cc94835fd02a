"""Checkpoint converters: one per source format, each returning tensors under resnetlab's parameter names.

Every converter returns a :class:`ConvertedWeights`: the renamed state dict plus what the file says about the
architecture. Shapes are checked against a model in one place, :func:`resnetlab.models.pretrained.load_pretrained`,
which reports every key that differs (timm's ``checkpoint_filter_fn`` / nanoGPT's ``from_pretrained`` idea).

================  ==============================================================================================
format            what the converter does
================  ==============================================================================================
resnetlab         ``.safetensors`` whose metadata key ``"resnetlab"`` holds the model description (JSON) and
                  whose tensors ``model.*`` are the state dict (:func:`read_resnetlab_checkpoint`)
torchvision       ``.pth`` state dicts: already resnetlab's names (resnetlab keeps torchvision's)
timm              ``.pth``/``.bin``/``.safetensors``: torchvision's names, plus the deep stem
                  (``conv1.0/1/3/4/6``) and avg-pool shortcut (``downsample.1/2``) of ``resnet*d``, which
                  resnetlab names the same way
hf-transformers   a ``ResNetForImageClassification`` / ``ResNetModel`` folder (config.json + weights):
                  renamed key by key (:func:`hf_key_to_resnetlab`); the architecture comes from config.json
keras             Keras applications ResNet50/101/152 ``.h5``, ``.weights.h5``, ``.keras`` (``convert_keras.py``)
================  ==============================================================================================

Loading never runs code from a file: safetensors, ``torch.load(weights_only=True)`` and h5py only.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from resnetlab.models.converted import (  # noqa: F401  (public here: every converter returns ConvertedWeights)
    ConvertedWeights,
    arch_from_name,
    infer_resnet_kwargs,
    match_arch,
)
from resnetlab.models.weights import WeightsEntry, hf_preprocessing

RESNETLAB_META_KEY = "resnetlab"  # safetensors metadata key holding the JSON model description
MODEL_PREFIX = "model."  # prefix of the model's tensors in a resnetlab checkpoint ("optim." etc. are skipped)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint holds Python objects other than tensors and containers; it was not unpickled."""


# --- safe reading ----------------------------------------------------------------------------------------------
# torch.load(weights_only=True) can still run code from a crafted file on torch <= 2.5.1 (CVE-2025-32434).
# pyproject.toml requires torch >= 2.6; this guards an environment that has an older one anyway.
SAFE_UNPICKLING_TORCH = (2, 6)


def check_safe_unpickling(path: str | Path) -> None:
    """Raise :class:`UnsafeCheckpointError` when this torch cannot unpickle ``path`` without possibly running code
    from it (torch < 2.6); call it before every ``torch.load`` or ``torch.export.load`` of a user's file."""
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if m is None or (int(m[1]), int(m[2])) < SAFE_UNPICKLING_TORCH:
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle it with torch {torch.__version__}: before torch 2.6 even "
            "torch.load(weights_only=True) can run code from a file (CVE-2025-32434); upgrade torch "
            "(pip install 'torch>=2.6') or convert the file to .safetensors on a machine where you trust it")


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with a clear error when the file holds code.

    Only tensors, plain containers and numbers (and ``argparse.Namespace``, which timm's training checkpoints
    store their arguments in) are unpickled; anything else raises :class:`UnsafeCheckpointError` before a
    single object of the file is built, so no ``__reduce__`` payload ever runs. Refused outright on torch < 2.6
    (:func:`check_safe_unpickling`).
    """
    check_safe_unpickling(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()
        why = next((ln.strip() for ln in detail if "GLOBAL" in ln or "Unsupported" in ln), detail[0] if detail else "")
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle it, it holds Python objects other than tensors ({why[:160]}); resnetlab "
            "never runs code from a checkpoint. Re-save its tensors on a machine where you trust the file, e.g. "
            "safetensors.torch.save_file(state_dict, 'weights.safetensors')") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


MAX_INDEX_BYTES = 64 << 20  # a shard index lists tensor names; real ones are kilobytes


def _confinement(folder: Path) -> Path:
    """The folder a shard may resolve into: the index's own, or for an index in a Hugging Face hub cache snapshot
    (``models--org--name/snapshots/<rev>/``, whose files are symlinks to ``../../blobs/<hash>``) that repository's
    cache folder."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.resolve()
    return folder.resolve()


def _shards(index_path: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index (``*.index.json``) names, each checked before anything is read.

    A shard must be a plain file name in the index's folder (no ``/``, ``..`` or absolute path), a weights file
    that is not itself an index (no nesting), and must not be a symlink that leads out of the folder (or, in a
    Hugging Face cache, out of the repository's cache folder). Raises ``ValueError`` naming the index otherwise.
    """
    if index_path.stat().st_size > MAX_INDEX_BYTES:
        raise ValueError(f"{index_path}: a shard index of {index_path.stat().st_size:,} bytes, more than "
                         f"{MAX_INDEX_BYTES:,}; not a checkpoint index")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index_path}: not a valid JSON shard index ({' '.join(str(e).split())[:120]})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: a shard index needs a non-empty 'weight_map' object (tensor name -> shard "
                         "file)")
    root = _confinement(index_path.parent)
    shards = []
    bad = next((v for v in weight_map.values() if not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"{index_path}: shard {repr(bad)[:100]} is not a file name")
    for name in sorted(set(weight_map.values())):
        shown = repr(name) if len(name) <= 100 else repr(name[:97] + "...")
        if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
                or (len(name) > 1 and name[1] == ":")):
            raise ValueError(f"{index_path}: shard {shown} is not a plain file name in the index's folder; "
                             "refusing to read files elsewhere")
        if name.lower().endswith(".index.json") or not name.lower().endswith((".safetensors",) + TORCH_SUFFIXES):
            raise ValueError(f"{index_path}: shard {shown} is not a .safetensors or {'/'.join(TORCH_SUFFIXES)} "
                             "weights file (a shard index cannot name another index)")
        shard = index_path.parent / name
        if not shard.resolve().is_relative_to(root):
            raise ValueError(f"{index_path}: shard {shown} is a symlink to {shard.resolve()}, outside {root}; "
                             "refusing to read files elsewhere")
        shards.append(shard)
    return shards


def load_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat ``{name: tensor}`` dict from a ``.safetensors``, a pickled state dict or a sharded index.

    Pickled checkpoints are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, DDP's ``module.`` prefix).
    The shards of an index are confined to its folder (:func:`_shards`).
    """
    path = Path(path)
    if path.name.endswith(".index.json"):
        out: dict[str, torch.Tensor] = {}
        for shard in _shards(path):
            out.update(_load_weights_file(shard))
        return out
    return _load_weights_file(path)


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    return unwrap_state_dict(safe_torch_load(path), path)


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "state_dict_ema", "model_ema")


def unwrap_state_dict(obj: Any, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint: training checkpoints keep it under ``state_dict`` (timm,
    Lightning) or ``model``; a ``module.`` (DDP) or ``model.`` prefix on every key is removed."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            kinds = ", ".join(f"{k}: {type(v).__name__}" for k, v in list(obj.items())[:8])
            raise ValueError(f"{path}: not a state dict (a dict of tensors) and no state dict under any of "
                             f"{', '.join(_WRAPPER_KEYS)}; it holds {{{kinds}}}")
        obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}"
                         + (" holding non-tensors" if isinstance(obj, dict) and obj else ""))
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


# --- resnetlab's own checkpoints -------------------------------------------------------------------------------
def read_resnetlab_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a resnetlab checkpoint: ``(model state dict, metadata)``.

    The file is a ``.safetensors`` whose metadata key ``"resnetlab"`` holds a JSON object with at least
    ``arch`` (a registered name) and usually ``num_classes``, ``in_chans``, ``model_overrides`` (the other
    ``create_model`` arguments) and ``classes`` (class names, in output order). The model's tensors are stored
    under ``model.`` (returned without it); other prefixes (``optim.``, ``ema.``...) are not read.

    Raises:
        ValueError: not a resnetlab checkpoint, malformed metadata, or no ``model.`` tensors.
    """
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if RESNETLAB_META_KEY not in metadata:
            raise ValueError(f"{path}: not a resnetlab checkpoint (its safetensors metadata has no "
                             f"{RESNETLAB_META_KEY!r} entry; it has: {sorted(metadata) or 'none'})")
        try:
            meta = json.loads(metadata[RESNETLAB_META_KEY])
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: the {RESNETLAB_META_KEY!r} metadata is not valid JSON ({e})") from None
        state_dict = {k[len(MODEL_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(MODEL_PREFIX)}
    _check_meta(meta, path)
    if not state_dict:
        raise ValueError(f"{path}: a resnetlab checkpoint without model tensors (no key starts with {MODEL_PREFIX!r})")
    return state_dict, meta


def _check_meta(meta: Any, path: Path) -> None:
    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: resnetlab metadata {what}")

    if not isinstance(meta, dict):
        raise bad(f"must be a JSON object, got {type(meta).__name__}")
    if not isinstance(meta.get("arch"), str) or not meta["arch"]:
        raise bad(f"needs 'arch' (a registered model name), got {meta.get('arch')!r}")
    for key, low in (("num_classes", 0), ("in_chans", 1)):
        if key in meta and (not isinstance(meta[key], int) or meta[key] < low):
            raise bad(f"'{key}' must be an integer >= {low}, got {meta[key]!r}")
    if not isinstance(meta.get("model_overrides", {}), dict):
        raise bad(f"'model_overrides' must be an object, got {meta['model_overrides']!r}")
    classes = meta.get("classes")
    if classes is not None:
        if not isinstance(classes, list):
            raise bad(f"'classes' must be a list of names, got {type(classes).__name__}")
        if isinstance(meta.get("num_classes"), int) and meta["num_classes"] and len(classes) != meta["num_classes"]:
            raise bad(f"lists {len(classes)} classes for num_classes={meta['num_classes']}")


def convert_resnetlab(path: str | Path) -> ConvertedWeights:
    """A resnetlab checkpoint as :class:`ConvertedWeights` (arch and overrides from its metadata)."""
    state_dict, meta = read_resnetlab_checkpoint(path)
    bn_eps = meta.get("bn_eps")
    return ConvertedWeights(state_dict, "resnetlab", Path(path), arch=meta["arch"],
                            arch_kwargs=dict(meta.get("model_overrides", {})),
                            bn_eps=float(bn_eps) if bn_eps is not None else None, meta=meta)


# --- torchvision and timm --------------------------------------------------------------------------------------
def convert_torchvision_style(state_dict: dict[str, torch.Tensor], path: str | Path, fmt: str = "state-dict", *,
                              arch_name: str | None = None) -> ConvertedWeights:
    """torchvision and timm ResNet state dicts: their names already are resnetlab's, so nothing is renamed.

    ``fmt`` labels the origin (``"torchvision"``, ``"timm"`` or ``"state-dict"`` when unknown). ``arch_name`` is the
    torchvision / timm architecture name when known (timm's config.json ``architecture``); it is translated
    with :func:`arch_from_name` (timm's ``resnet101d`` is resnetlab's ``resnet101`` with a deep stem and
    avg-pool shortcuts). Keys outside resnetlab's layout (timm's SE or attention layers) stay as they are
    and are reported as ignored when loaded.
    """
    cw = ConvertedWeights(dict(state_dict), fmt, Path(path))
    if arch_name:
        found = arch_from_name(arch_name)
        if found:
            cw.arch, cw.arch_kwargs = found
        else:
            cw.notes.append(f"{fmt} architecture {arch_name!r} has no resnetlab equivalent; the architecture is "
                            "inferred from the tensors' shapes")
    return cw


# --- Hugging Face transformers ---------------------------------------------------------------------------------
_STAGE = r"encoder\.stages\.(\d+)\.layers\.(\d+)\."
_HF_RULES: list[tuple[re.Pattern, Any]] = [
    (re.compile(r"embedder\.embedder\.convolution\.(\w+)$"), lambda m: f"conv1.{m[1]}"),
    (re.compile(r"embedder\.embedder\.normalization\.(\w+)$"), lambda m: f"bn1.{m[1]}"),
    (re.compile(_STAGE + r"shortcut\.convolution\.(\w+)$"),
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.{m[3]}"),
    (re.compile(_STAGE + r"shortcut\.normalization\.(\w+)$"),
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1.{m[3]}"),
    (re.compile(_STAGE + r"layer\.(\d)\.convolution\.(\w+)$"),
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.{m[4]}"),
    (re.compile(_STAGE + r"layer\.(\d)\.normalization\.(\w+)$"),
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.{m[4]}"),
    (re.compile(r"classifier\.1\.(weight|bias)$"), lambda m: f"fc.{m[1]}"),
]


def hf_key_to_resnetlab(key: str) -> str | None:
    """resnetlab's name for a transformers ResNet key, or ``None`` for a key outside the ResNet layout.

    ``resnet.embedder.embedder.convolution.weight`` -> ``conv1.weight``;
    ``resnet.encoder.stages.S.layers.B.layer.K.convolution.weight`` -> ``layer{S+1}.B.conv{K+1}.weight``;
    ``...shortcut.convolution/normalization`` -> ``...downsample.0/1``; ``classifier.1`` -> ``fc``.
    ``ResNetModel`` and ``ResNetBackbone`` keys (no ``resnet.`` prefix) map the same way.
    """
    bare = key[len("resnet."):] if key.startswith("resnet.") else key
    for pattern, rename in _HF_RULES:
        m = pattern.fullmatch(bare)
        if m:
            return rename(m)
    return None


def is_hf_state_dict(state_dict: dict[str, Any]) -> bool:
    return any("embedder.embedder." in k for k in state_dict)


_HF_DEFAULTS = {"num_channels": 3, "embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048],
                "depths": [3, 4, 6, 3], "layer_type": "bottleneck", "hidden_act": "relu",
                "downsample_in_first_stage": False, "downsample_in_bottleneck": False}


def hf_config_to_kwargs(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ResNet kwargs, required kwargs)`` for a transformers ``ResNetConfig`` (config.json as a dict).

    ``hidden_sizes`` are stage *output* channels (x4 the bottleneck width); ``embedding_size`` is the stem
    width; ``downsample_in_first_stage`` gives stage 1 a stride of 2; ``downsample_in_bottleneck=True`` puts
    the stride on the first 1x1 conv (ResNet v1, resnetlab's ``stride_in_1x1``), the default on the 3x3 (v1.5).
    """
    if config.get("model_type", "resnet") != "resnet":
        raise ValueError(f"config.json is for model_type {config['model_type']!r}, not a transformers ResNet")
    cfg = {**_HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if cfg["hidden_act"] != "relu":
        raise ValueError(f"transformers ResNet with hidden_act={cfg['hidden_act']!r}: resnetlab's blocks use ReLU")
    block = cfg["layer_type"]
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"unknown transformers ResNet layer_type {block!r}")
    sizes, depths = list(cfg["hidden_sizes"]), list(cfg["depths"])
    if len(sizes) != len(depths):
        raise ValueError(f"config.json: {len(depths)} depths but {len(sizes)} hidden_sizes")
    if block == "bottleneck" and any(s % 4 for s in sizes):
        raise ValueError(f"config.json: bottleneck hidden_sizes must be multiples of 4, got {sizes}")
    widths = [s // 4 for s in sizes] if block == "bottleneck" else sizes
    kwargs = {"block": block, "layers": depths, "widths": widths, "stem": "imagenet",
              "stem_width": cfg["embedding_size"], "shortcut": "B", "groups": 1, "width_per_group": 64,
              "bias": False, "ndim": 2, "kernel_size": 3,
              "strides": [2 if cfg["downsample_in_first_stage"] else 1] + [2] * (len(depths) - 1)}
    required = {"stride_in_1x1": bool(cfg["downsample_in_bottleneck"])} if block == "bottleneck" else {}
    return kwargs, required


def convert_hf_transformers(state_dict: dict[str, torch.Tensor], path: str | Path,
                            config: dict[str, Any] | None = None) -> ConvertedWeights:
    """A transformers ResNet state dict (and its config.json, when there is one) in resnetlab's names.

    Without a config the architecture is inferred from the tensors' shapes, with transformers' defaults for
    what shapes cannot show (stride on the 3x3 conv, stage 1 unstrided).
    """
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        renamed[hf_key_to_resnetlab(key) or key] = value
    cw = ConvertedWeights(renamed, "hf-transformers", Path(path))
    if config is not None:
        kwargs, cw.required_kwargs = hf_config_to_kwargs(config)
        cw.arch, cw.arch_kwargs = match_arch(kwargs)
        cw.meta = dict(config)
        labels = config.get("id2label")
        if isinstance(labels, dict) and labels:
            cw.meta["classes"] = [labels[k] for k in sorted(labels, key=int)]
    else:
        cw.notes.append("no config.json beside the weights: architecture inferred from the tensors, stride "
                        "assumed on the 3x3 conv (transformers' default)")
        if "layer1.0.conv3.weight" in renamed:
            cw.required_kwargs = {"stride_in_1x1": False}
    return cw


# --- reading any file or folder --------------------------------------------------------------------------------
def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_weights(path: str | Path, entry: WeightsEntry | None = None) -> ConvertedWeights:
    """Read a weights file or model folder of any supported format into :class:`ConvertedWeights`.

    The format is told from the file, not trusted from its name alone: a ``.safetensors`` with resnetlab
    metadata is a resnetlab checkpoint; keys like ``embedder.embedder.*`` are a transformers ResNet; ``.h5``
    and ``.keras`` files are Keras; other state dicts are torchvision / timm style. A folder is a Hugging
    Face transformers folder (config.json with ``model_type: resnet``), a timm hub folder (config.json with
    ``architecture``), or any folder holding exactly one weights file. ``entry`` (from the weights table)
    supplies the architecture and preprocessing when the file itself does not.
    """
    path = Path(path)
    cw = _read_folder(path) if path.is_dir() else _read_file(path)
    if entry is not None:
        cw.entry = entry
        if cw.format == "state-dict" and entry.source in ("torchvision", "timm"):
            cw.format = entry.source
        if cw.arch is None:
            found = arch_from_name(entry.arch)
            if found:
                cw.arch, cw.arch_kwargs = found[0], {**found[1], **entry.model_overrides}
        if cw.bn_eps is None:
            cw.bn_eps = entry.bn_eps
    return cw


def _read_file(path: Path) -> ConvertedWeights:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    name = path.name.lower()
    if name.endswith(KERAS_SUFFIXES):
        from resnetlab.models.convert_keras import convert_keras

        return convert_keras(path)
    if name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
        if RESNETLAB_META_KEY in metadata:
            return convert_resnetlab(path)
    elif not name.endswith(TORCH_SUFFIXES + (".index.json",)):
        raise ValueError(f"{path}: unsupported file type; resnetlab reads .safetensors, "
                         f"{', '.join(TORCH_SUFFIXES)} (torch.save state dicts), .h5/.weights.h5/.keras (Keras), "
                         "or a Hugging Face / timm model folder")
    state_dict = load_tensor_file(path)
    config = _read_config(path.parent)
    if is_hf_state_dict(state_dict):
        return convert_hf_transformers(state_dict, path, config if config.get("model_type") == "resnet" else None)
    if config.get("architecture"):  # a file from a timm hub folder
        return convert_torchvision_style(state_dict, path, "timm", arch_name=config["architecture"])
    return convert_torchvision_style(state_dict, path)


_FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def _read_folder(folder: Path) -> ConvertedWeights:
    for name in ("best", "last"):  # a resnetlab run directory: its best checkpoint (else last), as evaluate reads it
        if (folder / "checkpoints" / f"{name}.safetensors").is_file():
            return _read_file(folder / "checkpoints" / f"{name}.safetensors")
    config = _read_config(folder)
    weights = next((folder / f for f in _FOLDER_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        files = [p for p in sorted(folder.iterdir())
                 if p.is_file() and p.name.lower().endswith((".safetensors",) + TORCH_SUFFIXES + KERAS_SUFFIXES)]
        if len(files) != 1:
            listing = ", ".join(p.name for p in sorted(folder.iterdir())[:12]) or "nothing"
            raise ValueError(f"{folder}: expected one weights file ({', '.join(_FOLDER_WEIGHTS)}, or a single "
                             f".safetensors/.pth/.h5 file), found {listing}")
        return _read_file(files[0])
    state_dict = load_tensor_file(weights)
    if config.get("model_type") == "resnet" or is_hf_state_dict(state_dict):
        cw = convert_hf_transformers(state_dict, folder, config if config.get("model_type") == "resnet" else None)
        cw.meta.update(hf_preprocessing(folder))
        return cw
    if config.get("model_type"):
        raise ValueError(f"{folder}: config.json describes a {config['model_type']!r} model, not a ResNet")
    if config.get("architecture"):  # timm hub folder: config.json = {architecture, num_classes, pretrained_cfg}
        cw = convert_torchvision_style(state_dict, folder, "timm", arch_name=config["architecture"])
        cw.meta = {"timm_config": config, **_timm_preprocessing(config.get("pretrained_cfg") or {})}
        labels = config.get("label_names")
        if isinstance(labels, list) and labels:
            cw.meta["classes"] = list(labels)
        return cw
    return convert_torchvision_style(state_dict, folder)


def _timm_preprocessing(pcfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("mean", "std", "input_size", "interpolation", "crop_pct"):
        if pcfg.get(key) is not None:
            out[key] = list(pcfg[key]) if isinstance(pcfg[key], (list, tuple)) else pcfg[key]
    if "input_size" in out and "crop_pct" in out:
        out["resize_size"] = int(out["input_size"][-1] / out["crop_pct"])
    return out
