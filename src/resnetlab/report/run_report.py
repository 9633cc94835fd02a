"""Assemble a run's report/ folder from what the engine wrote and one pass over the validation set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from resnetlab.fileio import atomic_write
from resnetlab.report.html import write_report
from resnetlab.report.metrics import confusion_matrix, summary_from_confusion, topk_accuracy
from resnetlab.report.plots import (
    plot_confusion,
    plot_curves,
    plot_grad_norms,
    plot_misclassified,
    plot_per_class,
    plot_spectrograms,
)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluation_summary(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> dict:
    """Top-1/top-5, per-class precision/recall/F1 and the confusion matrix of a set of predictions."""
    pred = logits.argmax(1).numpy()
    cm = confusion_matrix(targets.numpy(), pred, len(classes))
    summary = summary_from_confusion(cm, classes)
    topk = topk_accuracy(logits, targets, ks=(1, 5))
    summary["top1"] = topk[1]
    summary["top5"] = topk.get(5, topk[max(topk)])
    summary["n"] = int(len(targets))
    summary["loss"] = float(torch.nn.functional.cross_entropy(logits, targets)) if len(targets) else float("nan")
    summary["confusion_matrix"] = cm.tolist()
    return summary


def write_eval_plots(out_dir: Path, summary: dict, classes: list[str], prefix: str = "") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cm = np.asarray(summary["confusion_matrix"])
    return [plot_confusion(cm, classes, out_dir / f"{prefix}confusion.png"),
            plot_per_class(summary["per_class"], out_dir / f"{prefix}per_class.png")]


def misclassified_examples(x: np.ndarray, indices: np.ndarray, logits: torch.Tensor, targets: torch.Tensor,
                           max_items: int = 36) -> tuple[np.ndarray, list[int], list[int], list[float]]:
    prob = logits.softmax(1)
    conf, pred = prob.max(1)
    wrong = torch.nonzero(pred != targets).flatten()
    wrong = wrong[conf[wrong].argsort(descending=True)][:max_items]  # the most confident mistakes first
    rows = np.sort(indices[wrong.numpy()]) if len(wrong) else np.zeros(0, dtype=int)
    order = {int(r): i for i, r in enumerate(rows)}
    images = np.asarray(x[rows]) if len(rows) else np.zeros((0, *x.shape[1:]), dtype=x.dtype)
    sel = [int(indices[w]) for w in wrong.numpy()]
    images = images[[order[s] for s in sel]] if sel else images
    w = wrong.numpy()
    return images, targets[w].tolist(), pred[w].tolist(), conf[w].tolist()


def write_run_report(run_dir: Path, *, val_x: np.ndarray | None, val_pred=None, classes: list[str],
                     modality: str, pipeline=None, skipped: list[tuple[str, str]] | None = None,
                     model=None) -> Path:
    """Write every PNG of the training report and ``report/index.html``; returns the html path.

    With ``model`` (the best checkpoint's), also ``gradcam.png``: Grad-CAM maps of a few validation examples,
    one per class where possible.
    """
    report = run_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    plot_curves(read_jsonl(run_dir / "metrics.jsonl"), report / "curves.png")
    norms = read_jsonl(run_dir / "grad_norms.jsonl")
    if norms:
        plot_grad_norms(norms, report / "grad_norms.png")
    if skipped:
        atomic_write(report / "skipped.txt", "".join(f"{p}\t{why}\n" for p, why in skipped))
    if val_pred is not None and len(val_pred.targets):
        summary = evaluation_summary(val_pred.logits, val_pred.targets, classes)
        atomic_write(report / "val_summary.json", json.dumps(summary, indent=1))
        write_eval_plots(report, summary, classes)
        if modality == "image" and val_x is not None:
            imgs, t, p, c = misclassified_examples(val_x, val_pred.indices, val_pred.logits, val_pred.targets)
            plot_misclassified(imgs, t, p, c, classes, report / "misclassified.png")
        elif modality == "audio" and val_x is not None and pipeline is not None:
            write_spectrogram_examples(report / "spectrograms.png", val_x, val_pred.targets.numpy(),
                                       val_pred.indices, classes, pipeline)
        if model is not None and pipeline is not None and val_x is not None:
            write_gradcam_examples(report / "gradcam.png", model, pipeline, val_x, val_pred, classes)
    return write_report(run_dir)


def write_gradcam_examples(out: Path, model, pipeline, x: np.ndarray, pred, classes: list[str],
                           max_items: int = 8) -> Path:
    """Grad-CAM of the first validation example of each class (up to ``max_items``), on the model's device."""
    from resnetlab.explain.gradcam import overlay_examples

    first: dict[int, int] = {}
    for pos, label in zip(pred.indices.tolist(), pred.targets.tolist()):
        first.setdefault(int(label), int(pos))
    rows = sorted(first.values())[:max_items]
    labels = [int(pred.targets[int(np.nonzero(pred.indices == r)[0][0])]) for r in rows]
    return overlay_examples(model, pipeline, np.asarray(x[rows]), labels, classes, out, max_items=max_items)


def write_spectrogram_examples(out: Path, x: np.ndarray, targets: np.ndarray, indices: np.ndarray,
                               classes: list[str], pipeline) -> Path:
    """One example spectrogram per class, as the model sees it (features, before augmentation)."""
    first: dict[int, int] = {}
    for pos, label in zip(indices.tolist(), targets.tolist()):
        first.setdefault(int(label), int(pos))
    labels = sorted(first)
    rows = [first[c] for c in labels]
    waves = torch.from_numpy(np.asarray(x[np.sort(rows)]))[np.argsort(np.argsort(rows))]
    with torch.no_grad():
        feats = pipeline.features_only(waves.to(pipeline.device))
    feats = feats.float().cpu().numpy()
    if feats.ndim == 4:
        feats = feats[:, 0]
    return plot_spectrograms(feats, labels, classes, out)
