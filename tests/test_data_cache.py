"""The decode-once cache: layout on disk, hits, invalidation, atomic builds, skipped files, strict mode."""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnetlab.data.cache import ArrayDataset, build_cache, default_cache_root
from resnetlab.data.errors import DataError
from resnetlab.data.images import decode_image

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
CLASSES = ["a", "b"]
SHAPE = (3, 8, 8)
KEY = {"modality": "image", "size": [8, 8], "channels": 3}
decode_rgb8 = functools.partial(decode_image, size=(8, 8), channels=3)


def _images(folder: Path, n: int = 6) -> list[tuple[str, int]]:
    """``n`` lossless PNG/BMP/WebP files, gray and colour, 8x8 or 8x12; the first row of image i is i * 10."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        ext = [".png", ".bmp", ".webp", ".png"][i % 4]
        a = np.full((8, 12 if i % 3 == 2 else 8, 3), 7, np.uint8)
        a[:, :, 1] = 50
        a[0] = i * 10  # the whole first row, which survives the center crop of the wider images
        if i % 2:
            a = a[..., 0]  # grayscale
        path = folder / f"img{i}{ext}"
        Image.fromarray(a).save(path, **({"lossless": True} if ext == ".webp" else {}))
        items.append((str(path), i % 2))
    return items


def _build(items, root, **kwargs) -> ArrayDataset:
    kwargs.setdefault("key", KEY)
    return build_cache(items, kwargs.pop("decode", decode_rgb8), SHAPE, np.uint8, root, classes=CLASSES,
                       progress=False, **kwargs)


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


class CountingDecode:
    def __init__(self, fn=decode_rgb8):
        self.fn, self.calls = fn, 0

    def __call__(self, path: str) -> np.ndarray:
        self.calls += 1
        return self.fn(path)


def test_build_then_hit(tmp_path):
    items, root = _images(tmp_path / "img"), tmp_path / "cache"
    decode = CountingDecode()
    ds = _build(items, root, decode=decode)
    assert isinstance(ds.x, np.memmap) and not ds.x.flags.writeable
    assert ds.x.shape == (6, *SHAPE) and ds.x.dtype == np.uint8
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [0, 1, 0, 1, 0, 1] and len(ds) == 6
    assert ds.files == [p for p, _ in items] and ds.skipped == [] and ds.classes == CLASSES
    assert [int(v) for v in ds.x[:, 0, 0, 0]] == [0, 10, 20, 30, 40, 50]  # order of items kept
    assert ds.meta["cache_hit"] is False and decode.calls == 6

    folder = root / ds.meta["digest"][:16]
    assert _entries(root) == [folder.name]  # no temporary folder left behind
    assert _entries(folder) == ["meta.json", "x.npy", "y.npy"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["key"] == KEY and meta["files"] == ds.files and meta["classes"] == CLASSES

    again = _build(items, root, decode=decode)
    assert again.meta["cache_hit"] is True and decode.calls == 6  # nothing decoded the second time
    np.testing.assert_array_equal(again.x, ds.x)
    assert again.files == ds.files and again.meta["digest"] == ds.meta["digest"]


def test_changes_invalidate(tmp_path):
    items, root = _images(tmp_path / "img"), tmp_path / "cache"
    digests = {_build(items, root).meta["digest"]}

    st = os.stat(items[3][0])
    os.utime(items[3][0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched
    touched = _build(items, root)
    assert touched.meta["cache_hit"] is False
    digests.add(touched.meta["digest"])

    extra = _images(tmp_path / "more", n=1)
    digests.add(_build(items + extra, root).meta["digest"])  # added
    digests.add(_build(items[:-1], root).meta["digest"])  # removed
    digests.add(_build(items, root, key={**KEY, "channels": 1}).meta["digest"])  # decoded differently
    relabelled = [(p, 1 - y) for p, y in items]
    digests.add(_build(relabelled, root).meta["digest"])
    assert len(digests) == 6
    assert _build(items, root).meta["cache_hit"] is True


def test_an_edit_that_keeps_size_and_mtime_makes_a_new_cache(tmp_path):
    """Before: the key was path + size + mtime, so a file rewritten in place with its mtime restored (rsync -t, a
    restored backup, a coarse-mtime file system) kept serving the old pixels."""
    items, root = _images(tmp_path / "img"), tmp_path / "cache"
    first = _build(items, root)
    path = items[1][0]  # an 8x8 gray BMP: uncompressed, so other pixels keep the size
    st = os.stat(path)
    Image.fromarray(np.full((8, 8), 99, np.uint8)).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    again = _build(items, root)
    assert again.meta["cache_hit"] is False and again.meta["digest"] != first.meta["digest"]
    assert int(first.x[1, 0, 0, 0]) == 10 and int(again.x[1, 0, 0, 0]) == 99  # the new content, decoded


def test_the_decoder_and_its_libraries_are_part_of_the_key(tiny_data, tmp_path, monkeypatch):
    """Before: a new resnetlab decoder or Pillow/libsndfile kept serving arrays decoded by the old one."""
    import PIL
    import soundfile

    from resnetlab.data import audio, images
    from resnetlab.data.prepare import prepare_data

    def digest():
        return prepare_data(str(tiny_data), img_size=16, cache_dir=str(tmp_path), progress=False,
                            log=lambda m: None).train.meta["digest"]

    base = digest()
    assert digest() == base
    seen = {base}
    for target, name, value in [(images, "DECODER_VERSION", images.DECODER_VERSION + 1),
                                (PIL, "__version__", "0.0.1")]:
        with monkeypatch.context() as m:
            m.setattr(target, name, value)
            seen.add(digest())
    assert len(seen) == 3
    versions = audio.decoder_versions()
    assert versions["audio"] == audio.DECODER_VERSION and versions["libsndfile"] == soundfile.__libsndfile_version__


def test_corrupt_files_are_skipped_and_listed(tmp_path):
    items = _images(tmp_path / "img")
    Path(items[1][0]).write_bytes(b"")
    Path(items[4][0]).write_bytes(Path(items[4][0]).read_bytes()[:30])  # truncated
    ds = _build(items, tmp_path / "cache")
    assert len(ds) == 4 and ds.files == [items[i][0] for i in (0, 2, 3, 5)]
    assert ds.y.tolist() == [items[i][1] for i in (0, 2, 3, 5)]
    assert [int(v) for v in ds.x[:, 0, 0, 0]] == [0, 20, 30, 50]
    assert [p for p, _ in ds.skipped] == [items[1][0], items[4][0]]
    assert ds.skipped[0][1] == "empty file (0 bytes)"  # the reason, without the path repeated
    hit = _build(items, tmp_path / "cache")
    assert hit.meta["cache_hit"] and hit.skipped == ds.skipped


def test_any_exception_from_decode_is_a_skip(tmp_path):
    items = _images(tmp_path / "img", n=3)

    def flaky(path: str) -> np.ndarray:
        if path.endswith("img1.bmp"):
            raise RuntimeError("codec\nexploded")
        return decode_rgb8(path)

    ds = _build(items, tmp_path / "cache", decode=flaky)
    assert len(ds) == 2 and ds.skipped == [(items[1][0], "RuntimeError: codec exploded")]


def test_strict_raises_naming_the_file_and_leaves_nothing(tmp_path):
    items, root = _images(tmp_path / "img"), tmp_path / "cache"
    Path(items[2][0]).write_text("not an image")
    with pytest.raises(DataError, match=f"{items[2][0]}: not a recognised image"):
        _build(items, root, strict=True)
    assert _entries(root) == []


def test_every_file_failing_is_an_error(tmp_path):
    items = _images(tmp_path / "img", n=2)
    for path, _ in items:
        Path(path).write_bytes(b"")
    with pytest.raises(DataError, match=f"all 2 files failed to decode; first: {items[0][0]}: empty file"):
        _build(items, tmp_path / "cache")
    assert _entries(tmp_path / "cache") == []


def test_interrupted_build_leaves_no_cache(tmp_path):
    items, root = _images(tmp_path / "img"), tmp_path / "cache"

    def interrupted(path: str) -> np.ndarray:
        if path.endswith("img3.png"):
            raise KeyboardInterrupt  # not an Exception: not a skip, it aborts the build
        return decode_rgb8(path)

    with pytest.raises(KeyboardInterrupt):
        _build(items, root, decode=interrupted, workers=1)
    assert _entries(root) == []
    assert _build(items, root).meta["cache_hit"] is False


def test_stale_temporary_folders_are_ignored_then_removed(tmp_path):
    items, root = _images(tmp_path / "img"), tmp_path / "cache"
    host = socket.gethostname()
    dead = root / f".0123456789abcdef.tmp-999999999-deadbeef@{host}"  # beyond any pid: its build is over
    live = root / f".0123456789abcdef.tmp-{os.getpid()}-cafef00d@{host}"  # a build still running here
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "x.npy").write_bytes(b"half written")
    ds = _build(items, root)
    assert _entries(root) == sorted([live.name, ds.meta["digest"][:16]])


def test_a_damaged_cache_is_rebuilt(tmp_path):
    items, root = _images(tmp_path / "img"), tmp_path / "cache"
    ds = _build(items, root)
    (Path(ds.meta["cache_dir"]) / "y.npy").unlink()
    rebuilt = _build(items, root)
    assert rebuilt.meta["cache_hit"] is False and len(rebuilt) == 6
    np.testing.assert_array_equal(rebuilt.x, ds.x)


def test_threads_keep_the_order(tmp_path):
    items = _images(tmp_path / "img", n=12)
    one = _build(items, tmp_path / "c1", workers=1)
    three = _build(items, tmp_path / "c3", workers=3)
    np.testing.assert_array_equal(one.x, three.x)
    assert one.files == three.files


def test_generic_over_dtype_and_shape(tmp_path):
    items = _images(tmp_path / "files", n=4)
    wave = functools.partial(_fake_wave, length=100)
    ds = build_cache(items, wave, (100,), "int16", tmp_path / "cache", {"modality": "audio"}, CLASSES,
                     progress=False)
    assert ds.x.dtype == np.int16 and ds.x.shape == (4, 100)
    assert ds.x[:, 0].tolist() == [len(os.path.basename(p)) for p, _ in items]


def _fake_wave(path: str, length: int) -> np.ndarray:
    return np.full(length, len(os.path.basename(path)), np.int16)


def test_contract_violations(tmp_path):
    items = _images(tmp_path / "img", n=2)
    with pytest.raises(ValueError, match=r"decode returned uint8 \(3, 4, 4\) for .*img0.png"):
        _build(items, tmp_path / "cache", decode=functools.partial(decode_image, size=(4, 4), channels=3))
    with pytest.raises(ValueError, match="label 2 of .*img1.bmp is outside 0..1"):
        _build([items[0], (items[1][0], 2)], tmp_path / "cache")
    with pytest.raises(DataError, match="file list is empty"):
        _build([], tmp_path / "cache")
    with pytest.raises(ValueError, match="JSON"):
        _build(items, tmp_path / "cache", key={"decode": decode_rgb8})
    assert _entries(tmp_path / "cache") == []  # the failed build's temporary folder is gone


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "here"))
    assert default_cache_root() == tmp_path / "here"
    monkeypatch.delenv("RESNETLAB_CACHE")
    assert default_cache_root() == Path.home() / ".cache" / "resnetlab"


def test_channel_stats_match_numpy_and_guard_a_flat_channel():
    from resnetlab.data.prepare import channel_stats

    x = np.random.default_rng(0).integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    x[:, 2] = 7  # a constant channel: its std would be 0, normalising by it would blow up
    mean, std = channel_stats(x)
    ref = x.astype(np.float64) / 255.0
    assert mean == pytest.approx(ref.mean(axis=(0, 2, 3)), abs=1e-4)
    assert std[:2] == pytest.approx(ref.std(axis=(0, 2, 3))[:2], abs=1e-4)
    assert std[2] == 1.0
