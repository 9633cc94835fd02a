"""Run directories for the deploy and explain tests: a registered model with fresh (seeded) weights, saved as a
resnetlab checkpoint with the pipeline config a real run would save. No training, so each takes milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from resnetlab.data.audio_pipeline import AudioPipeline
from resnetlab.data.image_pipeline import ImagePipeline
from resnetlab.models import create_model
from resnetlab.training.checkpoint import save_checkpoint


def make_run(root: Path, arch: str = "resnet20", *, modality: str = "image", num_classes: int = 3,
             img_size: int = 16, channels: int = 3, sample_rate: int = 8000, num_samples: int = 4000,
             layout: str = "2d", features: str = "logmel", normalize: str = "utterance", n_mels: int = 20,
             seed: int = 0) -> Path:
    """``root/checkpoints/best.safetensors`` for ``arch``; returns ``root`` (a run directory)."""
    torch.manual_seed(seed)
    classes = [f"c{i}" for i in range(num_classes)]
    if modality == "image":
        pipe = ImagePipeline((img_size, img_size), channels, [0.5] * channels, [0.25] * channels, num_classes)
        in_chans = channels
    else:
        pipe = AudioPipeline(num_classes=num_classes, sample_rate=sample_rate, num_samples=num_samples,
                             features=features, n_mels=n_mels, n_mfcc=n_mels, n_fft=256, win_length=200,
                             hop_length=80, layout=layout, normalize=normalize,
                             mean=-5.0 if normalize == "global" else None, std=3.0 if normalize == "global" else None)
        in_chans = 1 if layout == "2d" else n_mels
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans)
    with torch.no_grad():  # non-trivial BN statistics, so folding / eval-mode bugs would show
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    meta = {"arch": arch, "num_classes": num_classes, "in_chans": in_chans, "model_overrides": {},
            "classes": classes, "modality": modality, "pipeline": pipe.config()}
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(root / "checkpoints" / "best.safetensors", tensors, meta)
    return root


def write_image(path: Path, size: int = 20, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    shape = (size, size + 4, 3) if mode == "RGB" else (size, size + 4)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


def write_wave(path: Path, sample_rate: int = 8000, seconds: float = 0.4, freq: float = 600.0, seed: int = 0,
               **kw) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    wave = 0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)
    sf.write(path, wave.astype(np.float32), sample_rate, **kw)
    return path
