"""resnetlab: build, train and fine-tune residual networks for images and speech.

    import resnetlab
    model = resnetlab.create_model("resnet50", num_classes=10)
    run = resnetlab.train("builtin:digits", epochs=3)
    resnetlab.predict(run.run_dir, ["digit.png"])
"""

from resnetlab.models import create_model, list_models, model_info

__version__ = "0.1.0"
_API = ("train", "finetune", "evaluate", "predict", "load_model", "lr_find", "load_pretrained", "model_from_pretrained")
__all__ = ["create_model", "list_models", "model_info", *_API, "__version__"]


def __getattr__(name):
    # The training API imports the data and training stack; load it on first use so `import resnetlab`
    # stays quick for model-only users.
    if name in ("load_pretrained", "model_from_pretrained"):
        from resnetlab.models import pretrained

        return getattr(pretrained, name)
    if name in _API:
        from resnetlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'resnetlab' has no attribute {name!r}")
