"""Dataset discovery: a folder or a CSV manifest becomes a ``DatasetSpec`` (classes, train and validation files).

Three layouts are recognised, checked in this order:

- ``csv``: a manifest file ``path,label[,split]``. The header is optional: the first row is taken as a header when
  its first cell has no file extension (every data file has one). A header may name its columns (``path``/``file``,
  ``label``/``class``, ``split``) in any order; without one the order is ``path,label[,split]``. Relative paths
  resolve against the CSV's folder. ``split`` is ``train``, ``val`` (``valid``, ``validation``) or ``test``;
  without the column, a stratified split is made as for class folders.
- ``split-folders``: ``root/train/<class>/...`` beside ``root/val/<class>/...`` or ``root/test/<class>/...``
  (``val`` wins when both exist; ``test`` is then left for a final evaluation and not read).
- ``class-folders``: ``root/<class>/...``; a seeded, stratified split makes the validation set.

Files are found recursively inside each class folder. Names starting with ``.`` are skipped silently; files with
an extension that is neither image nor audio are skipped and listed in ``DatasetSpec.ignored``. Classes sort
naturally (``"2" < "10"``); ``classes=`` imposes a trained model's class list and order instead.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from resnetlab.data.errors import DataError

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
AUDIO_EXTS = frozenset({".wav", ".flac", ".ogg"})
KNOWN_EXTS = IMAGE_EXTS | AUDIO_EXTS

LAYOUTS = ("class-folders", "split-folders", "csv")
_VAL_DIRS = ("val", "test")  # preference order for the held-out folder of a split-folders dataset
_SPLIT_WORDS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_PATH_COLUMNS = ("path", "file", "filename", "filepath", "image", "audio")
_LABEL_COLUMNS = ("label", "class", "target", "category")


@dataclass
class DatasetSpec:
    """What ``scan_dataset`` found: every path is absolute, every label an index into ``classes``."""

    root: str  # the dataset folder, or the CSV manifest's path
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    modality: str  # "image" | "audio"
    layout: str  # "class-folders" | "split-folders" | "csv"
    val_name: str  # where `val` came from: "val" | "test" folder or column value, or "split" (stratified split)
    ignored: list[str] = field(default_factory=list)  # files skipped for their extension

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        """One line for logs: counts, classes, layout, where the validation set came from."""
        kind = "images" if self.modality == "image" else "clips"
        line = (f"{self.root}: {len(self.train)} train / {len(self.val)} {self.val_name} {kind}, "
                f"{self.num_classes} classes ({self.layout})")
        n = len(self.ignored)
        return line + (f", {n} other file{'s' if n > 1 else ''} ignored" if n else "")


def natural_key(text: str) -> tuple:
    """Sort key that orders digit runs by value: ``"2" < "10"``, ``"img9.png" < "img10.png"``."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), text


def file_kind(path: str) -> str | None:
    """``"image"``, ``"audio"`` or ``None`` (unknown extension), from the file name alone."""
    ext = os.path.splitext(path)[1].lower()
    return "image" if ext in IMAGE_EXTS else "audio" if ext in AUDIO_EXTS else None


def scan_dataset(path: str | os.PathLike, *, val_fraction: float = 0.1, seed: int = 0,
                 classes: Sequence[str] | None = None) -> DatasetSpec:
    """Find a dataset's classes and its train/validation files.

    ``path`` is a dataset folder or a ``.csv`` manifest (see the module docstring for the layouts). When the layout
    has no validation set of its own, ``val_fraction`` of each class (rounded, at least one file when the class
    has two or more, never all of it) goes to ``val``; ``val_fraction=0`` keeps every file in ``train``. The split
    depends only on ``seed`` and each file's path relative to the root, so it is the same on every machine and a
    class's split does not change when other classes are added.

    ``classes`` imposes a class list and order (a trained model's): a label outside it is a ``DataError`` naming
    it; listed classes absent from the data are allowed. Raises ``DataError`` (one line, naming the path) for a
    missing path, no classes or files, an empty class folder, a single class, mixed image and audio files, a class
    found only in the validation set, and a manifest's missing file or bad row (naming its line).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = os.path.abspath(os.fspath(path))
    if not os.path.exists(root):
        raise DataError(f"dataset not found: {root}")
    if os.path.isfile(root):
        if not root.lower().endswith(".csv"):
            raise DataError(f"{root}: expected a dataset folder or a .csv manifest")
        return _scan_csv(root, val_fraction, seed, classes)

    ignored: list[str] = []
    subdirs, loose = _list_dir(root)
    ignored += loose
    lowered = {d.lower(): d for d in subdirs}
    val_dir = next((lowered[v] for v in _VAL_DIRS if v in lowered), None)
    if "train" in lowered and val_dir is not None and _list_dir(os.path.join(root, lowered["train"]))[0]:
        train_by_class = _scan_class_folders(os.path.join(root, lowered["train"]), ignored)
        val_by_class = _scan_class_folders(os.path.join(root, val_dir), ignored)
        return _finish(root, "split-folders", val_dir.lower(), train_by_class, val_by_class, ignored,
                       classes, val_fraction, seed, where=os.path.join(root, val_dir))
    by_class = _scan_class_folders(root, ignored, subdirs=subdirs)
    return _finish(root, "class-folders", "split", by_class, None, ignored, classes, val_fraction, seed, where=root)


def list_input_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Expand files and folders into the image and audio files they hold, for prediction.

    A folder is searched recursively (hidden entries skipped, unknown extensions ignored) and its files sorted
    naturally; a file named directly must have a known extension. Order follows ``paths``; duplicates are dropped.
    Paths keep the form they were given in (relative stays relative). Raises ``DataError`` for a path that does
    not exist, a named file of unknown type, or when nothing is found.
    """
    paths = [os.fspath(p) for p in paths]
    out: list[str] = []
    seen: set[str] = set()
    for p in paths:
        if os.path.isdir(p):
            files = [f for f in _walk_files(p) if file_kind(f)]
        elif os.path.isfile(p):
            if not file_kind(p):
                raise DataError(f"{p}: not an image or audio file (known extensions: {_known_exts()})")
            files = [p]
        else:
            raise DataError(f"input not found: {p}")
        for f in files:
            if f not in seen:
                seen.add(f)
                out.append(f)
    if not out:
        raise DataError(f"no image or audio files ({_known_exts()}) in {', '.join(paths) or '(no paths given)'}")
    return out


# --- folders ---------------------------------------------------------------------------------------------------


def _known_exts() -> str:
    return " ".join(sorted(KNOWN_EXTS))


def _list_dir(folder: str) -> tuple[list[str], list[str]]:
    """Visible subfolder names (natural order) and visible files (full paths) directly in ``folder``."""
    dirs, files = [], []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            else:
                files.append(entry.path)
    return sorted(dirs, key=natural_key), sorted(files, key=natural_key)


def _walk_files(folder: str) -> list[str]:
    """Every visible file under ``folder``, recursively, sorted naturally by path relative to ``folder``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda f: natural_key(os.path.relpath(f, folder)))


def _scan_class_folders(folder: str, ignored: list[str], subdirs: list[str] | None = None) -> dict[str, list[str]]:
    """``{class name: files}`` for a folder of class subfolders; loose files and unknown extensions go to
    ``ignored``. An empty class folder, or a folder without class folders, is a ``DataError``."""
    if subdirs is None:
        subdirs, loose = _list_dir(folder)
        ignored += loose
    if not subdirs:
        raise DataError(f"{folder}: no class folders (expected one subfolder of files per class)")
    by_class = {}
    for name in subdirs:
        class_dir = os.path.join(folder, name)
        files = []
        for f in _walk_files(class_dir):
            (files if file_kind(f) else ignored).append(f)
        if not files:
            raise DataError(f"{class_dir}: empty class folder '{name}' (no files with extension {_known_exts()})")
        by_class[name] = files
    return by_class


# --- CSV manifests ---------------------------------------------------------------------------------------------


def _scan_csv(csv_path: str, val_fraction: float, seed: int, classes: Sequence[str] | None) -> DatasetSpec:
    base = os.path.dirname(csv_path)
    by_split: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}, "test": {}, "all": {}}
    ignored: list[str] = []
    columns: tuple[int, int, int | None] | None = None  # path, label, split column indices
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        for row in reader:
            line = reader.line_num
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if columns is None:  # first row: a header, or the first data row that fixes the column count
                columns = _csv_columns(cells, csv_path, line)
                if not os.path.splitext(cells[0])[1]:
                    continue
            path_col, label_col, split_col = columns
            need = max(c for c in columns if c is not None) + 1
            if len(cells) < need:
                expected = "path,label,split" if split_col is not None else "path,label"
                raise DataError(f"{csv_path} line {line}: expected {need} columns ({expected}), got {row!r}")
            file, label = cells[path_col], cells[label_col]
            if not file or not label:
                raise DataError(f"{csv_path} line {line}: empty {'path' if not file else 'label'} in {row!r}")
            file = os.path.normpath(os.path.join(base, os.path.expanduser(file)))
            if not os.path.isfile(file):
                raise DataError(f"{csv_path} line {line}: file not found: {file}")
            if not file_kind(file):
                ignored.append(file)
                continue
            split = "all"
            if split_col is not None:
                split = _SPLIT_WORDS.get(cells[split_col].lower())
                if split is None:
                    raise DataError(f"{csv_path} line {line}: split must be train, val or test, "
                                    f"got {cells[split_col]!r}")
            by_split[split].setdefault(label, []).append(file)
    if columns is None or not any(by_split.values()):
        raise DataError(f"{csv_path}: no rows with image or audio files")
    if by_split["all"]:
        return _finish(csv_path, "csv", "split", by_split["all"], None, ignored, classes, val_fraction, seed,
                       where=csv_path, rel_root=base)
    val_name = "val" if by_split["val"] else "test"
    if not by_split["train"] and classes is None:
        raise DataError(f"{csv_path}: no rows with split 'train'")
    return _finish(csv_path, "csv", val_name, by_split["train"], by_split[val_name], ignored, classes,
                   val_fraction, seed, where=f"{csv_path} ({val_name} rows)")


def _csv_columns(cells: list[str], csv_path: str, line: int) -> tuple[int, int, int | None]:
    """Column indices (path, label, split or None) from the first row, which may be a header."""
    if os.path.splitext(cells[0])[1]:  # a data row: positional path,label[,split]
        if len(cells) < 2:
            raise DataError(f"{csv_path} line {line}: expected path,label[,split], got {cells!r}")
        return 0, 1, 2 if len(cells) >= 3 and cells[2] else None
    names = [c.lower() for c in cells]
    path_col = next((names.index(n) for n in _PATH_COLUMNS if n in names), 0)
    label_col = next((names.index(n) for n in _LABEL_COLUMNS if n in names), 1)
    split_col = names.index("split") if "split" in names else None  # other extra columns are ignored
    if len(cells) < 2 or path_col == label_col:
        raise DataError(f"{csv_path} line {line}: cannot read header {cells!r} (expected path,label[,split])")
    return path_col, label_col, split_col


# --- classes and split -----------------------------------------------------------------------------------------


def _finish(root: str, layout: str, val_name: str, train_by_class: dict[str, list[str]],
            val_by_class: dict[str, list[str]] | None, ignored: list[str], classes: Sequence[str] | None,
            val_fraction: float, seed: int, where: str, rel_root: str | None = None) -> DatasetSpec:
    """Check classes and modality, make the stratified split when needed, and assemble the spec."""
    all_files = [f for files in train_by_class.values() for f in files]
    all_files += [f for files in (val_by_class or {}).values() for f in files]
    if not all_files:
        raise DataError(f"{root}: no image or audio files ({_known_exts()})")
    modality = _modality(root, all_files)

    if classes is not None:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes has duplicates: {classes}")
        for name in list(train_by_class) + list(val_by_class or {}):
            if name not in classes:
                shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
                raise DataError(f"{root}: label '{name}' is not one of the {len(classes)} known classes ({shown})")
    else:
        classes = sorted(train_by_class, key=natural_key)
        for name in val_by_class or {}:
            if name not in train_by_class:
                raise DataError(f"{where}: class '{name}' has validation files but no training files")
    if len(classes) < 2:
        raise DataError(f"{root}: only one class ({', '.join(classes)}); a classifier needs at least two")

    index = {name: i for i, name in enumerate(classes)}
    if val_by_class is None:
        train_by_class, val_by_class = _stratified_split(train_by_class, rel_root or root, val_fraction, seed)
    train = [(f, index[name]) for name in classes for f in train_by_class.get(name, [])]
    val = [(f, index[name]) for name in classes for f in val_by_class.get(name, [])]
    return DatasetSpec(root, classes, train, val, modality, layout, val_name, ignored)


def _modality(root: str, files: list[str]) -> str:
    kinds = {}
    for f in files:
        kinds.setdefault(file_kind(f), f)
    if len(kinds) > 1:
        raise DataError(f"{root}: mixes image and audio files (e.g. {kinds['image']} and {kinds['audio']})")
    return next(iter(kinds))


def _stratified_split(by_class: dict[str, list[str]], rel_root: str, val_fraction: float,
                      seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per class, the files whose seeded hash ranks lowest go to validation.

    Ranking by a hash of ``seed`` and the path relative to the root (not by a shuffled index) makes each file's
    side independent of the other classes and of where the dataset lives.
    """
    train, val = {}, {}
    for name, files in by_class.items():
        n = len(files)
        n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, int(n * val_fraction + 0.5)))
        ranked = sorted(files, key=lambda f: hashlib.sha256(f"{seed}:{os.path.relpath(f, rel_root)}".encode()).digest())
        chosen = set(ranked[:n_val])
        train[name] = [f for f in files if f not in chosen]
        val[name] = [f for f in files if f in chosen]
    return train, val
