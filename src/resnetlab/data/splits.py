"""A run's ``splits.json``: which files it trained, validated and tested on, and the overlap check of ``evaluate``.

``splits.json`` lists each split's files relative to the data root (the dataset folder, or the CSV manifest's
folder), their counts, where validation came from and how files were grouped. ``overlap`` compares the files an
evaluation reads with a run's training and validation files: by resolved path (symbolic links followed), then, for
files of equal size, by content (a BLAKE2 hash), as long as that reads at most ``CONTENT_CHECK_BYTES``; beyond
that, by the path relative to the data root and the size (a copy of the dataset moved elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from resnetlab.data.layout import DatasetSpec
from resnetlab.fileio import atomic_write

SPLITS_FILE = "splits.json"
CONTENT_CHECK_BYTES = 512 << 20  # the content comparison reads at most this much (both sides); beyond, paths only


def splits_record(spec: DatasetSpec, files: dict[str, Sequence[str]], data: str | None = None) -> dict:
    """The content of ``splits.json``: ``files`` maps a split name to the paths its arrays were decoded from (what
    the run actually used; unreadable files skipped). Paths are stored relative to ``spec.data_root``."""
    root = spec.data_root
    source = ("none" if not spec.val else "carved out of train" if spec.val_name == "split" else
              "the data's own validation split")
    return {
        "data": data if data is not None else spec.root,
        "root": root,
        "layout": spec.layout,
        "validation": source,
        "val_fraction": spec.val_fraction,
        "grouping": spec.grouping.to_dict() if spec.grouping is not None else None,
        "counts": {name: len(paths) for name, paths in files.items()},
        "files": {name: [os.path.relpath(p, root) for p in paths] for name, paths in files.items()},
    }


def write_splits(run_dir: Path, record: dict) -> Path:
    return atomic_write(Path(run_dir) / SPLITS_FILE, json.dumps(record, indent=1))


def read_splits(run_dir: Path) -> dict | None:
    """A run directory's ``splits.json``, or ``None`` when it has none (older runs) or it cannot be read."""
    path = Path(run_dir) / SPLITS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), dict) else None


def overlap(files: Sequence[str], record: dict, splits: Sequence[str] = ("train", "val"),
            max_bytes: int = CONTENT_CHECK_BYTES, data_root: str | None = None) -> dict:
    """How many of ``files`` (absolute paths an evaluation reads, from the dataset at ``data_root``) a run used in
    each of ``splits``, from its ``splits.json`` ``record``: ``{"train": n, "val": m, "by": how}``, ``how`` being
    ``"path"`` (no file needed more), ``"path+content"`` or ``"path+relative path"`` (the content check would have
    read more than ``max_bytes``). A file counts once, in the first split of ``splits`` that holds it."""
    root = record.get("root") or ""
    resolved = {name: {os.path.realpath(os.path.join(root, rel)): None for rel in record["files"].get(name, [])}
                for name in splits}
    found = {name: 0 for name in splits}
    rest = []
    for f in files:
        real = os.path.realpath(f)
        name = next((n for n in splits if real in resolved[n]), None)
        if name is None:
            rest.append(real)
        else:
            found[name] += 1
    by = "path"
    if rest:
        same = _same_content(rest, resolved, splits, max_bytes)
        by = "path+content"
        if same is None and data_root is not None:
            same = _same_relative_path(rest, data_root, record, splits)
            by = "path+relative path"
        for name, n in (same or {}).items():
            found[name] += n
    return {**found, "by": by}


def _same_relative_path(files: list[str], data_root: str, record: dict, splits: Sequence[str]) -> dict[str, int]:
    """Per split, how many of ``files`` have the relative path (under ``data_root``) and the size of one of its
    files (under the run's root)."""
    root = record.get("root") or ""
    rel = {name: set(record["files"].get(name, [])) for name in splits}
    counts = {name: 0 for name in splits}
    for f in files:
        r = os.path.relpath(f, data_root)
        name = next((n for n in splits if r in rel[n]), None)
        if name is not None and _size(f) is not None and _size(f) == _size(os.path.join(root, r)):
            counts[name] += 1
    return counts


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _same_content(files: list[str], resolved: dict[str, dict], splits: Sequence[str],
                  max_bytes: int) -> dict[str, int] | None:
    """Per split, how many of ``files`` have the content of one of its files (compared only where sizes match);
    ``None`` when that would read more than ``max_bytes``."""
    sizes = {f: _size(f) for f in files}
    wanted = {s for s in sizes.values() if s is not None}
    run_sizes = {name: {p: s for p in paths if (s := _size(p)) in wanted} for name, paths in resolved.items()}
    shared = wanted & {s for by_path in run_sizes.values() for s in by_path.values()}
    if not shared:
        return {name: 0 for name in splits}
    todo = [f for f, s in sizes.items() if s in shared]
    cost = sum(sizes[f] for f in todo) + sum(s for by_path in run_sizes.values() for s in by_path.values()
                                              if s in shared)
    if cost > max_bytes:
        return None
    digests = {name: {_digest(p) for p, s in by_path.items() if s in shared} - {None}
               for name, by_path in run_sizes.items()}
    counts = {name: 0 for name in splits}
    for f in todo:
        d = _digest(f)
        name = None if d is None else next((n for n in splits if d in digests[n]), None)
        if name is not None:
            counts[name] += 1
    return counts


def _digest(path: str) -> bytes | None:
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.digest()
