"""Keras applications ResNet50 / ResNet101 / ResNet152 weights -> resnetlab.

Keras' ResNet (``keras.applications.resnet``) is ResNet v1 as in He et al. (2015): the stride of each stage
sits on the bottleneck's first 1x1 conv, every conv has a bias, BatchNorm uses ``epsilon=1.001e-5``. resnetlab
builds the same network with ``create_model("resnet50", stride_in_1x1=True, bias=True)`` and BN eps set to
1.001e-5 (``load_pretrained`` does that). Keras' stem, ``ZeroPadding2D(3)`` + 7x7/2 valid conv + ReLU +
``ZeroPadding2D(1)`` + 3x3/2 valid max-pool, equals resnetlab's padded conv and max-pool: zero padding before
the max-pool acts like -inf padding because it follows a ReLU (every window also holds a real value).

Layer names (``conv{S}_block{B}_{i}_conv`` / ``_bn``; ``_0_`` is the projection shortcut; ``predictions`` the
classifier) map to ``layer{S-1}.{B-1}.conv{i}`` / ``bn{i}`` / ``downsample.0/1`` and ``fc``. Kernels go
from Keras' HWIO to torch's OIHW; the Dense kernel is transposed.

Files read (all with h5py, which never runs code):

* ``.h5`` of Keras 2 and the downloadable application weights (``resnet50_weights_tf_dim_ordering_tf_kernels.h5``),
  and Keras 3's ``model.save("x.h5")``: named layers (``layer_names`` / ``weight_names`` attributes).
* Keras 3 ``.weights.h5`` and ``.keras``: layers are stored under class-based names (``conv2d_7``,
  ``batch_normalization_7``) in the order of ``model.layers``, with no Keras layer names. The converter
  recovers the names from that order and the kernels' shapes: for the first block of a stage Keras lists
  ``1_conv, 2_conv, 0_conv, 3_conv`` (and the BNs likewise). The shortcut and the last conv of
  ``conv2_block1`` have the same shape, so this relies on Keras' layer order; the parity test checks it.

Keras' ImageNet weights take caffe-style BGR input. By default the converter reverses conv1's input channels
so the converted model takes RGB, like every other resnetlab model (normalise with
``weights.KERAS_CAFFE_MEAN`` / ``KERAS_CAFFE_STD``); ``rgb_input=False`` keeps BGR.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnetlab.models.converted import ConvertedWeights, infer_resnet_kwargs, match_arch
from resnetlab.models.weights import KERAS_BN_EPS, KERAS_CAFFE_MEAN, KERAS_CAFFE_STD

# Limits on what a file may make this reader allocate. Real ResNet-50/101/152 weights are 100-240 MB in fp32.
MAX_KERAS_BYTES = 2 << 30  # a .keras archive's weights member, and all arrays an HDF5 file declares together
# A compressed .keras member larger than this must not inflate more than MAX_ZIP_RATIO-fold: float weights hardly
# compress (about 1.1x), while deflate turns 1 MB into up to about 1 GB of zeros (a zip bomb).
_RATIO_CHECK_BYTES = 64 << 20
MAX_ZIP_RATIO = 100
_READ_CHUNK = 1 << 20

_CONV_VARS = ("kernel", "bias")
_BN_VARS = ("gamma", "beta", "moving_mean", "moving_variance")
_BN_TO_TORCH = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _import_h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("pip install h5py to read Keras .h5 files") from None
    return h5py


def read_zip_member(path: Path, z: zipfile.ZipFile, name: str, limit: int | None = None) -> bytes:
    """The bytes of archive member ``name``, refused before reading when its header declares more than ``limit``
    (default ``MAX_KERAS_BYTES``) bytes or a zip-bomb ratio, and read in chunks that stop at the declared size (a
    lying header is refused)."""
    limit = MAX_KERAS_BYTES if limit is None else limit
    info = z.getinfo(name)
    if info.file_size > limit:
        raise ValueError(f"{path}: archive member {name} declares {info.file_size:,} bytes, more than {limit:,}; "
                         "not a ResNet's weights")
    if info.file_size > _RATIO_CHECK_BYTES and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
        raise ValueError(f"{path}: archive member {name} inflates {info.compress_size:,} bytes to {info.file_size:,} "
                         f"(more than {MAX_ZIP_RATIO}x): a zip bomb, not weights")
    parts, total = [], 0
    try:
        with z.open(info) as f:
            while chunk := f.read(_READ_CHUNK):
                total += len(chunk)
                if total > info.file_size:  # zipfile stops at the declared size itself; kept in case it does not
                    raise ValueError(f"{path}: archive member {name} holds more than the {info.file_size:,} bytes its "
                                     "header declares")
                parts.append(chunk)
    except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as e:  # bad CRC, cut, unknown method
        raise ValueError(f"{path}: corrupt archive member {name} ({' '.join(str(e).split())[:120]})") from None
    return b"".join(parts)


def check_h5_file(f, path: Path, limit: int | None = None) -> None:
    """Refuse an HDF5 file that could make reading it touch other files or allocate without bound.

    Every link must be a hard link (an external link reads another file, a soft link can point anywhere in this one
    and form a cycle), every group must be reachable once only (no hard-link cycles), no dataset may keep its data
    outside the file (virtual datasets, external storage), and the arrays together may declare at most ``limit``
    (default ``MAX_KERAS_BYTES``) bytes. Keras never writes any of these. Raises ``ValueError`` naming the file and
    the link.
    """
    limit = MAX_KERAS_BYTES if limit is None else limit
    h5py = _import_h5py()
    seen, declared, todo = set(), 0, [("/", f)]
    while todo:
        where, group = todo.pop()
        if group.id in seen:
            raise ValueError(f"{path}: HDF5 group {where} is linked from more than one place (a cycle?); not a Keras "
                             "weights file")
        seen.add(group.id)
        for key in group:
            name = f"{where.rstrip('/')}/{key}"
            link = group.get(key, getlink=True)
            if not isinstance(link, h5py.HardLink):
                kind = type(link).__name__
                to = f" to {link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else (
                    f" to {link.path}" if isinstance(link, h5py.SoftLink) else "")
                raise ValueError(f"{path}: HDF5 {kind} {name}{to} refused: resnetlab reads only data stored in the "
                                 "file itself")
            obj = group[key]
            if isinstance(obj, h5py.Group):
                todo.append((name, obj))
            elif isinstance(obj, h5py.Dataset):
                if obj.is_virtual or obj.id.get_create_plist().get_external_count():
                    raise ValueError(f"{path}: HDF5 dataset {name} keeps its data in other files; refused")
                declared += int(obj.size or 0) * obj.dtype.itemsize
                if declared > limit:
                    raise ValueError(f"{path}: HDF5 arrays declare more than {limit:,} bytes (at {name}); not a "
                                     "ResNet's weights")


def _decode(names) -> list[str]:
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]


def _var_name(weight_name: str) -> str:
    """``"conv1_conv/kernel:0"`` -> ``"kernel"``."""
    return weight_name.split("/")[-1].split(":")[0]


def read_named_h5(group) -> dict[str, dict[str, np.ndarray]]:
    """``{layer name: {variable: array}}`` from a legacy (Keras 2 / ``model.save(".h5")``) weights group."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    for layer in _decode(group.attrs["layer_names"]):
        weight_names = _decode(group[layer].attrs.get("weight_names", []))
        if weight_names:
            layers[layer] = {_var_name(w): np.asarray(group[layer][w]) for w in weight_names}
    return layers


def _numbered(group, prefix: str) -> list[str]:
    """Children ``prefix``, ``prefix_1``, ``prefix_2``... of an h5 group, in numeric order."""
    found = [k for k in group.keys() if re.fullmatch(rf"{prefix}(_\d+)?", k)]
    return sorted(found, key=lambda k: int(k.rsplit("_", 1)[1]) if k != prefix else 0)


def _vars(group, name: str, var_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    v = group[name]["vars"]
    arrays = [np.asarray(v[k]) for k in sorted(v.keys(), key=int)]
    if len(arrays) != len(var_names):
        raise ValueError(f"Keras 3 weights: layer {name} has {len(arrays)} variables, expected {len(var_names)} "
                         f"({', '.join(var_names)})")
    return dict(zip(var_names, arrays))


def _find_layers_group(group):
    """The group whose children are the conv layers (``layers/`` or nested ``layers/<model>/layers/``)."""
    queue = [group]
    while queue:
        g = queue.pop(0)
        if "conv2d" in g:
            return g
        queue.extend(g[k] for k in g.keys() if hasattr(g[k], "keys"))
    raise ValueError("Keras 3 weights file without Conv2D layers: not a Keras ResNet")


def read_keras3_weights(root) -> dict[str, dict[str, np.ndarray]]:
    """``{keras layer name: {variable: array}}`` recovered from a Keras 3 ``.weights.h5`` root group.

    Keras 3 stores layers as ``layers/conv2d_K/vars/0..`` in the order of ``model.layers``; the names of
    the application model (``conv2_block1_1_conv``...) are rebuilt from that order and the kernel shapes.
    """
    g = _find_layers_group(root)
    convs = [_vars(g, n, _CONV_VARS) for n in _numbered(g, "conv2d")]
    bns = [_vars(g, n, _BN_VARS) for n in _numbered(g, "batch_normalization")]
    dense = [_vars(g, n, _CONV_VARS) for n in _numbered(g, "dense")]
    if len(bns) != len(convs):
        raise ValueError(f"Keras 3 weights: {len(convs)} Conv2D but {len(bns)} BatchNormalization layers; not a "
                         "Keras applications ResNet v1 (ResNetV2 and other models are not supported)")
    names = ["conv1"]
    i, stage, block = 1, 1, 0
    while i < len(convs):
        k1 = convs[i]["kernel"].shape  # the block's first 1x1: (1, 1, C_in, filters)
        if len(k1) != 4 or k1[:2] != (1, 1):
            raise ValueError(f"Keras 3 weights: expected a block's first 1x1 conv at conv2d #{i}, found a kernel of "
                             f"shape {k1}; this reader knows the layer order of keras.applications ResNet50/101/152")
        first = k1[2] != 4 * k1[3]  # channels change: a stage's first block, with a projection shortcut
        order = ("1", "2", "0", "3") if first else ("1", "2", "3")
        if i + len(order) > len(convs) or (not first and stage == 1):
            raise ValueError(f"Keras 3 weights: {len(convs)} Conv2D layers do not form whole bottleneck blocks")
        if first:
            stage, block = stage + 1, 1
            shortcut = convs[i + 2]["kernel"].shape
            if shortcut != (1, 1, k1[2], 4 * k1[3]):
                raise ValueError(f"Keras 3 weights: expected the shortcut of conv{stage}_block1 at conv2d #{i + 2}, "
                                 f"found a kernel of shape {shortcut}")
        else:
            block += 1
        names += [f"conv{stage}_block{block}_{j}" for j in order]
        i += len(order)
    if len(names) != len(convs):
        raise ValueError(f"Keras 3 weights: {len(convs)} Conv2D layers do not form whole bottleneck blocks")
    layers = {f"{n}_conv": c for n, c in zip(names, convs)}
    layers.update({f"{n}_bn": b for n, b in zip(names, bns)})
    if len(dense) > 1:
        raise ValueError(f"Keras 3 weights: {len(dense)} Dense layers; expected at most one classifier")
    if dense:
        layers["predictions"] = dense[0]
    return layers


_BLOCK_LAYER = re.compile(r"conv(\d+)_block(\d+)_(\d)_(conv|bn)")


def keras_name_to_resnetlab(layer: str) -> str | None:
    """``conv1_conv`` -> ``conv1``, ``conv1_bn`` -> ``bn1``, ``conv3_block2_1_conv`` -> ``layer2.1.conv1``,
    ``conv3_block1_0_bn`` -> ``layer2.0.downsample.1``, ``predictions`` -> ``fc``; ``None`` for other layers."""
    if layer in ("conv1_conv", "conv1_bn", "predictions"):
        return {"conv1_conv": "conv1", "conv1_bn": "bn1", "predictions": "fc"}[layer]
    m = _BLOCK_LAYER.fullmatch(layer)
    if not m:
        return None
    stage, block, i, kind = int(m[1]) - 1, int(m[2]) - 1, int(m[3]), m[4]
    if i == 0:
        return f"layer{stage}.{block}.downsample.{0 if kind == 'conv' else 1}"
    return f"layer{stage}.{block}.{kind}{i}"


def keras_layers_to_state_dict(layers: dict[str, dict[str, np.ndarray]], *,
                               rgb_input: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename and transpose Keras layer variables into a resnetlab state dict; returns it and notes."""
    if any(n.endswith("_preact_bn") or n == "post_bn" for n in layers):
        raise ValueError("Keras ResNetV2 (pre-activation) weights are not supported: its layout (stride in the last "
                         "block of a stage, max-pool shortcuts) has no resnetlab equivalent")
    if "bn_conv1" in layers or any(n.startswith("res2a_") for n in layers):
        raise ValueError("Keras ResNet50 weights of keras <= 2.2.4 (layers 'res2a_branch2a'..., BN eps 1e-3) are not "
                         "supported; use the keras-applications file resnet50_weights_tf_dim_ordering_tf_kernels.h5 "
                         "from https://storage.googleapis.com/tensorflow/keras-applications/resnet/")
    state_dict: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for layer, variables in layers.items():
        target = keras_name_to_resnetlab(layer)
        if target is None:
            for var, array in variables.items():
                state_dict[f"keras:{layer}/{var}"] = torch.from_numpy(np.array(array))
            continue
        for var, array in variables.items():
            t = torch.from_numpy(np.array(array, dtype=np.float32))
            if var == "kernel":
                t = t.permute(3, 2, 0, 1) if t.dim() == 4 else t.t()  # HWIO -> OIHW; Dense (in, out) -> (out, in)
                state_dict[f"{target}.weight"] = t.contiguous()
            elif var in _BN_TO_TORCH:
                state_dict[f"{target}.{_BN_TO_TORCH[var]}"] = t
            elif var == "bias":
                state_dict[f"{target}.bias"] = t
            else:
                state_dict[f"keras:{layer}/{var}"] = t
    w = state_dict.get("conv1.weight")
    if rgb_input and w is not None and w.shape[1] == 3:
        state_dict["conv1.weight"] = w.flip(1).contiguous()
        notes.append("conv1's input channels reversed: the model takes RGB (Keras' ResNets take BGR, caffe-style: "
                     "normalise with weights.KERAS_CAFFE_MEAN / KERAS_CAFFE_STD)")
    return state_dict, notes


def convert_keras(path: str | Path, *, rgb_input: bool = True) -> ConvertedWeights:
    """Read a Keras applications ResNet50/101/152 weights file (``.h5``, ``.weights.h5``, ``.keras``).

    Returns the weights in resnetlab's names with ``required_kwargs = {stride_in_1x1: True, bias: True}`` and
    ``bn_eps = 1.001e-5``; ``rgb_input`` reverses conv1's input channels (BGR -> RGB, see the module docstring).
    The classifier is the ``predictions`` Dense layer: resnetlab's model outputs its logits, Keras' applies a
    softmax on top (``classifier_activation``).
    """
    h5py = _import_h5py()
    path = Path(path)
    if path.suffix == ".keras":
        try:
            with zipfile.ZipFile(path) as z:
                if "model.weights.h5" not in z.namelist():
                    raise ValueError(f"{path}: a .keras archive without model.weights.h5 (has {z.namelist()[:8]})")
                data = io.BytesIO(read_zip_member(path, z, "model.weights.h5"))
        except zipfile.BadZipFile as e:
            raise ValueError(f"{path}: not a .keras (zip) archive ({e})") from None
        with h5py.File(data, "r") as f:
            check_h5_file(f, path)
            layers = read_keras3_weights(f)
    else:
        with h5py.File(path, "r") as f:
            check_h5_file(f, path)
            group = f["model_weights"] if "model_weights" in f else f
            if "layer_names" in group.attrs:
                layers = read_named_h5(group)
            elif "layers" in f:
                layers = read_keras3_weights(f)
            else:
                raise ValueError(f"{path}: an HDF5 file that is neither Keras 2 weights (no 'layer_names') nor Keras 3 "
                                 f"weights (no 'layers' group); top-level keys: {list(f.keys())[:8]}")
    state_dict, notes = keras_layers_to_state_dict(layers, rgb_input=rgb_input)
    required: dict[str, Any] = {"stride_in_1x1": True, "bias": True}
    cw = ConvertedWeights(state_dict, "keras", path, required_kwargs=required, bn_eps=KERAS_BN_EPS, notes=notes)
    w = state_dict.get("conv1.weight")
    if w is not None and w.shape[1] == 3:  # keras.applications.resnet.preprocess_input: caffe mode
        cw.meta.update(mean=list(KERAS_CAFFE_MEAN) if rgb_input else list(KERAS_CAFFE_MEAN[::-1]),
                       std=list(KERAS_CAFFE_STD))
    try:
        cw.arch, cw.arch_kwargs = match_arch({**infer_resnet_kwargs(state_dict), **required})
    except ValueError:
        cw.notes.append("could not infer the architecture from the Keras layers; pass arch=")
    return cw
