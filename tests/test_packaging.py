"""Packaging: what ``pip install .`` brings (pyproject's dependencies) is enough to train and predict; the optional
libraries (the extras, and the test-only ones) are imported only where they are used."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
# Every optional package src/ imports anywhere (the extras' and the dev extra's), plus the loggers' back ends.
OPTIONAL = ("h5py", "onnx", "onnxruntime", "onnxscript", "librosa", "timm", "transformers", "keras", "tensorboard",
            "wandb", "mlflow")


def test_pyproject_declares_pillow_and_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert "pillow" in names  # data/images.py imports PIL at module level
    assert not names & set(OPTIONAL)
    extras = project["optional-dependencies"]
    assert any(d.startswith("h5py") for d in extras["keras"])
    assert any(d.startswith("tensorboard") for d in extras["log"])
    assert any(d.startswith("onnxruntime") for d in extras["export"])


def test_train_and_predict_without_any_optional_package(tmp_path):
    """A child process in which importing any optional package fails (``sys.modules[name] = None`` makes
    ``import name`` raise ImportError, as if it were not installed) trains one tiny epoch and predicts."""
    from conftest import write_class_folders

    data = write_class_folders(tmp_path / "data", classes=2, per_class=4, size=8)
    script = textwrap.dedent(f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None
        import torch
        torch.set_num_threads(1)
        import resnetlab
        run = {str(tmp_path / "run")!r}
        resnetlab.train({str(data)!r}, arch="resnet20", img_size=8, batch_size=4, epochs=1, device="cpu",
                        precision="fp32", channels_last=False, quiet=True, cache_dir={str(tmp_path / "cache")!r},
                        out=run, val_fraction=0.25)
        out = resnetlab.predict(run, {str(data / "c0")!r}, top_k=1, device="cpu")
        assert len(out) == 4 and all("top_k" in r for r in out), out
        loaded = sorted(n for n in {OPTIONAL!r} if sys.modules.get(n) is not None)
        assert not loaded, loaded
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
