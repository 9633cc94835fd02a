"""Classification metrics: top-k accuracy, the confusion matrix and what follows from it.

Conventions (those of scikit-learn's ``classification_report``): the confusion matrix has true classes as rows
and predicted classes as columns; a ratio whose denominator is zero (a class never predicted, a class with no
samples) is 0.0, never NaN; macro averages weigh every class equally, weighted averages weigh by support.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of samples whose true class is among the ``k`` highest scores, for each ``k`` in ``ks``.

    Args:
        logits: ``(N, C)`` scores (logits or probabilities: only their order matters).
        target: ``(N,)`` class indices, or ``(N, C)`` soft / one-hot targets (mixup, label smoothing), whose
            argmax is taken as the class.
        ks: the ``k`` to report. A ``k`` larger than ``C`` is clipped to ``C`` (so top-5 of a 3-class problem
            is 1.0) but keeps its requested key, so callers can always read ``result[5]``.

    Returns:
        ``{k: accuracy in [0, 1]}``; an empty batch gives 0.0 for every ``k``. To average over batches of
        unequal size, weight each batch's value by its ``N``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if target.ndim == 2:
        target = target.argmax(dim=1)
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must be (N,) or (N, C) with N={logits.shape[0]}, got shape {tuple(target.shape)}")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {ks}")
    n, num_classes = logits.shape
    if n == 0 or not ks:
        return {k: 0.0 for k in ks}
    maxk = min(max(ks), num_classes)
    with torch.no_grad():
        # (N, maxk), best first; a stable sort breaks ties (common in bf16 logits) towards the lower class index,
        # as argmax does, so top-1 always equals the confusion matrix's accuracy
        top = logits.sort(dim=1, descending=True, stable=True).indices[:, :maxk]
        hit = top.eq(target.to(top.device).view(-1, 1))  # at most one True per row
        cum = hit.cumsum(dim=1).sum(dim=0).tolist()  # cum[j]: samples right within the first j + 1 guesses
    return {k: cum[min(k, num_classes) - 1] / n for k in ks}


def _as_int_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.equal(np.mod(a, 1), 0)):
            raise ValueError(f"{name} must hold class indices (integers), got dtype {a.dtype}")
    return a.astype(np.int64).reshape(-1)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs: ``cm[i, j]`` is how many samples of class ``i`` were predicted ``j``.

    ``y_true`` and ``y_pred`` are sequences, numpy arrays or tensors of class indices in ``[0, num_classes)``.
    Returns an ``int64`` array of shape ``(num_classes, num_classes)``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    t, p = _as_int_array(y_true, "y_true"), _as_int_array(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} holds indices in [{a.min()}, {a.max()}], outside [0, {num_classes})")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _check_cm(cm: np.ndarray, classes: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {cm.shape}")
    if classes is None:
        classes = [str(i) for i in range(cm.shape[0])]
    classes = [str(c) for c in classes]
    if len(classes) != cm.shape[0]:
        raise ValueError(f"got {len(classes)} class names for a {cm.shape[0]}x{cm.shape[0]} confusion matrix")
    return cm, classes


def per_class_report(cm: np.ndarray, classes: Sequence[str] | None = None) -> list[dict]:
    """Precision, recall, F1 and support of every class, from a confusion matrix (rows true, columns predicted).

    Returns one ``{"class", "precision", "recall", "f1", "support"}`` dict per class, in class-index order.
    Recall is the per-class accuracy. Zero denominators give 0.0. ``classes`` defaults to ``"0", "1", ...``.
    """
    cm, classes = _check_cm(cm, classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    precision = _ratio(tp, cm.sum(axis=0))
    recall = _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return [
        {"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for c, p, r, f, s in zip(classes, precision, recall, f1, support)
    ]


def summary_from_confusion(cm: np.ndarray, classes: Sequence[str] | None = None) -> dict:
    """Overall accuracy, macro / weighted averages and the per-class report, as one JSON-ready dict.

    Keys: ``accuracy``, ``macro_precision``, ``macro_recall`` (balanced accuracy), ``macro_f1``,
    ``weighted_precision``, ``weighted_recall``, ``weighted_f1``, ``support`` (total samples), ``num_classes``
    and ``per_class`` (see :func:`per_class_report`). Macro averages include classes with no samples (as
    scikit-learn does when given the label list), so such a class pulls the macro figures down.
    """
    cm, classes = _check_cm(cm, classes)
    per_class = per_class_report(cm, classes)
    total = int(cm.sum())
    support = np.array([r["support"] for r in per_class], dtype=np.float64)
    out: dict = {"accuracy": float(_ratio(np.trace(cm), total)), "support": total, "num_classes": len(classes)}
    for key in ("precision", "recall", "f1"):
        values = np.array([r[key] for r in per_class], dtype=np.float64)
        out[f"macro_{key}"] = float(values.mean()) if values.size else 0.0
        out[f"weighted_{key}"] = float(_ratio((values * support).sum(), total))
    out["per_class"] = per_class
    return out


def format_report_table(summary: dict, max_name: int = 24) -> str:
    """A fixed-width text table of a :func:`summary_from_confusion` result, for the terminal.

    One row per class, then accuracy and the macro and weighted averages (scikit-learn's layout). Class names
    longer than ``max_name`` characters are shortened with an ellipsis.
    """
    rows = summary.get("per_class", [])
    names = [str(r["class"]) for r in rows]
    names = [n if len(n) <= max_name else n[: max_name - 1] + "…" for n in names]
    w = max([len(n) for n in names] + [len("weighted avg")])
    total = int(summary.get("support", sum(int(r["support"]) for r in rows)))
    sw = max(7, len(str(total)))
    header = f"{'':<{w}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>{sw}}"
    lines = [header, "-" * len(header)]
    for n, r in zip(names, rows):
        lines.append(f"{n:<{w}}  {r['precision']:>9.4f}  {r['recall']:>9.4f}  {r['f1']:>9.4f}  {r['support']:>{sw}d}")
    lines.append("-" * len(header))
    lines.append(f"{'accuracy':<{w}}  {'':>9}  {'':>9}  {summary.get('accuracy', 0.0):>9.4f}  {total:>{sw}d}")
    for avg in ("macro", "weighted"):
        if f"{avg}_f1" in summary:
            p = summary.get(f"{avg}_precision", float("nan"))
            r = summary.get(f"{avg}_recall", float("nan"))
            lines.append(f"{avg + ' avg':<{w}}  {p:>9.4f}  {r:>9.4f}  {summary[f'{avg}_f1']:>9.4f}  {total:>{sw}d}")
    return "\n".join(lines)


def dedupe_epochs(records: Sequence[Mapping]) -> list[Mapping]:
    """``metrics.jsonl`` records sorted by ``epoch``; when an epoch repeats (a resumed run appended the epochs
    after its checkpoint again) the last record wins. Records without a numeric epoch count by position (1, 2...).
    """
    by_epoch: dict[float, Mapping] = {}
    for i, r in enumerate(records):
        e = r.get("epoch")
        ok = isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e)
        by_epoch[e if ok else i + 1] = r
    return [by_epoch[e] for e in sorted(by_epoch)]
