"""Pipelines: what turns a batch from the cache into model input, on the device.

Data flows one way: files -> cache (compact uint8 images / int16 waves) -> batches on the device ->
``Pipeline`` (augment, features, normalise) -> model. A pipeline is described by a JSON-able ``config()``
that is saved in every checkpoint, so ``predict`` and ``serve`` rebuild exactly what training used.

The base class and ``register_pipeline`` live in :mod:`resnetlab.data.pipeline_base` (re-exported here); this
module imports the built-in pipelines when it builds one, and they never import it.
"""

from __future__ import annotations

from resnetlab.data.pipeline_base import _PIPELINES, Pipeline, register_pipeline

__all__ = ["Pipeline", "register_pipeline", "build_pipeline"]


def build_pipeline(config: dict) -> Pipeline:
    """Rebuild a pipeline from its ``config()`` (as stored in a checkpoint)."""
    import resnetlab.data.audio_pipeline  # noqa: F401  (registers the audio pipeline)
    import resnetlab.data.image_pipeline  # noqa: F401  (registers the image pipeline)

    modality = config.get("modality")
    if modality not in _PIPELINES:
        raise ValueError(f"unknown pipeline modality {modality!r}; known: {', '.join(sorted(_PIPELINES))}")
    return _PIPELINES[modality].from_config(config)
