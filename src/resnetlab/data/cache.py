"""Decode once: a dataset's files become one memory-mapped array on disk, reused until a file changes.

A cache lives at ``cache_root/<digest[:16]>/``::

    x.npy      (N, *sample_shape) samples, e.g. uint8 (N, C, H, W) images or int16 (N, T) waves
    y.npy      int64 (N,) labels
    meta.json  files, skipped files with their reasons, classes, the caller's key, the full digest

The digest is a SHA-256 over the cache format version, the caller's ``key`` (how files were decoded: size,
channels, sample rate..., and the decoder's version with the versions of the libraries that decode, which
``data/prepare.py`` puts in it), the sample shape, dtype and classes, and every item's path, label, file size,
modification time (ns) and a BLAKE2b fingerprint of its bytes. Touching, editing (even keeping size and mtime),
adding or removing a file therefore makes a new cache, and so does a new decoder; old ones are not deleted (remove
the folder to reclaim space). The fingerprint reads every file each time a cache is looked up: measured on MNIST's
70,000 PNGs (19 MB) on 2 busy cores, 1.18 s against 0.38 s for the stat-only key (BENCHMARKS.md,
"Hostile input"); data sets too large to cache are streamed, and streaming computes no digest.

Builds write into a hidden sibling folder (``.<digest16>.tmp-<pid>-<rand>@<host>``) through
``np.lib.format.open_memmap`` (memory stays flat however large the dataset) and ``os.replace`` it into place at
the end, so a killed build never leaves a half cache under the real name. Temporary folders of builds that are no
longer running are removed by the next build in the same root (``resnetlab.fileio``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from resnetlab.data.errors import DataError
from resnetlab.fileio import remove_stale_temporaries, temporary_sibling

CACHE_FORMAT = 1  # bump when the on-disk layout or the decoding conventions change: old caches are then ignored
_COPY_CHUNK_BYTES = 64 << 20
_HASH_CHUNK_BYTES = 1 << 20
# Decoding threads help only when decoding dominates. Measured on 2 cores: 5,000 CIFAR-10 JPEGs (~1 KB) cached at
# 32x32 go 4,800/s with one thread and 3,200-3,700/s with 2-4 (per-file Python overhead holds the GIL), while
# 512x384 JPEGs (~40 KB) cached at 224x224 go 490/s with one thread and 700-850/s with 2-4.
_PARALLEL_MIN_MEAN_BYTES = 16 << 10


@dataclass
class ArrayDataset:
    """A decoded dataset: ``x[i]`` is the sample decoded from ``files[i]``, with label ``y[i]``.

    ``x`` is a read-only ``np.memmap`` (N, *sample_shape) of the cache's dtype; ``y`` is int64 (N,), indices into
    ``classes``. ``skipped`` lists the files that failed to decode and why; they are not in ``x``. ``meta`` holds
    the cache's ``digest``, ``key``, ``cache_dir``, ``cache_hit``, ``sample_shape``, ``dtype`` and build time.
    """

    x: np.ndarray
    y: np.ndarray
    files: list[str]
    skipped: list[tuple[str, str]]
    classes: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


def default_cache_root() -> Path:
    """``$RESNETLAB_CACHE`` when set, else ``~/.cache/resnetlab``."""
    return Path(os.environ.get("RESNETLAB_CACHE") or "~/.cache/resnetlab").expanduser()


def build_cache(items: Sequence[tuple[str, int]], decode: Callable[[str], np.ndarray], sample_shape: tuple,
                dtype: np.dtype | type | str, cache_root: str | os.PathLike, key: dict, classes: Sequence[str], *,
                strict: bool = False, progress: bool = True, desc: str = "caching",
                workers: int | None = None) -> ArrayDataset:
    """Decode ``items`` (path, label) once into a memory-mapped cache, or open the cache built before.

    ``decode(path)`` must return an array of exactly ``sample_shape`` and ``dtype`` (a mismatch is a bug in the
    decoder and raises ``ValueError``). ``key`` is a JSON-able dict describing the decoding (e.g. ``{"modality":
    "image", "size": [32, 32], "channels": 3}``): change it and a new cache is built. ``classes`` names the labels.

    A file whose decode raises (a ``DataError``, or anything else a corrupt file provokes) is skipped and listed in
    ``skipped`` with its reason; with ``strict=True`` it raises ``DataError`` naming the file instead, and no cache
    is written. If every file fails, ``DataError``. ``workers`` threads decode in parallel (default: one for small
    files, where threads only add overhead, else up to 4, one per CPU); ``x`` follows the order of ``items``.
    ``progress`` shows a tqdm bar on a terminal.
    """
    items = [(os.fspath(path), int(label)) for path, label in items]
    classes = [str(c) for c in classes]
    if not items:
        raise DataError("nothing to cache: the file list is empty")
    bad = next(((p, y) for p, y in items if not 0 <= y < len(classes)), None)
    if bad is not None:
        raise ValueError(f"label {bad[1]} of {bad[0]} is outside 0..{len(classes) - 1} ({len(classes)} classes)")
    sample_shape, dtype = tuple(int(s) for s in sample_shape), np.dtype(dtype)
    cache_root = Path(cache_root)
    digest, total_bytes = _digest(items, key, sample_shape, dtype, classes)
    final = cache_root / digest[:16]

    dataset = _open(final, digest)
    if dataset is not None:
        if strict and dataset.skipped:  # a cache built without strict remembers the files it skipped
            path, reason = dataset.skipped[0]
            raise DataError(f"{path}: {reason}")
        return dataset
    cache_root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache_root)
    tmp = temporary_sibling(final)
    tmp.mkdir()
    if workers is None:  # measured: threads pay off for large files only (see _PARALLEL_MIN_MEAN_BYTES)
        workers = min(4, os.cpu_count() or 1) if total_bytes >= _PARALLEL_MIN_MEAN_BYTES * len(items) else 1
    try:
        _build(tmp, items, decode, sample_shape, dtype, key, classes, digest, strict, progress, desc, workers)
        _install(tmp, final, digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dataset = _open(final, digest)
    if dataset is None:  # pragma: no cover - only if the folder vanished between install and open
        raise DataError(f"{final}: cache disappeared right after it was built")
    dataset.meta["cache_hit"] = False
    return dataset


def _digest(items: list[tuple[str, int]], key: dict, sample_shape: tuple, dtype: np.dtype,
            classes: list[str]) -> tuple[str, int]:
    """The cache's SHA-256 hex digest, and the total size of the files (for choosing the number of workers)."""
    try:
        head = json.dumps({"format": CACHE_FORMAT, "key": key, "sample_shape": list(sample_shape),
                           "dtype": dtype.str, "classes": classes}, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"cache key must be JSON-serialisable: {e}") from None
    h = hashlib.sha256(head.encode())
    total = 0
    for path, label in items:
        size, mtime, content = file_fingerprint(path)
        total += max(size, 0)
        h.update(b"\n" + os.fsencode(path) + f"\0{label}\0{size}\0{mtime}\0".encode() + content)
    return h.hexdigest(), total


def file_fingerprint(path: str) -> tuple[int, int, bytes]:
    """``(size, mtime_ns, 16-byte BLAKE2b of the content)`` of a file; ``(-1, -1, b"")`` when it cannot be read (a
    missing file still changes the digest; its decode fails and it is skipped). os.open/os.read: half the per-file
    cost of ``open()`` on many small files (measured: 70,000 MNIST PNGs in 1.2 s instead of 2.1 s)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError:
        return -1, -1, b""
    try:
        st = os.fstat(fd)
        h = hashlib.blake2b(digest_size=16)
        while chunk := os.read(fd, _HASH_CHUNK_BYTES):
            h.update(chunk)
        return st.st_size, st.st_mtime_ns, h.digest()
    except OSError:
        return -1, -1, b""
    finally:
        os.close(fd)


def _open(folder: Path, digest: str) -> ArrayDataset | None:
    """The cache in ``folder`` if it is complete and matches ``digest``, else ``None``."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("digest") != digest:
            return None
        x = np.load(folder / "x.npy", mmap_mode="r")
        y = np.load(folder / "y.npy")
        if not len(x) == len(y) == len(meta["files"]):
            return None
    except (OSError, ValueError, KeyError):
        return None
    y.setflags(write=False)
    files, skipped, classes = meta.pop("files"), meta.pop("skipped"), meta.pop("classes")
    meta.update(cache_dir=str(folder), cache_hit=True)
    return ArrayDataset(x, y, files, [tuple(s) for s in skipped], classes, meta)


def _build(tmp: Path, items: list[tuple[str, int]], decode: Callable[[str], np.ndarray], sample_shape: tuple,
           dtype: np.dtype, key: dict, classes: list[str], digest: str, strict: bool, progress: bool, desc: str,
           workers: int) -> None:
    start = time.perf_counter()
    n = len(items)
    x = np.lib.format.open_memmap(tmp / "x.npy", mode="w+", dtype=dtype, shape=(n, *sample_shape))
    files, labels, skipped = [], [], []
    results = _map_in_order(decode, (path for path, _ in items), workers)
    try:
        with tqdm(total=n, desc=desc, unit="file", disable=None if progress else True) as bar:
            for (path, label), result in zip(items, results):
                bar.update()
                if isinstance(result, Exception):
                    reason = failure_reason(path, result)
                    if strict:
                        raise DataError(f"{path}: {reason}") from result
                    skipped.append((path, reason))
                    continue
                sample = np.asarray(result)
                if sample.shape != sample_shape or sample.dtype != dtype:
                    raise ValueError(f"decode returned {sample.dtype} {sample.shape} for {path}; "
                                     f"the cache expects {dtype} {sample_shape}")
                x[len(files)] = sample
                files.append(path)
                labels.append(label)
    finally:
        results.close()  # stops the decoding threads at once when the build is abandoned
    if not files:
        raise DataError(f"all {n} files failed to decode; first: {skipped[0][0]}: {skipped[0][1]}")
    x.flush()
    if len(files) < n:  # drop the rows left empty by skipped files
        x = _truncated_copy(x, len(files), tmp / "x.part.npy")
        os.replace(tmp / "x.part.npy", tmp / "x.npy")
    del x
    np.save(tmp / "y.npy", np.asarray(labels, dtype=np.int64))
    meta = {"format": CACHE_FORMAT, "digest": digest, "key": key, "sample_shape": list(sample_shape),
            "dtype": dtype.str, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.perf_counter() - start, 3), "files": files,
            "skipped": [list(s) for s in skipped], "classes": classes}
    (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def _map_in_order(fn: Callable, args: Iterable, workers: int) -> Iterator:
    """``fn`` over ``args`` in order, yielding each result or the exception it raised; at most ``4 * workers``
    calls are in flight, so memory stays bounded."""

    def call(arg):
        try:
            return fn(arg)
        except Exception as e:  # handed to the caller, who decides between skipping and raising
            return e

    if workers <= 1:
        yield from map(call, args)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="resnetlab-decode")
    pending: deque = deque()
    try:
        for arg in args:
            pending.append(pool.submit(call, arg))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _truncated_copy(x: np.memmap, n: int, path: Path) -> np.memmap:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=x.dtype, shape=(n, *x.shape[1:]))
    step = max(1, _COPY_CHUNK_BYTES // max(1, x[0].nbytes))
    for i in range(0, n, step):
        out[i:i + step] = x[i:min(i + step, n)]
    out.flush()
    return out


def _install(tmp: Path, final: Path, digest: str) -> None:
    """Move the finished build into place; if something is already there, keep it when it is this very cache
    (a concurrent build won the race), else replace it."""
    try:
        os.replace(tmp, final)
        return
    except OSError:
        if _open(final, digest) is not None:
            return
    old = temporary_sibling(final)
    os.replace(final, old)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


def failure_reason(path: str, error: Exception) -> str:
    """One line saying why ``path`` failed, without repeating the path when the message starts with it."""
    text = " ".join(str(error).split())
    if text.startswith(f"{path}: "):
        text = text[len(path) + 2:]
    if not isinstance(error, DataError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
