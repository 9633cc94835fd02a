"""Image decoding: one file becomes a uint8 ``(C, H, W)`` array, after its header has been checked.

Decoding goes through ``torchvision.io`` (libpng, libjpeg-turbo, libwebp; they release the GIL, so threads help)
and falls back to PIL for what torchvision cannot read (BMP, odd JPEG variants). Every colour conversion happens
in one place after decoding, so all formats and both decoders give the same pixels:

- EXIF orientation is applied (a phone photo stands the way it was taken).
- Alpha is composited onto white: a transparent background reads as white paper, as a viewer shows it, rather
  than as whatever colour happens to sit under alpha 0.
- ``channels=1`` from colour is ITU-R BT.601 luma with PIL's fixed-point rounding (the same as ``convert("L")``);
  ``channels=3`` from gray replicates the gray plane.
- 16-bit samples keep their high byte.

With a target ``size`` the image is scaled (antialiased bilinear) to the smallest size that covers the target,
which for a square target means its shorter side matches, then center-cropped: the aspect ratio is kept and the
borders of the longer side are lost.
"""

from __future__ import annotations

import os
import random
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.io
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from resnetlab.data.errors import DataError

MAX_PIXELS = 50_000_000  # images whose header declares more are refused before decoding (decompression bombs)
# The only formats PIL may open (Image.open's ``formats=``), whatever a file is named: PIL otherwise identifies a
# file by its content among some 40 formats, so an EPS named x.png would open as EPS and decoding it would run
# Ghostscript. Camera JPEGs that PIL reports as "MPO" open through the JPEG plugin. GIF: what uploads may be.
# TIFF (scans, microscopy) and GIF decode their first page / frame only.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")
# The file suffixes datasets and predict take as images (data/layout.py's IMAGE_EXTS): one per format above.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Bump when decoding changes what a file decodes to (colour conversion, resizing, EXIF handling): part of the cache
# key, so caches built by an older decoder are not reused (data/prepare.py adds it with the libraries' versions).
DECODER_VERSION = 1

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# torchvision 0.29 deprecates its image decoders in favour of TorchCodec; PIL takes over if they disappear.
# Not PNG: torchvision's libpng wrapper crashes the process (SIGSEGV after "libpng error: IDAT: incorrect data
# check") on damaged files, which tests/test_fuzz.py finds within seconds; PIL decodes PNG as fast and raises.
_TORCHVISION_FORMATS = frozenset({"JPEG", "WEBP"}) if hasattr(torchvision.io, "decode_image") else frozenset()
_EXIF_ORIENTATION = 0x0112


def decoder_versions() -> dict[str, str | int]:
    """What decides the pixels a file decodes to, for the cache key: ``DECODER_VERSION`` and the versions of the
    decoding libraries (Pillow; torchvision, whose libjpeg-turbo and libwebp decode JPEG and WebP)."""
    import PIL

    return {"images": DECODER_VERSION, "Pillow": PIL.__version__, "torchvision": torchvision.__version__}


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding its pixels."""

    format: str  # PIL's format name: "PNG", "JPEG", "WEBP", "BMP", ...
    height: int  # after EXIF orientation
    width: int
    mode: str  # PIL's mode: "L", "RGB", "RGBA", "P", "I;16", ...
    gray: bool
    alpha: bool


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Read an image's format, size and colour mode from its header only, refusing oversized images.

    Raises ``DataError`` naming the file for a missing, empty or unrecognised file, and for an image whose header
    declares more than ``MAX_PIXELS`` pixels (a decompression bomb: a few kilobytes that decode to gigabytes).
    """
    path = os.fspath(path)
    try:
        nbytes = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if nbytes == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        # PIL warns above Image.MAX_IMAGE_PIXELS, which is beyond MAX_PIXELS: such files are refused below anyway.
        # (Not silenced with warnings.catch_warnings, which is not thread-safe and decoding runs in threads.)
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            width, height, mode, fmt = im.width, im.height, im.mode, im.format or "?"
            alpha = mode in _ALPHA_MODES or "transparency" in im.info
            if _exif_orientation(im.info.get("exif")) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
    except Image.DecompressionBombError as e:  # PIL's own, harder limit (2 * Image.MAX_IMAGE_PIXELS)
        declared = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(declared.group(1)):,} pixels" if declared else "size beyond PIL's limit"
        raise DataError(f"{path}: image too large ({size} declared, limit {MAX_PIXELS:,}); "
                        "refusing to decode") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a recognised image format (resnetlab reads {', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:  # PIL raises many types for corrupt headers
        raise DataError(f"{path}: unreadable image header ({_one_line(e)})") from None
    if width * height > MAX_PIXELS:
        raise DataError(f"{path}: image too large ({width}x{height} = {width * height:,} pixels, "
                        f"limit {MAX_PIXELS:,}); refusing to decode")
    if width == 0 or height == 0:
        raise DataError(f"{path}: image has zero size ({width}x{height})")
    return ImageHeader(fmt, height, width, mode, mode in _GRAY_MODES, alpha)


def decode_image(path: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3,
                 crop_pct: float = 1.0) -> np.ndarray:
    """Decode an image file to a uint8 ``(channels, H, W)`` array.

    ``size`` is ``(height, width)``; when given and different from the image's, the image is scaled to cover it
    (antialiased) and center-cropped. ``crop_pct`` < 1 scales it to cover ``size / crop_pct`` instead (rounded
    down), then center-crops ``size``: timm's and torchvision's evaluation crop (``Resize(int(224 / 0.875))`` then
    ``CenterCrop(224)``). ``channels`` is 1 (gray) or 3 (RGB); see the module docstring for the
    conversions. Raises ``DataError`` naming the file for an empty, non-image, corrupt or truncated file and for
    one larger than ``MAX_PIXELS`` (checked from the header, before decoding).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if size is not None:
        if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
            raise ValueError(f"size must be (height, width) with positive ints, got {size}")
        size = (int(size[0]), int(size[1]))
    path = os.fspath(path)
    header = read_header(path)
    x = None
    if header.format in _TORCHVISION_FORMATS:
        try:
            x = _decode_torchvision(path, header)
        except RuntimeError:
            x = None  # PIL decides; its error message is the clearer one when the file is really broken
    if x is None:
        x = _decode_pil(path, header)
    x = _to_channels(x, channels)
    if size is not None and (tuple(x.shape[-2:]) != size or crop_pct < 1):
        x = _cover_crop(x, size, crop_pct)
    return np.ascontiguousarray(x.numpy())


def probe_images(paths: Sequence[str | os.PathLike], max_files: int = 200, seed: int = 0) -> dict:
    """Typical size and colour of a set of images, from the headers of a seeded sample of at most ``max_files``.

    Returns ``{"height", "width", "channels", "n_probed"}``: the median height and width (the lower median, an
    actual image's size), 1 channel if every probed image is stored as grayscale (an RGB file with gray content
    counts as colour) else 3, and how many headers were read. Unreadable files are skipped; if none is readable,
    ``DataError``.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise DataError("probe_images: no image files given")
    sample = paths if len(paths) <= max_files else random.Random(seed).sample(sorted(paths), max_files)
    headers = []
    for p in sample:
        try:
            headers.append(read_header(p))
        except DataError:
            continue
    if not headers:
        raise DataError(f"none of the {len(sample)} probed files is a readable image (e.g. {sample[0]})")
    return {
        "height": int(statistics.median_low(h.height for h in headers)),
        "width": int(statistics.median_low(h.width for h in headers)),
        "channels": 1 if all(h.gray for h in headers) else 3,
        "n_probed": len(headers),
    }


def _decode_torchvision(path: str, header: ImageHeader) -> torch.Tensor:
    if header.alpha and header.format != "JPEG":
        mode = torchvision.io.ImageReadMode.RGB_ALPHA
    elif header.gray and header.format in ("PNG", "JPEG"):  # libwebp has no gray output
        mode = torchvision.io.ImageReadMode.GRAY
    else:
        mode = torchvision.io.ImageReadMode.RGB
    x = torchvision.io.decode_image(torchvision.io.read_file(path), mode=mode, apply_exif_orientation=True)
    if x.dtype == torch.uint16:
        x = (x.to(torch.int32) >> 8).to(torch.uint8)
    return x


def _decode_pil(path: str, header: ImageHeader) -> torch.Tensor:
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode.startswith("I"):  # 16/32-bit integer gray: keep the high byte of the 16-bit range
                a = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
            else:
                a = np.array(im.convert("RGBA" if header.alpha else "L" if header.gray else "RGB"))
    except Exception as e:  # PIL raises many types for corrupt data
        raise DataError(f"{path}: corrupt or truncated {header.format} image ({_one_line(e)})") from None
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a))


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (1|2|3|4, H, W) -> uint8 (channels, H, W): alpha onto white, then luma or replication."""
    if x.shape[0] in (2, 4):
        color, alpha = x[:-1].to(torch.int32), x[-1:].to(torch.int32)
        x = ((color * alpha + 255 * (255 - alpha) + 127) // 255).to(torch.uint8)
    if x.shape[0] == 3 and channels == 1:
        r, g, b = x.to(torch.int32)
        x = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[None]  # PIL's BT.601 luma
    elif x.shape[0] == 1 and channels == 3:
        x = x.expand(3, -1, -1)
    return x


def _cover_crop(x: torch.Tensor, size: tuple[int, int], crop_pct: float = 1.0) -> torch.Tensor:
    """Scale to the smallest size covering ``size / crop_pct`` (aspect kept, antialiased), then center-crop
    ``size``."""
    (th, tw), (h, w) = size, x.shape[-2:]
    scale = max(int(th / crop_pct) / h, int(tw / crop_pct) / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.resize(x.contiguous(), [nh, nw], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(x, [th, tw])


def _exif_orientation(exif_bytes: bytes | None) -> int:
    if not exif_bytes:
        return 1
    try:
        exif = Image.Exif()
        exif.load(exif_bytes)
        return int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make the image unreadable
        return 1


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
