"""Explanations of predictions: Grad-CAM over the last stage and input saliency (see :mod:`.gradcam`)."""

from resnetlab.explain.gradcam import Explanation, explain_batch, explain_files, explain_raw, overlay_examples

__all__ = ["Explanation", "explain_batch", "explain_raw", "explain_files", "overlay_examples"]
