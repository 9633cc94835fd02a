"""Grad-CAM and input saliency for every resnetlab model, and the pictures that show them.

Grad-CAM (Selvaraju et al. 2017) weighs each channel of the last stage's output by the mean gradient of the
class score over that channel, sums, and keeps the positive part: where in the input the evidence for the
class sits, at the last stage's resolution (7x7 for a 224-pixel ResNet-50, 2x2 for a 16-pixel CIFAR net,
the full 40x101 grid for res15, which never downsamples). It needs no hooks here: every model splits into
``forward_features`` (the last stage's output) and ``forward_head`` (pooling and classifier), the split the
fine-tuning surface already gives (:class:`~resnetlab.models.resnet.ClassifierBase`). So it works alike for
2-D ResNets, 1-D ResNets over feature sequences (the map is over time only) and the keyword-spotting nets.

Saliency is the absolute gradient of the class score with respect to the model input (Simonyan et al. 2014):
for audio, with respect to every (band, frame) cell of the spectrogram the network reads, at full resolution.

Gradients come from ``torch.autograd.grad`` on the inputs and features only: nothing accumulates in the
parameters' ``.grad``, and the model stays in eval mode, so it is safe on a model that is being served.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure

CAM_CMAP = "jet"
SALIENCY_CMAP = "magma"
SPEC_CMAP = "viridis"


@dataclass
class Explanation:
    """Grad-CAM and saliency of a batch, for the class in ``target`` (the predicted one unless given).

    ``cam``: ``(N, H, W)`` for 2-D inputs, ``(N, T)`` for 1-D inputs ``(N, C, T)``; upsampled to the input's
    spatial size, each map scaled to [0, 1]. ``saliency``: ``(N, H, W)`` (max over input channels) for 2-D
    inputs, ``(N, C, T)`` for 1-D inputs (for audio, C is the feature bands), scaled to [0, 1].
    ``inputs``: the float model input the maps belong to.
    """

    cam: np.ndarray
    saliency: np.ndarray
    probs: np.ndarray  # (N, num_classes)
    target: np.ndarray  # (N,) the explained class
    inputs: np.ndarray


def explain_batch(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor | None = None) -> Explanation:
    """Grad-CAM over the last stage's output and input saliency, for float model input ``inputs``.

    ``model`` is any resnetlab model (``forward_features`` + ``forward_head``), in eval mode; ``target``
    ``(N,)`` class indices, default the predicted classes.
    """
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(f"Grad-CAM needs a resnetlab model (forward_features / forward_head), got "
                        f"{type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = inputs.detach().float().requires_grad_(True)
            feats = model.forward_features(x)
            logits = model.forward_head(feats).float()
            if target is None:
                target = logits.argmax(1)
            target = torch.as_tensor(target, device=logits.device).long().view(-1)
            score = logits.gather(1, target[:, None]).sum()  # examples are independent in eval mode
            g_feats, g_x = torch.autograd.grad(score, [feats, x])
    finally:
        model.train(was_training)
    spatial = tuple(range(2, feats.dim()))
    weights = g_feats.mean(dim=spatial, keepdim=True)
    cam = F.relu((weights * feats).sum(1, keepdim=True)).detach()  # (N, 1, *spatial)
    mode = "bilinear" if cam.dim() == 4 else "linear"
    cam = F.interpolate(cam.float(), size=x.shape[2:], mode=mode, align_corners=False)[:, 0]
    sal = g_x.abs().amax(1) if x.dim() == 4 else g_x.abs()
    return Explanation(_unit(cam), _unit(sal), logits.detach().softmax(1).cpu().numpy(),
                       target.cpu().numpy(), x.detach().cpu().numpy())


def _unit(maps: torch.Tensor) -> np.ndarray:
    """Scale each map of a batch to [0, 1] by its own maximum (an all-zero map stays zero)."""
    flat = maps.detach().float().reshape(maps.shape[0], -1)
    top = flat.amax(1).clamp_min(1e-12).view(-1, *([1] * (maps.dim() - 1)))
    return (maps.detach().float() / top).clamp(0, 1).cpu().numpy()


def explain_raw(model: torch.nn.Module, pipeline, x: torch.Tensor, target=None) -> Explanation:
    """:func:`explain_batch` on raw decoded input: uint8 images ``(N, C, H, W)`` or int16 waves ``(N, T)``
    (the cache format), put through ``pipeline``'s eval-time preprocessing on the model's device."""
    device = next(model.parameters()).device
    with torch.no_grad():
        inputs, _ = pipeline(torch.as_tensor(x).to(device), None, train=False)
    return explain_batch(model, inputs, target)


# --- pictures ------------------------------------------------------------------------------------------------


def _colorize(values: np.ndarray, cmap: str) -> np.ndarray:
    """``(H, W)`` in [0, 1] -> uint8 RGB ``(H, W, 3)``."""
    return (colormaps[cmap](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def _resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _display_scale(h: int, w: int, min_side: int) -> int:
    return max(1, math.ceil(min_side / max(1, min(h, w))))


def image_overlay(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45, min_side: int = 224) -> np.ndarray:
    """A uint8 image ``(C, H, W)`` (C = 1 or 3) with its Grad-CAM ``(H, W)`` blended on top, as uint8 RGB
    ``(H', W', 3)``; small images are enlarged by a whole factor (pixels stay square) to ``min_side``."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.ndim == 2 or img.shape[2] == 1:
        img = np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)
    k = _display_scale(img.shape[0], img.shape[1], min_side)
    big = np.repeat(np.repeat(img, k, axis=0), k, axis=1).astype(np.float32)
    heat = _colorize(_resize(cam, big.shape[:2]), CAM_CMAP).astype(np.float32)
    return np.clip((1 - alpha) * big + alpha * heat, 0, 255).astype(np.uint8)


def _spectrogram_rgb(feats: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(feats, [1, 99.5]) if feats.size else (0.0, 1.0)
    return _colorize((feats - lo) / max(hi - lo, 1e-6), SPEC_CMAP)


def spectrogram_overlay(feats: np.ndarray, cam: np.ndarray, saliency: np.ndarray | None = None, *,
                        alpha: float = 0.5, min_side: int = 160) -> np.ndarray:
    """Model-input features ``(F, T)`` with Grad-CAM blended on top (``cam`` ``(F, T)``, or ``(T,)`` for 1-D
    nets: a band over time), and below it the saliency ``(F, T)`` if given. Low bands at the bottom.
    Returns uint8 RGB."""
    feats = np.asarray(feats, dtype=np.float32)
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim == 1:
        cam = np.broadcast_to(cam[None, :], feats.shape)
    k = _display_scale(*feats.shape, min_side)
    size = (feats.shape[0] * k, feats.shape[1] * k)
    spec = np.repeat(np.repeat(_spectrogram_rgb(feats), k, axis=0), k, axis=1).astype(np.float32)
    heat = _colorize(_resize(cam, size), CAM_CMAP).astype(np.float32)
    panels = [np.clip((1 - alpha) * spec + alpha * heat, 0, 255).astype(np.uint8)]
    if saliency is not None:
        sal = np.asarray(saliency, dtype=np.float32)
        sal = np.sqrt(sal)  # a gamma, so the weaker cells show too
        panels.append(np.full((max(2, k), size[1], 3), 255, np.uint8))
        panels.append(np.repeat(np.repeat(_colorize(sal, SALIENCY_CMAP), k, axis=0), k, axis=1))
    return np.concatenate([p[::-1] if p.shape[0] > k else p for p in panels], axis=0)


def png_bytes(rgb: np.ndarray) -> bytes:
    """uint8 RGB ``(H, W, 3)`` as PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _features_2d(inputs: np.ndarray) -> np.ndarray:
    """One audio example's model input as ``(F, T)``: ``(1, F, T)`` for 2-D nets, ``(F, T)`` for 1-D nets."""
    return inputs[0] if inputs.ndim == 3 else inputs


def heatmap_image(raw: np.ndarray, explanation: Explanation, index: int = 0, modality: str = "image") -> np.ndarray:
    """The picture of one example: the image with its Grad-CAM, or the spectrogram with Grad-CAM and
    saliency. ``raw`` is that example's decoded input (uint8 ``(C, H, W)`` for images; unused for audio)."""
    if modality == "image":
        return image_overlay(raw, explanation.cam[index])
    return spectrogram_overlay(_features_2d(explanation.inputs[index]), explanation.cam[index],
                               _features_2d(explanation.saliency[index]))


def _label(classes: list[str] | None, i: int) -> str:
    return classes[i] if classes and 0 <= i < len(classes) else str(i)


def overlay_examples(model: torch.nn.Module, pipeline, x, labels, classes: list[str] | None, out_png, *,
                     max_items: int = 8) -> Path:
    """A figure of Grad-CAM for up to ``max_items`` examples, for the training report.

    Args:
        model: the trained resnetlab model (eval mode is set and restored).
        pipeline: its pipeline (eval-time preprocessing).
        x: decoded examples as stored in the cache: uint8 images ``(N, C, H, W)`` or int16 waves ``(N, T)``
            (numpy or tensor; e.g. a few validation rows).
        labels: their true classes ``(N,)`` (or ``None``).
        classes: class names.
        out_png: where to write the figure.

    Each panel shows the input with the map for the predicted class, titled ``true -> predicted (prob)``;
    audio panels show the network's input features with Grad-CAM above the saliency. Returns ``out_png``.
    """
    x = torch.as_tensor(np.asarray(x[:max_items]))
    labels = None if labels is None else np.asarray(labels)[:max_items]
    fig_rows = []
    if len(x):
        exp = explain_raw(model, pipeline, x)
        for i in range(len(x)):
            modality = "image" if x.dim() == 4 else "audio"
            pic = heatmap_image(x[i].numpy(), exp, i, modality)
            pred = int(exp.target[i])
            title = f"{_label(classes, pred)} ({exp.probs[i, pred]:.2f})"
            if labels is not None:
                mark = "" if int(labels[i]) == pred else "  ✗"
                title = f"{_label(classes, int(labels[i]))} -> {title}{mark}"
            fig_rows.append((pic, title))
    return _grid(fig_rows, Path(out_png), "Grad-CAM: true -> predicted (probability)")


def _grid(panels: list[tuple[np.ndarray, str]], out: Path, suptitle: str) -> Path:
    from resnetlab.report.plots import _save

    n = len(panels)
    if n == 0:
        fig = Figure(figsize=(5, 1.5), layout="constrained")
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no examples", ha="center", va="center")
        return _save(fig, out)
    aspect = panels[0][0].shape[1] / panels[0][0].shape[0]
    cols = min(n, 4 if aspect < 1.6 else 2)
    rows = math.ceil(n / cols)
    width = 2.6 * aspect if aspect < 1.6 else 4.2
    fig = Figure(figsize=(cols * width, rows * (width / aspect + 0.45) + 0.4), layout="constrained")
    for i, (pic, title) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(suptitle, fontsize=10)
    return _save(fig, out)


def explain_files(run_or_checkpoint: str | os.PathLike, inputs, out_dir: str | os.PathLike | None = None, *,
                  device: str = "cpu", target: str | None = None) -> list[dict]:
    """Grad-CAM overlay PNGs for files (or folders of files) with a trained run's model.

    Writes ``<out_dir>/<file stem>.gradcam.png`` per file (default ``out_dir``: ``RUN_DIR/explain``): the
    input, and the heat map for the predicted class (or ``target``, a class name), titled with the top
    prediction; audio files get the spectrogram the network reads, Grad-CAM over it and the saliency.
    Returns ``[{"file", "png", "label", "prob"}]``, or ``{"file", "error"}`` for a file that cannot be read.
    """
    from resnetlab.data.errors import DataError
    from resnetlab.data.layout import list_input_files
    from resnetlab.data.prepare import decoder_for
    from resnetlab.training.run_dir import load_model

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = list_input_files(list(inputs))
    model, pipeline, meta = load_model(run_or_checkpoint, device=device)
    classes = meta["classes"]
    tgt = None
    if target is not None:
        if target not in classes:
            raise ValueError(f"--target {target!r} is not a class of this model; classes: {', '.join(classes)}")
        tgt = torch.tensor([classes.index(target)])
    if out_dir is None:
        ckpt = Path(meta["checkpoint"])
        out_dir = (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent) / "explain"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decode, _, _ = decoder_for(meta["pipeline"])
    modality = meta["pipeline"]["modality"]
    results, used = [], set()
    for f in files:
        try:
            raw = decode(f)
        except DataError as e:
            results.append({"file": f, "error": str(e)})
            continue
        exp = explain_raw(model, pipeline, torch.from_numpy(raw[None]), tgt)
        cls = int(exp.target[0])
        top = int(exp.probs[0].argmax())
        title = f"{Path(f).name}: {classes[top]} ({exp.probs[0, top]:.3f})"
        if cls != top:
            title += f"; map for {classes[cls]} ({exp.probs[0, cls]:.3f})"
        stem = Path(f).stem
        name = stem if stem not in used else f"{stem}-{len(used)}"
        used.add(name)
        png = _file_figure(raw, exp, modality, title, out_dir / f"{name}.gradcam.png")
        results.append({"file": f, "png": str(png), "label": classes[top], "prob": float(exp.probs[0, top]),
                        "explained": classes[cls]})
    return results


def _file_figure(raw: np.ndarray, exp: Explanation, modality: str, title: str, out: Path) -> Path:
    from resnetlab.report.plots import _save

    if modality == "image":
        img = raw.transpose(1, 2, 0) if raw.shape[0] == 3 else raw[0]
        panels = [(img, "input"), (image_overlay(raw, exp.cam[0]), "Grad-CAM")]
        fig = Figure(figsize=(7, 3.8), layout="constrained")
        for i, (pic, sub) in enumerate(panels):
            ax = fig.add_subplot(1, 2, i + 1)
            ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(sub, fontsize=9)
            ax.set_axis_off()
    else:
        feats = _features_2d(exp.inputs[0])
        cam = exp.cam[0]
        cam2 = np.broadcast_to(cam[None, :], feats.shape) if cam.ndim == 1 else cam
        fig = Figure(figsize=(8, 7), layout="constrained")
        for i, (data, cmap, sub) in enumerate([(feats, SPEC_CMAP, "network input (features)"),
                                               (cam2, CAM_CMAP, "Grad-CAM (last stage)"),
                                               (_features_2d(exp.saliency[0]), SALIENCY_CMAP,
                                                "saliency |d score / d input|")]):
            ax = fig.add_subplot(3, 1, i + 1)
            if i == 1:
                ax.imshow(feats, origin="lower", aspect="auto", cmap="gray", interpolation="nearest")
                ax.imshow(data, origin="lower", aspect="auto", cmap=cmap, alpha=0.55, vmin=0, vmax=1,
                          interpolation="bilinear")
            else:
                ax.imshow(np.sqrt(data) if i == 2 else data, origin="lower", aspect="auto", cmap=cmap,
                          interpolation="nearest")
            ax.set_title(sub, fontsize=9)
            ax.set_ylabel("band")
        ax.set_xlabel("frame")
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)
