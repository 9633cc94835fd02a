"""Shared fixtures: tiny synthetic image datasets that a ResNet-20 learns in a few epochs on a CPU.

Each class is a distinct bright half of an otherwise dark, noisy image (top, bottom, left, right ...), so the
classes are separable from the first epochs even at 8x8 pixels, and every file is a real PNG.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The tests' models are tiny: one thread per process is faster than several fighting over shared cores.
torch.set_num_threads(1)

# The bright region of each class, as (row slice, column slice) fractions of the image.
_PATTERNS = [
    ((0.0, 0.5), (0.0, 1.0)),  # top half
    ((0.5, 1.0), (0.0, 1.0)),  # bottom half
    ((0.0, 1.0), (0.0, 0.5)),  # left half
    ((0.0, 1.0), (0.5, 1.0)),  # right half
]


def synthetic_image(label: int, size: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """uint8 (H, W[, C]) image of class ``label``: a bright region on a dark background, plus noise."""
    (r0, r1), (c0, c1) = _PATTERNS[label % len(_PATTERNS)]
    img = np.full((size, size), 40.0)
    img[int(r0 * size):int(r1 * size), int(c0 * size):int(c1 * size)] = 215.0
    img = img + rng.normal(0, 12, size=(size, size))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img if channels == 1 else np.repeat(img[:, :, None], channels, axis=2)


def write_class_folders(root: Path, *, classes: int = 3, per_class: int = 6, size: int = 16, seed: int = 0,
                        channels: int = 3) -> Path:
    """``root/<class>/<i>.png`` for ``classes`` classes named ``c0``, ``c1`` ..."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        d = root / f"c{label}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(synthetic_image(label, size, rng, channels)).save(d / f"{i}.png")
    return root


@pytest.fixture
def make_dataset(tmp_path):
    """Factory: ``make_dataset(layout="folders"|"split"|"csv", **kw)`` writes a dataset under tmp_path and
    returns the path to pass as ``data`` (the folder, or the CSV manifest)."""
    counter = iter(range(1000))

    def make(layout: str = "folders", *, classes: int = 3, per_class: int = 6, size: int = 16, seed: int = 0,
             val_per_class: int = 2) -> Path:
        root = tmp_path / f"data{next(counter)}"
        if layout == "folders":
            return write_class_folders(root, classes=classes, per_class=per_class, size=size, seed=seed)
        if layout == "split":
            write_class_folders(root / "train", classes=classes, per_class=per_class, size=size, seed=seed)
            write_class_folders(root / "val", classes=classes, per_class=val_per_class, size=size, seed=seed + 1)
            return root
        if layout == "csv":
            write_class_folders(root / "images", classes=classes, per_class=per_class, size=size, seed=seed)
            manifest = root / "labels.csv"
            with open(manifest, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "label"])
                for label in range(classes):
                    for i in range(per_class):
                        w.writerow([f"images/c{label}/{i}.png", f"c{label}"])
            return manifest
        raise ValueError(f"unknown layout {layout!r}")

    return make


@pytest.fixture
def tiny_data(make_dataset) -> Path:
    """3 classes x 6 images of 16x16, as class folders."""
    return make_dataset("folders")


class FakeClock:
    """``time`` for the engine: every ``perf_counter()`` call moves the clock on by ``tick`` seconds, so a time-
    budget run takes the same path on any machine, however loaded."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``resnetlab ARGV`` in this process: the exit code, stdout and stderr."""
    from resnetlab.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> str:
    """``err`` is one line, no traceback, holding every fragment; returns the line."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], f"{f!r} not in {lines[0]!r}"
    return lines[0]


def options_argv(options: dict) -> list[str]:
    """``{"batch_size": 4, "flip": False}`` -> ``["--batch-size", "4", "--no-flip"]``."""
    argv = []
    for k, v in options.items():
        opt = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(opt if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [opt, str(v)]
    return argv


def train_argv(tmp_path: Path, data: Path, **overrides) -> list[str]:
    """``resnetlab train`` arguments for a tiny run (``tiny_options``) on ``data``."""
    return ["train", "--data", str(data), *options_argv(tiny_options(tmp_path, **overrides))]


def tiny_options(tmp_path: Path, **overrides) -> dict:
    """Keyword options for ``resnetlab.train`` that keep a run at a few seconds on two CPU cores."""
    opts = dict(arch="resnet20", img_size=16, batch_size=4, epochs=2, device="cpu", precision="fp32",
                channels_last=False, quiet=True, cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "run"),
                lr=0.05, warmup_epochs=0.0, val_fraction=0.34, grad_norm_every=2)
    opts.update(overrides)
    return opts


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test run gets its own RESNETLAB_CACHE, so nothing is read from or written to ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RESNETLAB_CACHE", str(tmp_path_factory.mktemp("resnetlab-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One short run on the easy data set, shared by the evaluate / predict / CLI tests (read-only for them).

    Returns ``(result, data_dir)``."""
    import resnetlab

    base = tmp_path_factory.mktemp("trained")
    data = write_class_folders(base / "data", per_class=12, seed=3)
    result = resnetlab.train(str(data), log=lambda m: None,
                             **tiny_options(base, epochs=5, batch_size=4, lr=0.02, flip=False))
    return result, data


@pytest.fixture(scope="session")
def held_out_data(tmp_path_factory) -> Path:
    """The classes of ``trained_run``'s data, 12 new images each (another seed): files the shared run never saw."""
    return write_class_folders(tmp_path_factory.mktemp("held_out") / "data", per_class=12, seed=4)
