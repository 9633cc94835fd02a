"""Hostile files for the decoder and loader tests, the wall-clock fuzzer and benchmarks/bench_hostile_files.py.

Each builder returns the file's bytes (or writes a folder) and is deterministic. They forge headers by hand, because
the libraries that write these formats refuse to write such values.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np


def wav(rate: int = 16000, frames: int = 800, channels: int = 1, *, block_align: int | None = None,
        data_size: int | None = None, bits: int = 16) -> bytes:
    """A PCM WAV whose header fields may lie: ``rate``, ``channels``, ``block_align`` and the data chunk's size are
    written as given, the samples (a quiet ramp) as ``frames`` x ``channels`` 16-bit values."""
    ch = max(channels, 1)
    align = 2 * ch if block_align is None else block_align
    fmt = struct.pack("<HHIIHH", 1, channels, rate & 0xFFFFFFFF, (rate * align) & 0xFFFFFFFF, align & 0xFFFF, bits)
    data = (np.arange(frames * ch, dtype=np.int64) % 200 - 100).astype("<i2").tobytes()
    size = len(data) if data_size is None else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", size & 0xFFFFFFFF) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def flac(rate: int = 8000, frames: int = 800, *, declared_frames: int | None = None, declared_rate: int | None = None,
         declared_channels: int | None = None) -> bytes:
    """A real FLAC (written by libsndfile) with fields of its STREAMINFO block overwritten: the total sample count
    (36 bits), the sample rate (20 bits) and the channel count (3 bits, 1..8)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (np.sin(np.arange(frames) / 5) * 0.5).astype(np.float32), rate, format="FLAC", subtype="PCM_16")
    b = bytearray(buf.getvalue())
    # "fLaC", then the STREAMINFO header (4 bytes); its bytes 10..17 hold rate:20 channels-1:3 bps-1:5 total:36
    packed = int.from_bytes(b[18:26], "big")
    r, c, bps, total = packed >> 44, (packed >> 41) & 7, (packed >> 36) & 31, packed & ((1 << 36) - 1)
    if declared_rate is not None:
        r = declared_rate & 0xFFFFF
    if declared_channels is not None:
        c = (declared_channels - 1) & 7
    if declared_frames is not None:
        total = declared_frames & ((1 << 36) - 1)
    b[18:26] = ((r << 44) | (c << 41) | (bps << 36) | total).to_bytes(8, "big")
    return bytes(b)


def png(width: int = 12, height: int = 10, *, declared: tuple[int, int] | None = None) -> bytes:
    """A small gray PNG; with ``declared=(width, height)`` its IHDR says another size (the CRC is made to match)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.arange(width * height) % 251).astype(np.uint8).reshape(height, width)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    if declared is not None:
        b[16:24] = struct.pack(">II", *declared)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def big_png(side: int = 7000) -> bytes:
    """A ``side`` x ``side`` black gray PNG: 49 megapixels in about 50 KB (just under the 50 MP limit)."""
    row = b"\x00" + bytes(side)  # filter byte + pixels
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")  # what a file named x.png may hold


def keras_zip_bomb(member_bytes: int = 512 << 20, name: str = "model.weights.h5") -> bytes:
    """A .keras archive whose weights member inflates to ``member_bytes`` zeros (deflate: about 1,000 to 1)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("metadata.json", "{}")
        with z.open(name, "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(member_bytes >> 20):
                f.write(chunk)
    return buf.getvalue()


def keras_lying_zip(real_bytes: int = 4 << 20, declared: int = 1000) -> bytes:
    """A .keras archive whose weights member says it holds ``declared`` bytes but inflates to ``real_bytes``."""
    b = bytearray(keras_zip_bomb(real_bytes))
    name = b"model.weights.h5"
    cd = b.rindex(b"PK\x01\x02")  # the central directory entry of the last member, which ZipFile reads
    assert b[cd + 46:cd + 46 + len(name)] == name
    if struct.unpack("<I", b[cd + 24:cd + 28])[0] == 0xFFFFFFFF:  # the size is in the ZIP64 extra field
        extra = cd + 46 + len(name)
        b[extra + 4:extra + 12] = struct.pack("<Q", declared)
    else:
        b[cd + 24:cd + 28] = struct.pack("<I", declared)
    return bytes(b)


def h5_external_link(path: Path, target: str = "/etc/passwd") -> Path:
    """An HDF5 file shaped like Keras 3 weights whose ``layers`` group is an external link to ``target``."""
    import h5py

    with h5py.File(path, "w") as f:
        f["layers"] = h5py.ExternalLink(target, "/")
    return path


def h5_soft_link_cycle(path: Path) -> Path:
    """An HDF5 file whose group holds a soft link to the root: a walker that follows links never ends."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_group("layers/sub")
        f["layers/sub/loop"] = h5py.SoftLink("/layers")
    return path


def shard_folder(root: Path, shard_name: str = "../outside.safetensors") -> Path:
    """A Hugging Face style folder whose ``model.safetensors.index.json`` names ``shard_name`` as a shard."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"conv1.weight": shard_name}}))
    return root / "model.safetensors.index.json"
