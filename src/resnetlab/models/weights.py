"""Known pretrained weights, described as data, and where to find them on this machine.

resnetlab never downloads anything. A *source* names weights that someone put in one of the standard local
caches beforehand, or is a plain file or folder path:

=============================  ==========================================================================
``torchvision:resnet50``       ``$TORCH_HOME/hub/checkpoints/resnet50-11ad3fa6.pth`` (the default torchvision
                               weights, IMAGENET1K_V2 where torchvision has a V2, else V1; if only the V1 file
                               is there it is used). ``torchvision:resnet50.IMAGENET1K_V1`` picks one.
``timm:resnet50.a1_in1k``      the Hugging Face hub cache, ``models--timm--resnet50.a1_in1k/snapshots/*/``
                               (timm >= 0.9 downloads there), or timm's older release file in
                               ``$TORCH_HOME/hub/checkpoints``. ``timm:resnet50`` takes timm's default tag.
``hf:microsoft/resnet-50``     the Hugging Face hub cache, ``models--microsoft--resnet-50/snapshots/*/``
                               (config.json + model.safetensors or pytorch_model.bin).
``keras:resnet50``             ``$KERAS_HOME/models/resnet50_weights_tf_dim_ordering_tf_kernels.h5``
                               (``keras:resnet50_notop`` for the file without classifier).
``/path/to/file_or_folder``    any supported file (``.safetensors``, ``.pth``/``.pt``/``.bin``, ``.h5``,
                               ``.weights.h5``, ``.keras``) or a Hugging Face / timm model folder.
=============================  ==========================================================================

Cache folders follow each library's own rules: ``$TORCH_HOME`` (default ``$XDG_CACHE_HOME/torch``, i.e.
``~/.cache/torch``); ``$HF_HUB_CACHE``, else ``$HF_HOME/hub`` (default ``~/.cache/huggingface/hub``);
``$KERAS_HOME`` (default ``~/.keras``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keras applications' ResNets take caffe-style input: BGR, 0..255, minus the per-channel ImageNet mean, no
# scaling. resnetlab's Keras converter reverses conv1's input channels so the converted model takes RGB like
# every other model here; in (x_rgb01 - mean) / std form that preprocessing is:
KERAS_CAFFE_MEAN = (123.68 / 255, 116.779 / 255, 103.939 / 255)
KERAS_CAFFE_STD = (1 / 255, 1 / 255, 1 / 255)

SOURCES = ("torchvision", "timm", "hf", "keras")


@dataclass(frozen=True)
class WeightsEntry:
    """One set of published weights: what they are, how to feed them, and where they come from.

    ``file_name`` is the name the weights have in the torch hub / Keras cache (``None`` for weights that only
    live in a Hugging Face hub repository, ``hf_repo``). ``file_hash`` is ``"sha256:<hex prefix>"`` (torch hub's
    file naming convention) or ``"md5:<hex>"`` (Keras' published hashes), checked when the file is found in a
    cache. ``input_size`` is the evaluation crop ``(C, H, W)``; ``resize_size`` the shorter side the image is
    resized to before that centre crop. ``model_overrides`` are the ``create_model`` arguments the weights need
    besides ``arch`` (Keras' ResNet v1 puts the stride on the first 1x1 conv and has conv biases).
    ``bn_eps`` is the BatchNorm epsilon the weights were trained with when it is not torch's 1e-5.
    """

    source: str
    name: str
    arch: str
    num_classes: int
    url: str
    license: str
    file_name: str | None = None
    hf_repo: str | None = None
    file_hash: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: tuple[int, int, int] = (3, 224, 224)
    resize_size: int = 256
    interpolation: str = "bilinear"
    test_input_size: tuple[int, int, int] | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    bn_eps: float | None = None
    dataset: str = "imagenet-1k"
    metrics: dict[str, float] = field(default_factory=dict)
    recipe: str = ""
    default: bool = False
    notes: str = ""

    @property
    def key(self) -> str:
        """The source string that names exactly these weights, e.g. ``"torchvision:resnet50.IMAGENET1K_V2"``."""
        return f"{self.source}:{self.name}"

    @property
    def crop_pct(self) -> float:
        return self.input_size[-1] / self.resize_size

    def pretrained_cfg(self) -> dict[str, Any]:
        """The entry as a plain dict (what ``model_from_pretrained`` attaches as ``model.pretrained_cfg``)."""
        return {"source": self.key, "arch": self.arch, "num_classes": self.num_classes, "mean": list(self.mean),
                "std": list(self.std), "input_size": list(self.input_size), "resize_size": self.resize_size,
                "crop_pct": round(self.crop_pct, 4), "interpolation": self.interpolation, "dataset": self.dataset,
                "license": self.license, "url": self.url, "metrics": dict(self.metrics), "bn_eps": self.bn_eps}


# --- torchvision: file names and metrics from torchvision.models.ResNet*_Weights (checked by the tests) --------
_TV_URL = "https://download.pytorch.org/models/"
_TV_V1_RECIPE = "https://github.com/pytorch/vision/tree/main/references/classification#resnet"
_TV_V2_RECIPE = "https://github.com/pytorch/vision/issues/3995#new-recipe"
_TV = [  # arch, tag, file, top-1, top-5, recipe
    ("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth", 69.758, 89.078, _TV_V1_RECIPE),
    ("resnet34", "IMAGENET1K_V1", "resnet34-b627a593.pth", 73.314, 91.42, _TV_V1_RECIPE),
    ("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 80.858, 95.434,
     "https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621"),
    ("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth", 76.13, 92.862, _TV_V1_RECIPE),
    ("resnet101", "IMAGENET1K_V2", "resnet101-cd907fc2.pth", 81.886, 95.78, _TV_V2_RECIPE),
    ("resnet101", "IMAGENET1K_V1", "resnet101-63fe2227.pth", 77.374, 93.546, _TV_V1_RECIPE),
    ("resnet152", "IMAGENET1K_V2", "resnet152-f82ba261.pth", 82.284, 96.002, _TV_V2_RECIPE),
    ("resnet152", "IMAGENET1K_V1", "resnet152-394f9c45.pth", 78.312, 94.046, _TV_V1_RECIPE),
    ("resnext50_32x4d", "IMAGENET1K_V2", "resnext50_32x4d-1a0047aa.pth", 81.198, 95.34, _TV_V2_RECIPE),
    ("resnext50_32x4d", "IMAGENET1K_V1", "resnext50_32x4d-7cdf4587.pth", 77.618, 93.698,
     "https://github.com/pytorch/vision/tree/main/references/classification#resnext"),
    ("wide_resnet50_2", "IMAGENET1K_V2", "wide_resnet50_2-9ba9bcbe.pth", 81.602, 95.758,
     "https://github.com/pytorch/vision/issues/3995#new-recipe-with-fixres"),
    ("wide_resnet50_2", "IMAGENET1K_V1", "wide_resnet50_2-95faca4d.pth", 78.468, 94.086,
     "https://github.com/pytorch/vision/pull/912#issue-445437439"),
]

# --- timm: values from timm's pretrained configs (timm.models.get_pretrained_cfg; checked by the tests) --------
_TIMM_RSB = "https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-rsb-weights/"
_TIMM_V01 = "https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-weights/"
_TIMM = [  # name, legacy release file, crop_pct, interpolation, license, recipe
    ("resnet18.a1_in1k", _TIMM_RSB + "resnet18_a1_0-d63eafa0.pth", 0.95, "bicubic", "apache-2.0",
     "ResNet Strikes Back A1 recipe (Wightman et al. 2021)"),
    ("resnet18.tv_in1k", _TV_URL + "resnet18-f37072fd.pth", 0.875, "bilinear", "bsd-3-clause",
     "torchvision IMAGENET1K_V1 weights, re-hosted by timm"),
    ("resnet34.a1_in1k", _TIMM_RSB + "resnet34_a1_0-46f8f793.pth", 0.95, "bicubic", "apache-2.0",
     "ResNet Strikes Back A1 recipe"),
    ("resnet50.a1_in1k", _TIMM_RSB + "resnet50_a1_0-14fe96d1.pth", 0.95, "bicubic", "apache-2.0",
     "ResNet Strikes Back A1 recipe"),
    ("resnet50.tv_in1k", _TV_URL + "resnet50-0676ba61.pth", 0.875, "bilinear", "bsd-3-clause",
     "torchvision IMAGENET1K_V1 weights, re-hosted by timm"),
    ("resnet101.a1h_in1k", _TIMM_RSB + "resnet101_a1h-36d3f2aa.pth", 0.95, "bicubic", "apache-2.0",
     "ResNet Strikes Back A1 recipe, tuned"),
    ("resnet152.a1h_in1k", _TIMM_RSB + "resnet152_a1h-dc400468.pth", 0.95, "bicubic", "apache-2.0",
     "ResNet Strikes Back A1 recipe, tuned"),
    ("resnet18d.ra2_in1k", _TIMM_V01 + "resnet18d_ra2-48a79e06.pth", 0.875, "bicubic", "apache-2.0",
     "RandAugment recipe (timm)"),
    ("resnet50d.ra2_in1k", _TIMM_V01 + "resnet50d_ra2-464e36ba.pth", 0.875, "bicubic", "apache-2.0",
     "RandAugment recipe (timm)"),
    ("resnet50d.a1_in1k", _TIMM_RSB + "resnet50d_a1_0-e20cff14.pth", 0.95, "bicubic", "apache-2.0",
     "ResNet Strikes Back A1 recipe"),
    ("resnext50_32x4d.a1h_in1k", _TIMM_RSB + "resnext50_32x4d_a1h-0146ab0a.pth", 0.95, "bicubic", "apache-2.0",
     "ResNet Strikes Back A1 recipe, tuned"),
    ("wide_resnet50_2.racm_in1k", _TIMM_V01 + "wide_resnet50_racm-8234f177.pth", 0.875, "bicubic", "apache-2.0",
     "RandAugment + cosine recipe (timm)"),
]
# The first entry of each architecture is timm's default tag (what ``timm.create_model(arch)`` loads).
_TIMM_DEFAULT = {"resnet18.a1_in1k", "resnet34.a1_in1k", "resnet50.a1_in1k", "resnet101.a1h_in1k",
                 "resnet152.a1h_in1k", "resnet18d.ra2_in1k", "resnet50d.ra2_in1k", "resnext50_32x4d.a1h_in1k",
                 "wide_resnet50_2.racm_in1k"}

# --- Keras applications: file names and md5 hashes from keras/src/applications/resnet.py ----------------------
_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_KERAS = [  # arch, (md5 with classifier, md5 without), top-1, top-5 (keras.io/api/applications)
    ("resnet50", ("2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"), 74.9, 92.1),
    ("resnet101", ("f1aeb4b969a6efcfb50fad2f0c20cfc5", "88cf7a10940856eca736dc7b7e228a21"), 76.4, 92.8),
    ("resnet152", ("100835be76be38e30d865e96f2aaae62", "ee4c566cf9a93f14d82f913c2dc6dd0c"), 76.6, 93.1),
]
KERAS_BN_EPS = 1.001e-5

# --- Hugging Face transformers (microsoft/resnet-*): preprocessing from the repos' preprocessor_config.json -----
_HF = [("resnet18", "microsoft/resnet-18"), ("resnet34", "microsoft/resnet-34"), ("resnet50", "microsoft/resnet-50"),
       ("resnet101", "microsoft/resnet-101"), ("resnet152", "microsoft/resnet-152")]


def _build_table() -> list[WeightsEntry]:
    table = []
    for arch, tag, file_name, top1, top5, recipe in _TV:
        v2 = tag.endswith("V2")
        default = v2 or not any(a == arch and t.endswith("V2") for a, t, *_ in _TV)
        table.append(WeightsEntry(
            "torchvision", f"{arch}.{tag}", arch, 1000, _TV_URL + file_name, "bsd-3-clause (torchvision)",
            file_name=file_name, file_hash="sha256:" + file_name.rsplit("-", 1)[1].split(".")[0],
            resize_size=232 if v2 else 256, metrics={"top1": top1, "top5": top5}, recipe=recipe, default=default))
    for name, url, crop_pct, interpolation, license_, recipe in _TIMM:
        arch = name.split(".")[0]
        table.append(WeightsEntry(
            "timm", name, arch, 1000, f"https://huggingface.co/timm/{name}", license_,
            file_name=url.rsplit("/", 1)[1], hf_repo=f"timm/{name}", resize_size=int(224 / crop_pct),
            interpolation=interpolation, test_input_size=None if "tv_in1k" in name else (3, 288, 288),
            recipe=recipe, default=name in _TIMM_DEFAULT,
            notes=f"legacy release file: {url}"))
    for arch, (md5_top, md5_notop), top1, top5 in _KERAS:
        for top in (True, False):
            file_name = f"{arch}_weights_tf_dim_ordering_tf_kernels{'' if top else '_notop'}.h5"
            table.append(WeightsEntry(
                "keras", arch if top else f"{arch}_notop", arch, 1000 if top else 0, _KERAS_URL + file_name,
                "see keras.io/api/applications (weights converted from the Caffe ResNets of He et al. 2015)",
                file_name=file_name, file_hash="md5:" + (md5_top if top else md5_notop),
                mean=KERAS_CAFFE_MEAN, std=KERAS_CAFFE_STD, model_overrides={"stride_in_1x1": True, "bias": True},
                bn_eps=KERAS_BN_EPS, metrics={"top1": top1, "top5": top5},
                recipe="Caffe ResNet v1 of He et al. 2015, converted by Keras", default=True,
                notes="ResNet v1: stride on the first 1x1 conv, conv biases, BN eps 1.001e-5; Keras' own model "
                      "takes BGR, the converted one RGB"))
    for arch, repo in _HF:
        table.append(WeightsEntry(
            "hf", repo, arch, 1000, f"https://huggingface.co/{repo}", "apache-2.0", hf_repo=repo,
            interpolation="bicubic", default=True, notes="ResNet v1.5 (stride on the 3x3 conv)"))
    return table


KNOWN_WEIGHTS: list[WeightsEntry] = _build_table()


def list_weights(pattern: str | None = None) -> list[str]:
    """Source strings of the known weights, e.g. ``["torchvision:resnet50.IMAGENET1K_V2", ...]``.

    ``pattern`` is a substring filter (``"resnet50"``, ``"keras:"``).
    """
    return [e.key for e in KNOWN_WEIGHTS if not pattern or pattern in e.key]


def get_weights_entry(source: str) -> WeightsEntry | None:
    """The table entry an exact source string names (``"timm:resnet50.a1_in1k"``), or ``None``."""
    return next((e for e in KNOWN_WEIGHTS if e.key == source), None)


def entry_for_file(path: str | os.PathLike) -> WeightsEntry | None:
    """The entry whose published file name is ``path``'s name (``resnet50-11ad3fa6.pth``), or ``None``."""
    name = Path(path).name
    return next((e for e in KNOWN_WEIGHTS if e.file_name == name), None)


# --- local caches --------------------------------------------------------------------------------------------
def _xdg_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()


def torch_hub_checkpoints_dir() -> Path:
    """Where ``torch.hub`` keeps downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(os.environ.get("TORCH_HOME", _xdg_cache() / "torch")).expanduser() / "hub" / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub`` (``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # the name before huggingface_hub 0.15
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", _xdg_cache() / "huggingface")).expanduser() / "hub"


def keras_models_dir() -> Path:
    """Where ``keras.utils.get_file`` keeps application weights: ``$KERAS_HOME/models`` (``~/.keras/models``)."""
    return Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"


HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def _hf_repo_dir(repo: str) -> Path:
    return hf_hub_cache_dir() / f"models--{repo.replace('/', '--')}"


def find_hf_snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of Hugging Face repo ``repo`` that holds a weights file, or ``None``.

    Prefers the revision ``refs/main`` points to, then the most recently modified snapshot.
    """
    snapshots = _hf_repo_dir(repo) / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = _hf_repo_dir(repo) / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text().strip()
        candidates = [main] + [c for c in candidates if c != main]
    return next((c for c in candidates if any((c / f).exists() for f in HF_WEIGHT_FILES)), None)


def check_file_hash(path: str | os.PathLike, file_hash: str) -> None:
    """Raise ``ValueError`` unless the file's digest matches ``file_hash`` (``"sha256:<prefix>"``/``"md5:<hex>"``)."""
    algo, expected = file_hash.split(":", 1)
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    got = h.hexdigest()
    if not got.startswith(expected.lower()):
        raise ValueError(f"{path}: {algo} is {got[:len(expected)]}..., expected {expected} (a truncated download or "
                         f"a different file); fetch it again, or pass check_hash=False to use it anyway")


# --- resolve_source ----------------------------------------------------------------------------------------
def _candidates(source_kind: str, name: str) -> list[WeightsEntry]:
    """Entries a ``kind:name`` source may mean: the exact one, or every tag of an architecture, default first."""
    exact = [e for e in KNOWN_WEIGHTS if e.source == source_kind and e.name == name]
    if exact:
        return exact
    family = [e for e in KNOWN_WEIGHTS if e.source == source_kind and e.name.split(".")[0] == name]
    return sorted(family, key=lambda e: not e.default)


def _not_found(source: str, what: str, where: list[Path], url: str, also: str = "") -> FileNotFoundError:
    folders = " or ".join(str(p) for p in where)
    return FileNotFoundError(f"{source}: weights not found (resnetlab never downloads). Put {what} in {folders}"
                             f"{also}; get it on a machine with network access from {url}, or pass the file's "
                             f"path as the source")


def resolve_source(source: str | os.PathLike, *, check_hash: bool = True) -> tuple[Path, WeightsEntry | None]:
    """Find the local file or folder a weights source names, without any network access.

    Args:
        source: ``"torchvision:<arch>[.<TAG>]"``, ``"timm:<arch>[.<tag>]"``, ``"hf:<org>/<name>"``,
            ``"keras:<arch>[_notop]"`` (see the module docstring for the cache folders each looks in), or a
            path to a weights file or model folder.
        check_hash: verify a cached torchvision / Keras file against its published hash (a sha256 prefix,
            or md5); costs one read of the file. Plain paths are never hash-checked.

    Returns:
        ``(path, entry)``: the file or folder, and the :class:`WeightsEntry` describing it (``None`` for an
        unknown file, a timm tag or Hugging Face repo outside the table).

    Raises:
        FileNotFoundError: one line naming the file expected, the folder(s) to put it in and its URL.
        ValueError: a name the table does not know (torchvision, Keras), or a hash mismatch.
    """
    text = os.fspath(source)
    kind, sep, name = text.partition(":")
    if not sep or kind not in SOURCES:
        path = Path(text).expanduser()
        if not path.exists():
            hint = (f" (a '{kind}:' prefix is not one of {', '.join(s + ':' for s in SOURCES)})"
                    if sep and not path.parent.exists() else "")
            raise FileNotFoundError(f"{text}: no such file or folder{hint}")
        return path, entry_for_file(path) if path.is_file() else None
    if not name:
        raise ValueError(f"{text!r}: missing a name after '{kind}:', e.g. {kind}:{_EXAMPLES[kind]}")

    if kind == "hf":
        entry = get_weights_entry(text) or (get_weights_entry(f"timm:{name[5:]}") if name.startswith("timm/") else None)
        snapshot = find_hf_snapshot(name)
        if snapshot is None:
            raise _not_found(text, f"the files of {name} (config.json and model.safetensors or pytorch_model.bin)",
                             [_hf_repo_dir(name) / "snapshots" / "<any-name>"], f"https://huggingface.co/{name}",
                             " (e.g. copy the cache folder made by `huggingface-cli download "
                             f"{name}` elsewhere)")
        return snapshot, entry

    candidates = _candidates(kind, name)
    if kind == "timm":
        repos = [e.hf_repo for e in candidates] or [f"timm/{name}"]
        for repo in repos:
            snapshot = find_hf_snapshot(repo)
            if snapshot is not None:
                return snapshot, get_weights_entry(f"timm:{repo.split('/', 1)[1]}")
        for e in candidates:  # timm < 0.9 kept its release files in the torch hub cache
            path = torch_hub_checkpoints_dir() / e.file_name
            if path.is_file():
                return path, e
        repo = repos[0]
        legacy = f" (or {candidates[0].file_name} in {torch_hub_checkpoints_dir()})" if candidates else ""
        raise _not_found(text, f"the files of {repo} (model.safetensors, config.json)",
                         [_hf_repo_dir(repo) / "snapshots" / "<any-name>"], f"https://huggingface.co/{repo}", legacy)

    if not candidates:
        known = sorted({e.name.split(".")[0] if kind == "torchvision" else e.name
                        for e in KNOWN_WEIGHTS if e.source == kind})
        raise ValueError(f"unknown {kind} weights {name!r}; known: {', '.join(known)}")
    folder = torch_hub_checkpoints_dir() if kind == "torchvision" else keras_models_dir()
    folders = [folder] + ([Path("/tmp/.keras/models")] if kind == "keras" else [])  # Keras' fallback
    for e in candidates:
        for d in folders:
            path = d / e.file_name
            if path.is_file():
                if check_hash and e.file_hash:
                    check_file_hash(path, e.file_hash)
                return path, e
    first = candidates[0]
    others = [f"{e.file_name} ({e.name})" for e in candidates[1:]]
    also = f" (or {', '.join(others)})" if others else ""
    raise _not_found(text, f"{first.file_name} ({first.name})", [folder], first.url, also)


_EXAMPLES = {"torchvision": "resnet50", "timm": "resnet50.a1_in1k", "hf": "microsoft/resnet-50", "keras": "resnet50"}


def hf_preprocessing(folder: Path) -> dict[str, Any]:
    """Mean / std / resize / interpolation from a Hugging Face folder's ``preprocessor_config.json`` (or ``{}``)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    out: dict[str, Any] = {}
    if "image_mean" in cfg and "image_std" in cfg:
        out["mean"], out["std"] = list(cfg["image_mean"]), list(cfg["image_std"])
    size = cfg.get("size")
    if isinstance(size, dict):
        size = size.get("shortest_edge") or size.get("height")
    if isinstance(size, int):
        out["input_size"] = [3, size, size]
        if cfg.get("crop_pct"):
            out["crop_pct"] = cfg["crop_pct"]
            out["resize_size"] = int(size / cfg["crop_pct"])
    resample = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}.get(cfg.get("resample"))
    if resample:
        out["interpolation"] = resample
    return out
