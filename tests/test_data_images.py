"""Image decoding: every format and colour mode to the same pixels, resizing, header probing, and refusals."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hostile_files
import resnetlab.data.images as images
from resnetlab.data.errors import DataError
from resnetlab.data.images import decode_image, probe_images, read_header

RGB = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
GRAY = RGB[..., 1].copy()
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
LOSSLESS = {".png": {}, ".bmp": {}, ".webp": {"lossless": True}}


def _save(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` but that holds almost nothing: a decompression bomb's
    header without its payload."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("ext", sorted(LOSSLESS))
def test_lossless_formats_decode_exactly(tmp_path, ext):
    rgb = decode_image(_save(tmp_path / f"c{ext}", RGB, **LOSSLESS[ext]), None, 3)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 8, 8) and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, RGB.transpose(2, 0, 1))
    if ext != ".webp":  # WebP has no grayscale storage
        np.testing.assert_array_equal(decode_image(_save(tmp_path / f"g{ext}", GRAY), None, 1), GRAY[None])


def test_jpeg_decodes_close_to_the_source(tmp_path):
    smooth = np.broadcast_to(np.linspace(0, 255, 8, dtype=np.uint8)[None, :, None], (8, 8, 3)).copy()
    x = decode_image(_save(tmp_path / "s.jpg", smooth, quality=95), None, 3)
    assert x.shape == (3, 8, 8)
    assert np.abs(x.astype(int) - smooth.transpose(2, 0, 1)).mean() < 4
    assert decode_image(_save(tmp_path / "g.jpeg", GRAY), None, 1).shape == (1, 8, 8)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".webp"])
def test_gray_and_colour_convert_the_same_way_in_every_format(tmp_path, ext):
    colour = _save(tmp_path / f"c{ext}", RGB, **LOSSLESS[ext])
    luma = np.asarray(Image.fromarray(RGB).convert("L"))  # BT.601, PIL's rounding
    np.testing.assert_array_equal(decode_image(colour, None, 1), luma[None])
    if ext != ".webp":
        gray = decode_image(_save(tmp_path / f"g{ext}", GRAY), None, 3)
        np.testing.assert_array_equal(gray, np.stack([GRAY] * 3))


def test_torchvision_and_pil_paths_agree(tmp_path):
    rgba = np.dstack([RGB, np.linspace(0, 255, 64).astype(np.uint8).reshape(8, 8)])
    Image.fromarray(RGB).convert("P").save(tmp_path / "p.png")
    for path in (_save(tmp_path / "a.png", rgba), _save(tmp_path / "a.webp", rgba, lossless=True),
                 _save(tmp_path / "g.png", GRAY), tmp_path / "p.png"):
        header = read_header(path)
        for channels in (1, 3):
            via_torchvision = images._to_channels(images._decode_torchvision(str(path), header), channels)
            via_pil = images._to_channels(images._decode_pil(str(path), header), channels)
            np.testing.assert_array_equal(via_torchvision.numpy(), via_pil.numpy(), err_msg=f"{path} {channels}")


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent black
    for path in (_save(tmp_path / "a.png", rgba), _save(tmp_path / "a.webp", rgba, lossless=True)):
        x = decode_image(path, None, 3)
        assert (x[:, :4] == np.array([200, 0, 0])[:, None, None]).all()
        assert (x[:, 4:] == 255).all()
    palette = Image.fromarray(RGB).convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # one palette entry transparent
    palette.save(tmp_path / "p.png", transparency=palette.info["transparency"])
    assert (decode_image(tmp_path / "p.png", None, 3)[:, 0, 0] == 255).all()


def test_sixteen_bit_png_keeps_the_high_byte(tmp_path):
    deep = GRAY.astype(np.uint16) * 256 + 100  # low byte 100, dropped
    np.testing.assert_array_equal(decode_image(_save(tmp_path / "d.png", deep), None, 1), GRAY[None])


def test_exif_orientation_is_applied(tmp_path):
    wide = np.zeros((4, 8, 3), np.uint8)
    wide[:, :4] = 255  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    for ext in (".jpg", ".png"):
        path = tmp_path / f"r{ext}"
        Image.fromarray(wide).save(path, exif=exif)
        header = read_header(path)
        assert (header.height, header.width) == (8, 4)
        x = decode_image(path, None, 3)
        assert x.shape == (3, 8, 4)
        assert x[:, :3].mean() > 200 and x[:, 5:].mean() < 50  # the white half is now on top


def test_resize_covers_then_center_crops(tmp_path):
    wide = np.zeros((8, 16), np.uint8)
    wide[:, 2:14] = 255  # black borders left and right, white center
    path = _save(tmp_path / "w.png", wide)
    x = decode_image(path, (4, 4), 1)
    assert x.shape == (1, 4, 4) and (x == 255).all()  # shorter side to 4 (4x8), then the center 4x4
    whole = decode_image(path, (4, 8), 1)  # same aspect ratio: scaled, nothing cropped
    assert whole.shape == (1, 4, 8) and whole[0, :, 0].max() < 128 and (whole[0, :, 3:5] == 255).all()
    assert decode_image(path, (16, 16), 3).shape == (3, 16, 16)  # upscaled
    tall = decode_image(path, (12, 4), 1)  # a tall target keeps the height, crops the width
    assert tall.shape == (1, 12, 4) and (tall == 255).all()


def test_argument_checks(tmp_path):
    path = _save(tmp_path / "c.png", RGB)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        decode_image(path, None, 4)
    with pytest.raises(ValueError, match="size must be"):
        decode_image(path, (0, 8), 3)


# --- refusals --------------------------------------------------------------------------------------------------


def test_declared_size_beyond_max_pixels_is_refused_before_decoding(tmp_path):
    path = _png_header(tmp_path / "bomb.png", 8000, 8000)  # 64 M pixels declared, 100 bytes on disk
    with pytest.raises(DataError, match=r"bomb.png: image too large \(8000x8000 = 64,000,000 pixels"):
        decode_image(path, (8, 8), 1)


def test_size_beyond_pils_own_limit_is_refused_too(tmp_path):
    path = _png_header(tmp_path / "huge.png", 100_000, 100_000)
    with pytest.raises(DataError, match=r"huge.png: image too large \(10,000,000,000 pixels declared"):
        decode_image(path, None, 1)


def test_max_pixels_is_read_at_call_time(tmp_path, monkeypatch):
    path = _save(tmp_path / "c.png", RGB)
    monkeypatch.setattr(images, "MAX_PIXELS", 63)
    with pytest.raises(DataError, match="c.png: image too large"):
        decode_image(path, None, 3)
    monkeypatch.setattr(images, "MAX_PIXELS", 64)
    assert decode_image(path, None, 3).shape == (3, 8, 8)


def _truncated(path: Path, array: np.ndarray) -> Path:
    _save(path, array)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "empty file"),
    (b"just some text", "not a recognised image"),
    (None, "cannot read"),  # missing
])
def test_unreadable_files_name_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=f"bad.png: {reason}") as info:
        decode_image(path, None, 3)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["eps", "ppm", "ico"])  # (TIFF is read since issue 16)
def test_formats_resnetlab_does_not_read_are_refused_whatever_the_name(tmp_path, monkeypatch, kind):
    """An EPS named x.png opened as EPS, and decoding it ran Ghostscript where it is installed."""
    from PIL import EpsImagePlugin

    gs_calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: gs_calls.append(a))
    path = tmp_path / "x.png"
    if kind == "eps":
        path.write_bytes(hostile_files.EPS)
    else:
        Image.fromarray(RGB).save(path, format=kind.upper())
    for call in (read_header, lambda p: decode_image(p, (8, 8), 3)):
        with pytest.raises(DataError, match="x.png: not a recognised image format .*PNG, JPEG") as info:
            call(path)
        assert "\n" not in str(info.value)
    assert not gs_calls


@pytest.mark.parametrize("fmt", images.IMAGE_FORMATS)
def test_every_listed_format_opens_under_any_name(tmp_path, fmt):
    path = tmp_path / "named.png"
    Image.fromarray(RGB).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert read_header(path).format == fmt
    assert decode_image(path, None, 3).shape == (3, 8, 8)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_truncated_files_name_file_and_reason(tmp_path, ext):
    noisy = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(DataError, match=f"cut{ext}: .*truncated") as info:
        decode_image(_truncated(tmp_path / f"cut{ext}", noisy), None, 3)
    assert "\n" not in str(info.value)


# --- probing ---------------------------------------------------------------------------------------------------


def test_probe_images_medians_and_channels(tmp_path):
    paths = [_save(tmp_path / f"g{i}.png", np.zeros((h, w), np.uint8))
             for i, (h, w) in enumerate([(10, 20), (12, 30), (14, 40), (100, 10)])]
    assert probe_images(paths) == {"height": 12, "width": 20, "channels": 1, "n_probed": 4}
    paths.append(_save(tmp_path / "c.jpg", np.zeros((14, 14, 3), np.uint8)))
    paths.append(_png_header(tmp_path / "bomb.png", 8000, 8000))  # unreadable: skipped
    (tmp_path / "junk.png").write_text("junk")
    paths.append(tmp_path / "junk.png")
    probe = probe_images(paths)
    assert probe["channels"] == 3 and probe["n_probed"] == 5 and probe["height"] == 14


def test_probe_images_samples_deterministically(tmp_path):
    paths = [_save(tmp_path / f"{i}.png", np.zeros((4 + i, 4), np.uint8)) for i in range(12)]
    assert probe_images(paths, max_files=5, seed=1) == probe_images(paths[::-1], max_files=5, seed=1)
    assert probe_images(paths, max_files=5)["n_probed"] == 5


def test_probe_images_with_nothing_readable(tmp_path):
    (tmp_path / "junk.png").write_text("junk")
    with pytest.raises(DataError, match="none of the 1 probed files"):
        probe_images([tmp_path / "junk.png"])
    with pytest.raises(DataError, match="no image files"):
        probe_images([])
