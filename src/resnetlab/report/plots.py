"""The run report's figures. Each function draws one PNG, writes it to ``out`` and returns ``out`` as a Path.

Figures are built on ``matplotlib.figure.Figure`` directly, never through ``pyplot``: nothing is registered in
pyplot's global figure list, no display is needed, and the Agg renderer writes the PNG. Every function accepts
degenerate input (one epoch, no data, missing keys) and then draws a figure that says so rather than failing.

File names the HTML report knows how to caption: ``curves.png``, ``confusion.png``, ``per_class.png``,
``misclassified.png``, ``grad_norms.png``, ``spectrograms.png``, ``lr_find.png``, ``compare_*.png``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from resnetlab.report.metrics import dedupe_epochs

DPI = 110


def _save(fig: Figure, out: Path | str) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight", facecolor="white")
    fig.clear()  # Figure objects are not tracked by pyplot; clearing frees the artists now, not at the next GC
    return out


def _placeholder(out: Path | str, title: str, message: str) -> Path:
    fig = Figure(figsize=(6, 2.4), layout="constrained")
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="0.35", transform=ax.transAxes)
    return _save(fig, out)


def _short(name: str, n: int = 18) -> str:
    """A label from user data: shortened with an ellipsis, and ``$`` escaped so it is never parsed as mathtext."""
    name = str(name)
    name = name if len(name) <= n else name[: n - 1] + "…"
    return name.replace("$", r"\$")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the records that hold a finite ``key``."""
    pts = [(r.get("epoch", i + 1), r[key]) for i, r in enumerate(records) if _finite(r.get(key))]
    if not pts:
        return np.empty(0), np.empty(0)
    x, y = zip(*pts)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def _percent_scale(*arrays: np.ndarray) -> float:
    """1.0 when accuracies are fractions, 100.0 when they were logged as percentages."""
    vals = np.concatenate([a for a in arrays if a.size] or [np.zeros(1)])
    return 100.0 if vals.max() > 1.0 + 1e-9 else 1.0


def _is_accuracy_key(key: str) -> bool:
    return "acc" in key or "top" in key


def plot_curves(metrics: list[dict], out: Path) -> Path:
    """Loss (left) and accuracy (right) per epoch, train and val, with the best val-accuracy epoch marked.

    ``metrics`` are the records of ``metrics.jsonl``. Keys missing from some or all epochs (no validation set,
    validation every few epochs) are skipped point by point; ``val_top5`` is drawn when present. Accuracies may
    be fractions or percentages; the axis shows percent either way.
    """
    records = dedupe_epochs(metrics)
    if not records:
        return _placeholder(out, "Training curves", "no epochs recorded yet")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    style = {"train": dict(color="tab:blue"), "val": dict(color="tab:orange")}
    marker = "o" if len(records) <= 30 else None

    for split in ("train", "val"):
        x, y = _series(records, f"{split}_loss")
        if x.size:
            ax_loss.plot(x, y, marker=marker, ms=4, label=f"{split} loss", **style[split])
    acc = {k: _series(records, k) for k in ("train_acc", "val_acc", "val_top5")}
    scale = _percent_scale(*(y for _, y in acc.values()))
    for key, (x, y) in acc.items():
        if x.size:
            split = key.split("_")[0]
            label = "val top-5" if key == "val_top5" else f"{split} top-1"
            ls = "--" if key == "val_top5" else "-"
            ax_acc.plot(x, y, ls=ls, marker=marker, ms=4, label=label, **style[split])

    x, y = acc["val_acc"]
    if x.size:
        i = int(np.argmax(y))
        ax_acc.axvline(x[i], color="tab:green", ls=":", lw=1.2)
        ax_acc.plot([x[i]], [y[i]], marker="*", ms=14, color="tab:green", zorder=5,
                    label=f"best val {y[i] / scale:.2%} (epoch {x[i]:g})", ls="none")
        xl, yl = _series(records, "val_loss")
        if xl.size:
            ax_loss.axvline(x[i], color="tab:green", ls=":", lw=1.2, label=f"best val-acc epoch ({x[i]:g})")

    for ax, title, ylabel in ((ax_loss, "Loss", "loss"), (ax_acc, "Accuracy", "accuracy")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.has_data():
            ax.legend(fontsize=9, loc="best")
        else:
            ax.text(0.5, 0.5, f"no {ylabel} recorded", ha="center", va="center", color="0.4", transform=ax.transAxes)
    ax_acc.yaxis.set_major_formatter(PercentFormatter(xmax=scale))
    if len(records) == 1:  # one point: give the x-axis some room so the marker is not on the frame
        e = float(records[0].get("epoch", 1))
        for ax in (ax_loss, ax_acc):
            ax.set_xlim(e - 1, e + 1)
    return _save(fig, out)


def plot_confusion(cm: np.ndarray, classes: list[str], out: Path, normalize: bool = True) -> Path:
    """Confusion matrix as a heat map: true class down the rows, predicted class across the columns.

    With ``normalize`` each row is divided by its support, so the diagonal is per-class recall and colours are
    comparable across imbalanced classes; cells then read as a percentage, with the count underneath when there
    are at most 10 classes. Cells are annotated up to 20 classes (zeros left blank); beyond that only colour,
    and beyond 60 classes the tick labels are dropped too.
    """
    cm = np.asarray(cm)
    n = cm.shape[0]
    if cm.ndim != 2 or cm.shape[1] != n:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(n)]
    if len(classes) != n:
        raise ValueError(f"got {len(classes)} class names for a {n}x{n} confusion matrix")
    if n == 0:
        return _placeholder(out, "Confusion matrix", "no classes")
    counts = cm.astype(np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    if normalize:
        values = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        vmax = 1.0
    else:
        values = counts
        vmax = max(float(values.max()), 1.0)

    side = float(np.clip(0.45 * n + 2.5, 5.0, 16.0))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    # many classes: a square-root colour scale, or the few-percent confusions vanish next to the diagonal
    scale = PowerNorm(0.5, vmin=0.0, vmax=vmax) if n > 20 else Normalize(0.0, vmax)
    im = ax.imshow(values, cmap="Blues", norm=scale, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cbar.set_label(("fraction of the true class" if normalize else "samples") + (" (sqrt scale)" if n > 20 else ""))
    if normalize:
        if n > 20:
            cbar.set_ticks([0.0, 0.02, 0.1, 0.25, 0.5, 0.75, 1.0])
        cbar.ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))

    if n <= 20:
        fontsize = 9 if n <= 10 else 7
        for i in range(n):
            for j in range(n):
                if cm[i, j] == 0:
                    continue
                if normalize:
                    pct = "<1%" if values[i, j] < 0.005 else f"{values[i, j]:.0%}"
                    text = pct + (f"\n{int(cm[i, j])}" if n <= 10 else "")
                else:
                    text = f"{int(cm[i, j])}"
                dark = values[i, j] / vmax > 0.55
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                        color="white" if dark else "black")
    if n <= 60:
        labels = [_short(c) for c in classes]
        ax.set_xticks(range(n), labels, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center",
                      rotation_mode="anchor", fontsize=9 if n <= 20 else 7)
        ax.set_yticks(range(n), labels, fontsize=9 if n <= 20 else 7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    total = int(cm.sum())
    acc = float(np.trace(cm)) / total if total else 0.0
    kind = "row-normalised" if normalize else "counts"
    ax.set_title(f"Confusion matrix ({kind}); accuracy {acc:.2%} on {total} samples")
    ax.set_xlabel("predicted class" + ("" if n <= 60 else " (index)"))
    ax.set_ylabel("true class" + ("" if n <= 60 else " (index)"))
    return _save(fig, out)


def plot_per_class(summary_per_class: list[dict], out: Path, max_classes: int = 60) -> Path:
    """Per-class recall (the accuracy on each class) as horizontal bars, worst class on top, support noted.

    ``summary_per_class`` is :func:`resnetlab.report.metrics.per_class_report`'s list (``summary["per_class"]``).
    With more than ``max_classes`` classes only the worst and best ``max_classes // 2`` are drawn. The dashed
    line is the mean recall over all classes (balanced accuracy).
    """
    rows = [r for r in summary_per_class]
    if not rows:
        return _placeholder(out, "Per-class accuracy", "no classes")
    rows.sort(key=lambda r: (float(r.get("recall", 0.0)), str(r.get("class"))))
    mean_recall = float(np.mean([float(r.get("recall", 0.0)) for r in rows]))
    total = len(rows)
    if total > max_classes:
        half = max_classes // 2
        rows = rows[:half] + rows[-half:]
    n = len(rows)
    fig = Figure(figsize=(8.5, float(np.clip(0.28 * n + 1.6, 2.8, 20.0))), layout="constrained")
    ax = fig.add_subplot()
    recall = np.array([float(r.get("recall", 0.0)) for r in rows])
    colors = colormaps["RdYlGn"](0.15 + 0.7 * recall)
    y = np.arange(n)
    ax.barh(y, recall, color=colors, edgecolor="0.3", linewidth=0.4)
    ax.set_yticks(y, [_short(r.get("class"), 24) for r in rows], fontsize=9 if n <= 40 else 7)
    ax.set_ylim(n - 0.5, -0.5)  # worst first, at the top
    ax.axvline(mean_recall, color="0.25", ls="--", lw=1, zorder=1)
    for yi, r, v in zip(y, rows, recall):
        ax.text(min(v, 1.0) + 0.01, yi, f"{v:.1%}  (n={int(r.get('support', 0))})", va="center",
                fontsize=8 if n <= 40 else 6, zorder=3,
                bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none", alpha=0.8))
    if total > max_classes:
        ax.axhline(half - 0.5, color="0.5", lw=0.8, ls=":")
    ax.set_xlim(0, 1.3)  # room for the labels right of a 100% bar
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_xlabel(f"recall (accuracy on the class); dashed line: mean over classes, {mean_recall:.1%}")
    ax.set_ylabel("class")
    shown = f" (worst {half} and best {half} of {total})" if total > max_classes else ""
    ax.set_title(f"Per-class accuracy{shown}")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out)


def _to_hwc_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[None]
    if img.dtype != np.uint8:
        img = np.asarray(img, dtype=np.float64)
        if img.size and img.max() <= 1.0:
            img = img * 255.0
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    img = np.transpose(img, (1, 2, 0))
    return img[..., 0] if img.shape[2] == 1 else img


def _upscale_nearest(img: np.ndarray, min_side: int = 96) -> np.ndarray:
    """Repeat pixels so a tiny image (MNIST's 28x28) stays crisp: no smoothing, no resampling blur."""
    f = int(math.ceil(min_side / max(1, min(img.shape[:2]))))
    if f <= 1:
        return img
    return np.repeat(np.repeat(img, f, axis=0), f, axis=1)


def plot_misclassified(images: np.ndarray, true: list[int], pred: list[int], prob: list[float],
                       classes: list[str] | None, out: Path, max_items: int = 36) -> Path:
    """A grid of misclassified images captioned ``true → pred (p)``, most confident mistakes first.

    ``images`` is ``uint8 (N, C, H, W)`` with ``C`` 1 (grey) or 3 (RGB), un-normalised; float images in
    ``[0, 1]`` or ``[0, 255]`` are accepted too. ``prob`` is the model's probability for its (wrong) prediction.
    At most ``max_items`` are drawn. ``N == 0`` draws a "no misclassified examples" placeholder.
    """
    images = np.asarray(images)
    n_all = 0 if images.size == 0 else images.shape[0]
    if n_all == 0:
        return _placeholder(out, "Misclassified examples", "no misclassified examples")
    if images.ndim == 3:  # (N, H, W): grey without a channel axis
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C in {{1, 3}}, got shape {images.shape}")
    if not len(true) == len(pred) == len(prob) == n_all:
        raise ValueError(f"got {n_all} images but {len(true)} true, {len(pred)} pred and {len(prob)} prob entries")

    def name(i: int) -> str:
        return _short(classes[i] if classes is not None and 0 <= i < len(classes) else str(i), 12)

    order = sorted(range(n_all), key=lambda i: -float(prob[i]))[: max(1, max_items)]
    k = len(order)
    ncols = min(k, 6 if k > 16 else max(1, math.ceil(math.sqrt(k))))
    nrows = math.ceil(k / ncols)
    h, w = images.shape[2:]
    cell_w = 1.9
    cell_h = cell_w * h / w + 0.3
    fig = Figure(figsize=(cell_w * ncols, cell_h * nrows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, order):
        img = _upscale_nearest(_to_hwc_uint8(images[i]))
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{name(int(true[i]))} → {name(int(pred[i]))} ({float(prob[i]):.2f})", fontsize=8,
                     color="tab:red")
    shown = f" ({k} of {n_all}, most confident first)" if k < n_all else f" ({n_all}, most confident first)"
    fig.suptitle(f"Misclassified: true → predicted (probability){shown}", fontsize=11)
    return _save(fig, out)


_FIRST = ("stem", "conv1", "bn1")
_LAST = ("head", "fc", "classifier")


def _stage_key(name: str, first_seen: int) -> tuple:
    """Order stages from input to output: stem, layer1, layer2, ..., (anything else), fc."""
    if name in _FIRST:
        return (0, _FIRST.index(name), 0)
    m = re.fullmatch(r"(?:layer|stage|block)[._]?(\d+)", name)
    if m:
        return (1, int(m.group(1)), 0)
    if name in _LAST:
        return (3, _LAST.index(name), 0)
    return (2, first_seen, 0)


def _moving_average(y: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or y.size < w:
        return y
    k = np.ones(w) / w
    # average in log space: gradient norms span decades, and a plain mean is dominated by spikes
    return np.exp(np.convolve(np.log(y), k, mode="same") / np.convolve(np.ones_like(y), k, mode="same"))


def plot_grad_norms(history: list[dict], out: Path) -> Path:
    """Gradient norm of each stage over training (left, log scale) and its mean per stage (right).

    ``history`` items are ``{"step": int, "epoch": float, "norms": {"stem": ..., "layer1": ..., "fc": ...}}``.
    Stages are ordered from input to output and coloured along a colour map in that order. In a plain (no
    shortcut) deep network the early stages' norms fall by decades; with residual connections they stay close
    to the later stages': the shortcut carries the gradient back to the input. Long histories are drawn faintly
    with a log-space moving average on top.
    """
    first_seen: dict[str, int] = {}
    for h in history:
        for k in h.get("norms", {}):
            first_seen.setdefault(str(k), len(first_seen))
    if not history or not first_seen:
        return _placeholder(out, "Gradient norms per stage", "no gradient norms recorded")
    stages = sorted(first_seen, key=lambda s: _stage_key(s, first_seen[s]))
    cmap = colormaps["viridis"]
    colors = {s: cmap(i / max(1, len(stages) - 1) * 0.9) for i, s in enumerate(stages)}

    fig = Figure(figsize=(12, 4.4), layout="constrained")
    ax_line, ax_bar = fig.subplots(1, 2, width_ratios=(2.2, 1))
    means = []
    for s in stages:
        pts = [(h.get("step", i), h["norms"][s]) for i, h in enumerate(history)
               if _finite(h.get("norms", {}).get(s)) and h["norms"][s] > 0]
        if not pts:
            means.append(np.nan)
            continue
        x, y = (np.asarray(v, dtype=float) for v in zip(*pts))
        means.append(float(np.exp(np.mean(np.log(y)))))
        if y.size > 100:
            ax_line.plot(x, y, color=colors[s], lw=0.6, alpha=0.25)
            ax_line.plot(x, _moving_average(y, max(3, y.size // 50)), color=colors[s], lw=1.6, label=_short(s, 24))
        else:
            ax_line.plot(x, y, color=colors[s], lw=1.4, marker="o" if y.size <= 30 else None, ms=3,
                         label=_short(s, 24))
    if ax_line.has_data():
        ax_line.set_yscale("log")
        ax_line.legend(title="input → output", fontsize=8, title_fontsize=8, loc="center left",
                       bbox_to_anchor=(1.0, 0.5), frameon=False)
    epochs = [h.get("epoch") for h in history]
    if all(_finite(e) for e in epochs) and len(history) > 1:  # faint line at each epoch boundary
        steps = [h.get("step", i) for i, h in enumerate(history)]
        bounds = [steps[i] for i in range(1, len(epochs)) if int(epochs[i]) != int(epochs[i - 1])]
        if len(bounds) <= 40:
            for b in bounds:
                ax_line.axvline(b, color="0.85", lw=0.7, zorder=0)
    ax_line.set_title("Gradient norm per stage over training")
    ax_line.set_xlabel("training step")
    ax_line.set_ylabel("gradient L2 norm (log scale)")
    ax_line.grid(alpha=0.3)

    m = np.asarray(means, dtype=float)
    ok = np.isfinite(m)
    ax_bar.bar(np.arange(len(stages))[ok], m[ok], color=[colors[s] for s, o in zip(stages, ok) if o],
               edgecolor="0.3", linewidth=0.5)
    ax_bar.set_xticks(range(len(stages)), [_short(s, 24) for s in stages], rotation=45 if len(stages) > 5 else 0,
                      ha="right" if len(stages) > 5 else "center", rotation_mode="anchor", fontsize=9)
    if ok.any():
        ax_bar.set_yscale("log")
        lo, hi = float(m[ok].min()), float(m[ok].max())
        ax_bar.set_ylim(lo / 3, hi * 3)
        for i in np.flatnonzero(ok):
            ax_bar.text(i, m[i] * 1.12, f"{m[i]:.2g}", ha="center", va="bottom", fontsize=8)
    ax_bar.set_title("Mean gradient norm per stage")
    ax_bar.set_xlabel("stage (input → output)")
    ax_bar.set_ylabel("geometric mean of L2 norm (log)")
    ax_bar.grid(axis="y", alpha=0.3)
    return _save(fig, out)


def plot_spectrograms(specs: np.ndarray, labels: list[int], classes: list[str] | None, out: Path,
                      per_class: int = 1, max_panels: int = 48) -> Path:
    """Example log-mel spectrograms: ``per_class`` per class (the first ones found), titled with the class.

    ``specs`` is ``(N, F, T)`` (a ``(N, 1, F, T)`` channel axis is squeezed): mel bins up, frames across,
    low frequencies at the bottom. Each panel has its own colour range (2nd to 99.5th percentile), since
    what matters is the pattern, not the level. Classes with no example are left out.
    """
    specs = np.asarray(specs, dtype=np.float32)
    if specs.ndim == 4 and specs.shape[1] == 1:
        specs = specs[:, 0]
    if specs.size == 0 or len(labels) == 0:
        return _placeholder(out, "Spectrograms", "no spectrograms")
    if specs.ndim != 3:
        raise ValueError(f"specs must be (N, F, T), got shape {specs.shape}")
    if len(labels) != specs.shape[0]:
        raise ValueError(f"got {specs.shape[0]} spectrograms but {len(labels)} labels")
    picks: list[int] = []
    taken: dict[int, int] = {}
    for i, c in enumerate(labels):
        c = int(c)
        if taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            picks.append(i)
    picks.sort(key=lambda i: (int(labels[i]), i))
    picks = picks[:max_panels]
    k = len(picks)
    ncols = min(k, 6)
    nrows = math.ceil(k / ncols)
    f, t = specs.shape[1:]
    cell_w = 2.3
    cell_h = float(np.clip(cell_w * f / t, 1.2, 3.0)) + 0.5
    fig = Figure(figsize=(cell_w * ncols + 0.4, cell_h * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for idx, i in enumerate(picks):
        r, c = divmod(idx, ncols)
        ax = axes[r, c]
        ax.set_axis_on()
        s = specs[i]
        finite = s[np.isfinite(s)]
        lo, hi = (np.percentile(finite, [2, 99.5]) if finite.size else (0.0, 1.0))
        ax.imshow(s, origin="lower", aspect="auto", cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1,
                  interpolation="nearest")
        label = int(labels[i])
        ax.set_title(_short(classes[label] if classes is not None and 0 <= label < len(classes) else label, 20),
                     fontsize=9)
        ax.tick_params(labelsize=7)
        if c == 0:
            ax.set_ylabel("mel bin", fontsize=8)
        else:
            ax.set_yticklabels([])
        if r == nrows - 1 or idx + ncols >= k:
            ax.set_xlabel("frame", fontsize=8)
        else:
            ax.set_xticklabels([])
    fig.suptitle(f"Example log-mel spectrograms ({f} mel bins x {t} frames)", fontsize=11)
    return _save(fig, out)


def plot_lr_find(lrs: list[float], losses: list[float], out: Path, suggestion: float | None = None) -> Path:
    """Loss against learning rate on a log axis (the LR range test), with the suggested rate marked.

    Non-finite losses (the run diverged) are dropped, and the y-axis is cut a little above the starting loss
    so the final blow-up does not flatten the interesting part of the curve.
    """
    lr = np.asarray(lrs, dtype=float)
    loss = np.asarray(losses, dtype=float)
    if lr.shape != loss.shape:
        raise ValueError(f"got {lr.size} learning rates but {loss.size} losses")
    ok = np.isfinite(lr) & np.isfinite(loss) & (lr > 0)
    lr, loss = lr[ok], loss[ok]
    if lr.size == 0:
        return _placeholder(out, "Learning-rate finder", "no finite losses recorded")
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(lr, loss, color="tab:blue", lw=1.5, marker="o" if lr.size <= 30 else None, ms=3, label="loss")
    ax.set_xscale("log")
    lo, start = float(loss.min()), float(loss[: max(1, lr.size // 10)].mean())
    top = min(float(loss.max()), start + max(start - lo, 0.1 * abs(start)))
    if top > lo:
        pad = 0.05 * (top - lo)
        ax.set_ylim(lo - pad, top + pad)
    if suggestion is not None and _finite(suggestion) and suggestion > 0:
        ax.axvline(suggestion, color="tab:red", ls="--", lw=1.2)
        y_s = float(np.interp(np.log(suggestion), np.log(lr), loss)) if lr.size > 1 else float(loss[0])
        ax.plot([suggestion], [y_s], marker="o", ms=8, color="tab:red", ls="none",
                label=f"suggested lr = {suggestion:.2e}")
    ax.set_title("Learning-rate range test")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, out)


def plot_compare(runs: dict[str, list[dict]], key: str, out: Path, ylabel: str | None = None) -> Path:
    """One curve per run of ``key`` (e.g. ``"val_acc"``) against epoch, for plain-vs-residual or
    fine-tune-vs-scratch comparisons. The legend gives each run's best value (lowest for a loss, highest
    otherwise). Runs without ``key`` are listed in the legend as "(no data)".
    """
    ylabel = ylabel or key
    lower_is_better = "loss" in key or "err" in key
    series = {name: _series(dedupe_epochs(ms), key) for name, ms in runs.items()}
    present = [y for _, y in series.values() if y.size]
    if not present:
        return _placeholder(out, f"Comparison of {key}", f"no run has {key!r}")
    as_percent = _is_accuracy_key(key) and not lower_is_better
    scale = _percent_scale(*present) if as_percent else 1.0
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colors = colormaps["tab10"]
    for i, (name, (x, y)) in enumerate(series.items()):
        if not x.size:
            ax.plot([], [], color="0.6", label=f"{_short(name, 40)} (no data)")
            continue
        j = int(np.argmin(y) if lower_is_better else np.argmax(y))
        best = f"{y[j] / scale:.2%}" if as_percent else f"{y[j]:.4g}"
        line, = ax.plot(x, y, color=colors(i % 10), lw=1.6, marker="o" if x.size <= 30 else None, ms=3,
                        label=f"{_short(name, 40)} (best {best} @ {x[j]:g})")
        ax.plot([x[j]], [y[j]], marker="*", ms=11, color=line.get_color(), ls="none")
    if as_percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=scale))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{_short(ylabel, 60)} per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel(_short(ylabel, 60))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, out)
