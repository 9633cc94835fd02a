"""Metrics, figures and the HTML run report.

``metrics`` turns logits and labels into numbers, ``plots`` turns numbers into PNGs (one function, one file),
``html`` gathers a run directory into ``report/index.html``. The training engine calls all three.
"""

from resnetlab.report.html import load_metrics, write_report
from resnetlab.report.metrics import (
    confusion_matrix,
    dedupe_epochs,
    format_report_table,
    per_class_report,
    summary_from_confusion,
    topk_accuracy,
)
from resnetlab.report.plots import (
    plot_compare,
    plot_confusion,
    plot_curves,
    plot_grad_norms,
    plot_lr_find,
    plot_misclassified,
    plot_per_class,
    plot_spectrograms,
)

__all__ = [
    "topk_accuracy", "confusion_matrix", "per_class_report", "summary_from_confusion", "format_report_table",
    "dedupe_epochs", "plot_curves", "plot_confusion", "plot_per_class", "plot_misclassified", "plot_grad_norms",
    "plot_spectrograms", "plot_lr_find", "plot_compare", "write_report", "load_metrics",
]
