"""resnetlab: build, train and fine-tune residual networks for images and speech."""

from resnetlab.models import create_model, list_models, model_info

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "__version__"]
