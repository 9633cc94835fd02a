"""--crop-pct: evaluation and prediction scale an image to cover size / crop_pct and center-crop size, the
geometry of torchvision's ``Resize(int(size / crop_pct))`` + ``CenterCrop(size)`` (timm's eval transform)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

import resnetlab
from conftest import assert_one_line_error, run_cli
from resnetlab.data.images import decode_image


def _marker_image(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """A dark gradient with one bright rectangle ``(top, left, bottom, right)``."""
    img = np.tile(np.linspace(0, 60, w, dtype=np.float32), (h, 1))
    t, l, b, r = box
    img[t:b, l:r] = 255
    return np.repeat(img.astype(np.uint8)[:, :, None], 3, axis=2)


def _bright_box(x: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(x[0] > 160)
    return np.array([rows.min(), cols.min(), rows.max(), cols.max()])


@pytest.mark.parametrize(("h", "w", "box", "size", "crop_pct"), [
    (300, 200, (120, 60, 180, 120), 64, 0.875),
    (97, 131, (30, 50, 60, 90), 48, 0.875),
    (80, 80, (20, 25, 50, 60), 32, 0.9),
    (120, 90, (40, 30, 80, 60), 40, 0.5),
])
def test_crop_geometry_equals_torchvision_resize_and_center_crop(tmp_path, h, w, box, size, crop_pct):
    img = _marker_image(h, w, box)
    path = tmp_path / "m.png"
    Image.fromarray(img).save(path)
    ours = decode_image(path, (size, size), 3, crop_pct=crop_pct)
    ref = T.CenterCrop(size)(T.Resize(int(size / crop_pct), antialias=True)(torch.from_numpy(img).permute(2, 0, 1)))
    assert ours.shape == tuple(ref.shape) == (3, size, size)
    assert np.abs(_bright_box(ours) - _bright_box(ref.numpy())).max() <= 1
    if crop_pct <= 0.875 and size >= 64 or crop_pct <= 0.5:  # crop_pct 1 is a crop the test can tell apart here
        whole = decode_image(path, (size, size), 3)
        assert np.abs(_bright_box(whole) - _bright_box(ref.numpy())).max() > 1


def test_evaluate_and_predict_take_crop_pct(capsys, trained_run):
    result, data = trained_run
    files = [data / "c0" / "0.png", data / "c1" / "0.png"]
    whole = resnetlab.predict(result.run_dir, files, device="cpu", top_k=3)
    cropped = resnetlab.predict(result.run_dir, files, device="cpu", top_k=3, crop_pct=0.5)
    assert [r["top_k"] for r in whole] != [r["top_k"] for r in cropped]  # it reached the decoder
    code, _, err = run_cli(capsys, "evaluate", result.run_dir, "--data", data, "--crop-pct", "1.5", "--device", "cpu")
    assert code == 2
    assert_one_line_error(err, "--crop-pct must be in (0, 1], got 1.5")
