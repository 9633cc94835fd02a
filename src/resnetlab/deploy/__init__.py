"""Deployment: export with preprocessing (:mod:`.export`), fast repeated inference (:mod:`.predictor`) and an
HTTP server with a web page (:mod:`.serve`). Heavy or optional imports (onnx, onnxruntime) happen on use."""

from resnetlab.deploy.export import FORMATS, ExportedModel, export_model, read_export_metadata
from resnetlab.deploy.predictor import BACKENDS, Predictor

__all__ = ["FORMATS", "BACKENDS", "ExportedModel", "Predictor", "export_model", "read_export_metadata"]
