"""The one inference core: decode, batch, preprocess, run, postprocess.

Every way of running a trained model goes through here:

- :func:`forward_logits` (preprocess with the pipeline's eval transform, run under a precision, optional
  test-time augmentation) is what validation, ``evaluate`` (``training.evaluate.predict_loader``) and
  ``predict`` run per batch, and what an export's parity check compares the exported file with;
- :func:`predict_files` (decode each file, batch, run, softmax, top-k; an unreadable file gets an error entry)
  is ``predict``'s loop, whichever runner computes the logits: :func:`forward_logits` for the model as trained,
  or a :class:`~resnetlab.deploy.predictor.Predictor` backend (which the server also uses);
- :func:`top_k_labels` turns probabilities into the ``{"label", "prob"}`` lists that ``predict``, the
  predictor and the server return.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence

import numpy as np
import torch

from resnetlab.data.errors import DataError
from resnetlab.data.layout import file_kind, unknown_type_error
from resnetlab.data.pipeline import Pipeline
from resnetlab.training.precision import Precision

TTA_MODES = ("flip", "flip-shift")


def tta_mode(tta: bool | str | None) -> str | None:
    """``True`` means ``"flip"``; ``False``/``None`` none; else one of ``TTA_MODES`` (ValueError otherwise)."""
    if tta is True:
        return "flip"
    if tta in (False, None, ""):
        return None
    if tta not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {tta!r}; allowed: {', '.join(TTA_MODES)}")
    return tta


def _tta_views(x: torch.Tensor, mode: str) -> list[tuple[torch.Tensor, float]]:
    """The views of a batch test-time augmentation averages, with their weights. ``flip``: the batch and its
    mirror image. ``flip-shift`` (airbench's): those two weighted 1/4 each, plus the batch moved one pixel up-left
    and one pixel down-right (reflected borders), each with its mirror image, 1/8 each."""
    views = [(x, 0.5), (x.flip(-1), 0.5)]
    if mode == "flip-shift" and x.ndim == 4:
        pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        shifted = [pad[..., :h, :w], pad[..., 2:, 2:]]
        views = [(v, 0.25) for v, _ in views] + [(v, 0.125) for s in shifted for v in (s, s.flip(-1))]
    return views


@torch.no_grad()
def forward_logits(model: torch.nn.Module, pipeline: Pipeline, x: torch.Tensor, prec: Precision,
                   tta: str | None = None) -> torch.Tensor:
    """float32 logits ``(N, num_classes)`` (on the model's device) of a batch of decoded samples ``x`` (the cache
    format: uint8 images, int16 waves; on the model's device), ``model`` in eval mode.

    ``tta`` (a ``TTA_MODES`` name): the log of the mean of the views' probabilities instead of the logits.
    """
    inp, _ = pipeline(x, None, train=False)
    inp = prec.format_input(inp)
    with prec.autocast():
        if tta is None:
            return model(inp).float()
        return sum(wt * model(prec.format_input(v)).float().softmax(1) for v, wt in _tta_views(inp, tta)).log()


def top_k_labels(probs: torch.Tensor, classes: Sequence[str], k: int) -> list[list[dict]]:
    """``[[{"label", "prob"}, ...] per row]``, most probable first, for probabilities ``(N, num_classes)``;
    probabilities rounded to 6 decimals (what ``predict``, the predictor and the server report)."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    p, idx = probs.float().cpu().topk(min(k, probs.shape[1]), dim=1)
    return [[{"label": classes[j], "prob": round(float(q), 6)} for q, j in zip(pr, ir)]
            for pr, ir in zip(p.tolist(), idx.tolist())]


def decode_files(files: Sequence[str], decode: Callable[[str], np.ndarray], workers: int = 1
                 ) -> list[tuple[np.ndarray | None, str | None]]:
    """``(sample, None)`` per readable file, ``(None, message)`` per unreadable one (a ``DataError``), in order;
    ``workers`` threads decode."""
    def one(f: str):
        if file_kind(f) is None:  # named on predict's command line (list_input_files(keep_unknown=True))
            return None, unknown_type_error(f)
        try:
            return decode(f), None
        except DataError as e:
            return None, str(e)

    if workers <= 1 or len(files) <= 1:
        return [one(f) for f in files]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, files))


def predict_files(files: Sequence[str], decode: Callable[[str], np.ndarray],
                  logits: Callable[[np.ndarray], torch.Tensor], classes: Sequence[str], *, top_k: int = 5,
                  batch_size: int = 64, workers: int = 1) -> list[dict]:
    """``predict``'s result: ``{"file", "top_k"}`` per readable file, ``{"file", "error"}`` per unreadable one,
    in the order of ``files``.

    ``decode`` turns a path into one sample (cache format); ``logits`` a stacked batch of them
    ``(n, *sample_shape)`` into logits ``(n, num_classes)``. Files are decoded and run ``batch_size`` at a time.
    """
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = list(files[start:start + batch_size])
        decoded = decode_files(chunk, decode, workers)
        good = [i for i, (a, _) in enumerate(decoded) if a is not None]
        tops = top_k_labels(logits(np.stack([decoded[i][0] for i in good])).float().softmax(1), classes, top_k) \
            if good else []
        by_row = dict(zip(good, tops))
        results.extend({"file": f, "top_k": by_row[i]} if i in by_row else {"file": f, "error": decoded[i][1]}
                       for i, f in enumerate(chunk))
    return results
