"""The degradation experiment of He et al. (2015, Fig. 6), at a scale one CPU can run.

Plain and residual networks of two depths, trained identically (same data, seed, schedule, no augmentation so
that training error measures optimisation, not regularisation). The paper's finding: the deeper *plain* net
has higher training error than the shallower one, while the deeper *residual* net has lower. The gradient
norms per stage show why: without shortcuts, gradients reaching the early stages of a deep net shrink.

GPU-sized recipe (CIFAR-10, as in the paper): ``resnetlab experiment degradation --data cifar10/ --depths 20 56
--epochs 60 --batch-size 128 --device cuda``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from resnetlab.fileio import atomic_write
from resnetlab.report.run_report import read_jsonl


def run_degradation(data: str = "builtin:digits", *, depths: tuple[int, int] = (20, 56), epochs: int = 6,
                    out: str | Path = "runs/degradation", log=print, **options) -> dict:
    """Train ``plain{d}`` and ``resnet{d}`` for both depths the same way; write comparison plots and a summary.

    Returns ``{run_name: {"final_train_error", "best_val_error", "stem_grad_norm", "seconds"}}`` plus
    ``"findings"``: ``plain_degrades`` (the deep plain net ends at a higher training error than the shallow one),
    ``residual_beats_plain`` (the deep residual net lower than the deep plain one) and ``residual_improves`` (the
    deep residual net at most the shallow one's; the paper's, which takes far longer training to show), and writes
    ``OUT/summary.json``, ``OUT/train_error.png``, ``OUT/val_error.png``, ``OUT/grad_norms_stem.png``.
    """
    from resnetlab.api import train
    from resnetlab.models import list_models
    from resnetlab.report.plots import plot_compare

    if len(depths) != 2 or depths[0] >= depths[1]:
        raise ValueError(f"depths must be two CIFAR depths, shallow then deep (e.g. 20 56), got {list(depths)}")
    for d in depths:
        for kind in ("plain", "resnet"):
            if f"{kind}{d}" not in list_models():
                raise ValueError(f"no {kind}{d} in the registry; CIFAR depths with plain nets: 20, 32, 44, 56, 110")
    out = Path(out)
    # No augmentation or smoothing: training error then measures how well each net can be optimised.
    settings = {"epochs": epochs, "flip": False, "crop_pad": 0, "label_smoothing": 0.0, "seed": 0, "quiet": True,
                **options}
    curves: dict[str, list[dict]] = {}
    summary: dict[str, dict] = {}
    for kind in ("plain", "resnet"):
        for d in depths:
            name = f"{kind}{d}"
            log(f"training {name} ...")
            result = train(data, arch=name, out=str(out / name), log=lambda m: None, **settings)
            if result.interrupted:  # Ctrl-C / SIGTERM stops the whole experiment, not just this run
                raise KeyboardInterrupt
            metrics = read_jsonl(result.run_dir / "metrics.jsonl")
            for m in metrics:
                m["train_err"] = 1.0 - m["train_acc"]
                if "val_acc" in m:
                    m["val_err"] = 1.0 - m["val_acc"]
            curves[name] = metrics
            norms = read_jsonl(result.run_dir / "grad_norms.jsonl")
            stem = [r["norms"].get("stem", np.nan) for r in norms]
            summary[name] = {"final_train_error": metrics[-1]["train_err"],
                             "best_val_error": min(m.get("val_err", np.nan) for m in metrics),
                             "stem_grad_norm": float(np.nanmean(stem)) if stem else None,
                             "seconds": round(result.seconds, 1)}
            log(f"  {name}: train error {summary[name]['final_train_error']:.4f}, "
                f"best val error {summary[name]['best_val_error']:.4f}, mean stem grad norm "
                f"{summary[name]['stem_grad_norm']:.3g}, {result.seconds:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    plot_compare(curves, "train_err", out / "train_error.png", ylabel="training error")
    plot_compare(curves, "val_err", out / "val_error.png", ylabel="validation error")
    _plot_stem_norms(out, depths)
    shallow, deep = depths
    err = {name: s["final_train_error"] for name, s in summary.items()}
    summary["findings"] = {"plain_degrades": err[f"plain{deep}"] > err[f"plain{shallow}"],
                           "residual_beats_plain": err[f"resnet{deep}"] < err[f"plain{deep}"],
                           "residual_improves": err[f"resnet{deep}"] <= err[f"resnet{shallow}"]}
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    log(f"plain{deep} trains worse than plain{shallow}: {summary['findings']['plain_degrades']}; "
        f"resnet{deep} better than plain{deep}: {summary['findings']['residual_beats_plain']}; "
        f"resnet{deep} at least as well as resnet{shallow}: {summary['findings']['residual_improves']}; "
        f"plots in {out}")
    return summary


def _plot_stem_norms(out: Path, depths) -> Path:
    """Gradient norm reaching the stem over training, one line per run (log scale)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for kind, style in (("plain", "--"), ("resnet", "-")):
        for d in depths:
            rows = read_jsonl(out / f"{kind}{d}" / "grad_norms.jsonl")
            if rows:
                ax.plot([r["step"] for r in rows], [r["norms"].get("stem", np.nan) for r in rows], style,
                        label=f"{kind}{d}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("gradient L2 norm at the stem (log)")
    ax.set_title("How much gradient reaches the first layers")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / "grad_norms_stem.png"
    fig.savefig(path, dpi=110)
    return path
