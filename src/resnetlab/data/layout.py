"""Dataset discovery: a folder or a CSV manifest becomes a ``DatasetSpec`` (classes; train, validation and test
files; how files group, e.g. by speaker).

Three layouts are recognised, checked in this order:

- ``csv``: a manifest file ``path,label[,split][,group]``. The header is optional: the first row is taken as a
  header when its first cell has no file extension (every data file has one). A header may name its columns
  (``path``/``file``, ``label``/``class``, ``split``, ``group``) in any order; without one the order is
  ``path,label[,split]``. Relative paths resolve against the CSV's folder. ``split`` is ``train``, ``val``
  (``valid``, ``validation``) or ``test``.
- ``split-folders``: ``root/train/<class>/...`` with ``root/val/<class>/...`` and/or ``root/test/<class>/...``.
- ``class-folders``: ``root/<class>/...``.

The splits: ``val`` is the data's own validation set (a ``val/`` folder, ``val`` rows) when it has one; otherwise it
is carved out of ``train`` (``val_fraction`` of each class, stratified, seeded). ``test`` (a ``test/`` folder,
``test`` rows) is never used for validation: it is kept apart for one evaluation at the end of a run.

Groups: when files come in groups that must not straddle train and validation (a speaker's recordings, a
patient's scans), the carved validation set takes whole groups. A group is named by the first capture group of a
regular expression matched on the file name (``group_by``), by a CSV ``group`` column, or, without either, by one of
the field's naming conventions when every file follows it (``GROUP_CONVENTIONS``: Speech Commands, FSDD).

Files are found recursively inside each class folder. Names starting with ``.`` are skipped silently; files with
an extension that is neither image nor audio are skipped and listed in ``DatasetSpec.ignored``. Classes sort
naturally (``"2" < "10"``); ``classes=`` imposes a trained model's class list and order instead.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from resnetlab.data.audio import AUDIO_EXTENSIONS
from resnetlab.data.errors import DataError
from resnetlab.data.images import IMAGE_EXTENSIONS

# The suffixes the decoders read, defined beside them (audio: what the installed libsndfile lists).
IMAGE_EXTS = frozenset(IMAGE_EXTENSIONS)
AUDIO_EXTS = frozenset(AUDIO_EXTENSIONS)
KNOWN_EXTS = IMAGE_EXTS | AUDIO_EXTS

LAYOUTS = ("class-folders", "split-folders", "csv")
_SPLIT_WORDS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_PATH_COLUMNS = ("path", "file", "filename", "filepath", "image", "audio")
_LABEL_COLUMNS = ("label", "class", "target", "category")

# Naming conventions of speech corpora that carry the speaker, recognised without --group-by (audio files only):
# name -> (the pattern, as --group-by would give it; the naming in words; what a group is)
GROUP_CONVENTIONS = {
    "Speech Commands": (r"^([0-9a-f]{8})_nohash_\d+\.\w+$", "SPEAKER_nohash_N", "speaker"),
    "FSDD": (r"^\d+_([A-Za-z][A-Za-z-]*)_\d+\.\w+$", "DIGIT_SPEAKER_TAKE", "speaker"),
}
GROUP_OFF = ("", "none", "off")  # --group-by values that turn grouping (and the conventions) off
_CONVENTION_SHARE = 0.95  # a convention applies when at least this share of the files to split follows it


@dataclass
class Grouping:
    """How a dataset's files group (``DatasetSpec.grouping``), and whether the carved validation set used it."""

    source: str  # "--group-by", "CSV group column", or a GROUP_CONVENTIONS name
    regex: str | None  # its first capture group names a file's group; None for a CSV column
    groups: dict[str, int]  # distinct groups per split (train, val, test)
    applied: bool  # whether the validation set was carved out of train by whole groups
    note: str = ""  # why not, when not
    unmatched: int = 0  # files with no group (the regex did not match, an empty cell): each is a group of its own
    shared: dict[str, int] = field(default_factory=dict)  # "train/val", "train/test": groups found in both
    unit: str = "group"  # what a group is, in words ("speaker")

    def describe(self) -> str:
        """One line for the run header."""
        if self.source in GROUP_CONVENTIONS:
            what = (f"the {self.source} file naming {GROUP_CONVENTIONS[self.source][1]}, recognised without "
                    f"--group-by")
        else:
            what = f"--group-by '{self.regex}'" if self.regex is not None else "the CSV's group column"
        counts = ", ".join(f"{n} in {split}" for split, n in self.groups.items() if n)
        shared = "".join(f"; {n} in both {pair.replace('/', ' and ')}" for pair, n in self.shared.items() if n)
        if not self.applied and self.source in GROUP_CONVENTIONS:  # the note says it: the split ignored the groups
            counts = ", ".join(f"{n} in {split}" for split, n in self.groups.items() if n and split != "val")
            shared = ""
        alone = f"; {self.unmatched} files matched no {self.unit} (each on its own)" if self.unmatched else ""
        if self.applied:
            off = "; --group-by none turns it off" if self.source != "--group-by" else ""
            return f"validation split by whole {self.unit}s ({what}): {self.unit}s {counts}{shared}{alone}{off}"
        return f"{self.unit}s ({what}): {counts}{shared}{alone}; {self.note}"

    def to_dict(self) -> dict:
        return {"source": self.source, "regex": self.regex, "unit": self.unit, "groups": dict(self.groups),
                "applied": self.applied, "note": self.note, "unmatched": self.unmatched, "shared": dict(self.shared)}


@dataclass
class DatasetSpec:
    """What ``scan_dataset`` found: every path is absolute, every label an index into ``classes``."""

    root: str  # the dataset folder, or the CSV manifest's path
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    modality: str  # "image" | "audio"
    layout: str  # "class-folders" | "split-folders" | "csv"
    val_name: str  # where `val` came from: "val" (the data's own folder or rows) or "split" (carved out of train)
    ignored: list[str] = field(default_factory=list)  # files skipped for their extension
    test: list[tuple[str, int]] = field(default_factory=list)  # kept for one final evaluation; never validated on
    grouping: Grouping | None = None
    val_fraction: float = 0.0  # the share of each class carved out of train (when val_name is "split")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def data_root(self) -> str:
        """The folder that the paths of ``splits.json`` are relative to: the dataset folder or the CSV's folder."""
        return os.path.dirname(self.root) if self.layout == "csv" else self.root

    def held_out(self) -> tuple[str, list[tuple[str, int]]]:
        """What an evaluation of this data reads: ``("test", files)``, else ``("val", ...)``, else every file
        (``("all", train + val)``)."""
        if self.test:
            return "test", self.test
        if self.val and self.val_name == "val":
            return "val", self.val
        return "all", self.train + self.val

    def summary(self) -> str:
        """One line for logs: counts per split, classes, layout, where the validation set came from."""
        kind = "images" if self.modality == "image" else "clips"
        if self.val_name == "split":
            val = (f"{len(self.val)} val (carved out of train, {self.val_fraction:.0%} of each class"
                   f"{', by whole groups' if self.grouping and self.grouping.applied else ''})" if self.val else
                   "no validation split")
        else:
            val = f"{len(self.val)} val"
        test = f" / {len(self.test)} test (kept for the end)" if self.test else ""
        line = (f"{self.root}: {len(self.train)} train / {val}{test} {kind}, {self.num_classes} classes "
                f"({self.layout})")
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
                 classes: Sequence[str] | None = None, group_by: str | None = None) -> DatasetSpec:
    """Find a dataset's classes and its train, validation and test files.

    ``path`` is a dataset folder or a ``.csv`` manifest (see the module docstring for the layouts). When the data
    has no validation set of its own, ``val_fraction`` of each class (rounded, at least one file when the class
    has two or more, never all of it) is carved out of ``train`` into ``val``; ``val_fraction=0`` keeps every file
    in ``train``. A test split is never used for validation. The split depends only on ``seed`` and each file's
    path relative to the root (or its group's name), so it is the same on every machine and a class's split does
    not change when other classes are added.

    ``group_by``: a regular expression whose first capture group, matched on a file's name, names its group; the
    carved validation set then takes whole groups, as close to ``val_fraction`` of each class as they allow.
    ``None``: a CSV ``group`` column, else a naming convention of ``GROUP_CONVENTIONS`` that (nearly) every file
    follows, unless the data's own test split shares its groups with train (the data then tests seen groups, and
    validation should too). ``"none"`` turns grouping off.

    ``classes`` imposes a class list and order (a trained model's): a label outside it is a ``DataError`` naming
    it; listed classes absent from the data are allowed. Raises ``DataError`` (one line, naming the path) for a
    missing path, no classes or files, an empty class folder, a single class, mixed image and audio files, a class
    found only in the validation or test set, a manifest's missing file or bad row (naming its line), and a
    ``group_by`` that matches no file name; ``ValueError`` for a ``group_by`` that is not a regular expression
    with a capture group.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    pattern = _group_pattern(group_by)
    root = os.path.abspath(os.fspath(path))
    if not os.path.exists(root):
        raise DataError(f"dataset not found: {root}")
    if os.path.isfile(root):
        if not root.lower().endswith(".csv"):
            raise DataError(f"{root}: expected a dataset folder or a .csv manifest")
        return _scan_csv(root, val_fraction, seed, classes, group_by, pattern)

    ignored: list[str] = []
    subdirs, loose = _list_dir(root)
    ignored += loose
    lowered = {d.lower(): d for d in subdirs}
    held = {name: lowered[name] for name in ("val", "test") if name in lowered}
    # train/ alone is a split-folders dataset too (its validation carved out of it), unless it holds files itself:
    # then it is a class named "train"
    if "train" in lowered and (held or len(subdirs) == 1) and _list_dir(os.path.join(root, lowered["train"]))[0]:
        splits = {"train": _scan_class_folders(os.path.join(root, lowered["train"]), ignored)}
        for name, folder in held.items():
            splits[name] = _scan_class_folders(os.path.join(root, folder), ignored)
        return _finish(root, "split-folders", splits, ignored, classes, val_fraction, seed, group_by, pattern,
                       where={name: os.path.join(root, folder) for name, folder in held.items()})
    splits = {"train": _scan_class_folders(root, ignored, subdirs=subdirs)}
    return _finish(root, "class-folders", splits, ignored, classes, val_fraction, seed, group_by, pattern, where={})


def list_input_files(paths: Iterable[str | os.PathLike], *, keep_unknown: bool = False) -> list[str]:
    """Expand files and folders into the image and audio files they hold, for prediction.

    A folder is searched recursively (hidden entries skipped, unknown extensions ignored) and its files sorted
    naturally; a file named directly must have a known extension, unless ``keep_unknown`` (predict keeps it, to
    report it as unreadable among the others: :func:`unknown_type_error`). Order follows ``paths``; duplicates
    are dropped. Paths keep the form they were given in (relative stays relative). Raises ``DataError`` for a
    path that does not exist, a named file of unknown type, or when nothing is found.
    """
    paths = [os.fspath(p) for p in paths]
    out: list[str] = []
    seen: set[str] = set()
    for p in paths:
        if os.path.isdir(p):
            files = [f for f in _walk_files(p) if file_kind(f)]
        elif os.path.isfile(p):
            if not file_kind(p) and not keep_unknown:
                raise DataError(unknown_type_error(p))
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


def unknown_type_error(path: str) -> str:
    """The message for a file whose suffix is neither an image's nor an audio file's."""
    return f"{path}: not an image or audio file (known extensions: {_known_exts()})"


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


def _scan_csv(csv_path: str, val_fraction: float, seed: int, classes: Sequence[str] | None, group_by: str | None,
              pattern: re.Pattern | None) -> DatasetSpec:
    base = os.path.dirname(csv_path)
    by_split: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}, "test": {}, "all": {}}
    groups: dict[str, str] = {}  # file -> its group cell (a CSV with a group column)
    ignored: list[str] = []
    columns: tuple[int, int, int | None, int | None] | None = None  # path, label, split, group column indices
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
            path_col, label_col, split_col, group_col = columns
            need = max(path_col, label_col, split_col or 0) + 1  # a short row just has no group
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
            if group_col is not None and group_col < len(cells) and cells[group_col]:
                groups[file] = cells[group_col]
            by_split[split].setdefault(label, []).append(file)
    if columns is None or not any(by_split.values()):
        raise DataError(f"{csv_path}: no rows with image or audio files")
    if by_split["all"]:
        splits = {"train": by_split["all"]}
    else:
        if not by_split["train"] and classes is None:
            raise DataError(f"{csv_path}: no rows with split 'train'")
        splits = {name: by_split[name] for name in ("train", "val", "test") if by_split[name] or name == "train"}
    column = groups if columns[3] is not None else None
    return _finish(csv_path, "csv", splits, ignored, classes, val_fraction, seed, group_by, pattern,
                   where={name: f"{csv_path} ({name} rows)" for name in ("val", "test")}, rel_root=base,
                   group_column=column)


def _csv_columns(cells: list[str], csv_path: str, line: int) -> tuple[int, int, int | None, int | None]:
    """Column indices (path, label, split or None, group or None) from the first row, which may be a header."""
    if os.path.splitext(cells[0])[1]:  # a data row: positional path,label[,split]
        if len(cells) < 2:
            raise DataError(f"{csv_path} line {line}: expected path,label[,split], got {cells!r}")
        return 0, 1, 2 if len(cells) >= 3 and cells[2] else None, None
    names = [c.lower() for c in cells]
    path_col = next((names.index(n) for n in _PATH_COLUMNS if n in names), 0)
    label_col = next((names.index(n) for n in _LABEL_COLUMNS if n in names), 1)
    split_col = names.index("split") if "split" in names else None  # other extra columns are ignored
    group_col = names.index("group") if "group" in names else None
    if len(cells) < 2 or path_col == label_col:
        raise DataError(f"{csv_path} line {line}: cannot read header {cells!r} (expected path,label[,split])")
    return path_col, label_col, split_col, group_col


# --- classes, groups and the split -----------------------------------------------------------------------------


def _finish(root: str, layout: str, splits: dict[str, dict[str, list[str]]], ignored: list[str],
            classes: Sequence[str] | None, val_fraction: float, seed: int, group_by: str | None,
            pattern: re.Pattern | None, where: dict[str, str], rel_root: str | None = None,
            group_column: dict[str, str] | None = None) -> DatasetSpec:
    """Check classes and modality, carve the validation split out of train when the data has none, and assemble
    the spec. ``splits`` maps "train" (always) and "val"/"test" (when the data has them) to ``{class: files}``."""
    all_files = [f for by_class in splits.values() for files in by_class.values() for f in files]
    if not all_files:
        raise DataError(f"{root}: no image or audio files ({_known_exts()})")
    modality = _modality(root, all_files)

    if classes is not None:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes has duplicates: {classes}")
        for by_class in splits.values():
            for name in by_class:
                if name not in classes:
                    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
                    raise DataError(f"{root}: label '{name}' is not one of the {len(classes)} known classes "
                                    f"({shown})")
    else:
        classes = sorted(splits["train"], key=natural_key)
        for split in ("val", "test"):
            for name in splits.get(split, {}):
                if name not in splits["train"]:
                    what = "validation" if split == "val" else "test"
                    raise DataError(f"{where[split]}: class '{name}' has {what} files but no training files")
    if len(classes) < 2:
        raise DataError(f"{root}: only one class ({', '.join(classes)}); a classifier needs at least two")

    rel_root = rel_root or root
    group_of, grouping = _grouper(splits, modality, rel_root, group_by, pattern, group_column,
                                  carving="val" not in splits and val_fraction > 0)
    train_by_class, val_by_class = splits["train"], splits.get("val")
    val_name = "val"
    if val_by_class is None:
        val_name = "split"
        if grouping is not None and grouping.applied:
            train_by_class, val_by_class = _grouped_split(train_by_class, group_of, val_fraction, seed)
        else:
            train_by_class, val_by_class = _stratified_split(train_by_class, rel_root, val_fraction, seed)
    if grouping is not None:
        _count_groups(grouping, group_of, {"train": train_by_class, "val": val_by_class,
                                           "test": splits.get("test", {})})
    index = {name: i for i, name in enumerate(classes)}

    def items(by_class: dict[str, list[str]]) -> list[tuple[str, int]]:
        return [(f, index[name]) for name in classes for f in by_class.get(name, [])]

    return DatasetSpec(root, classes, items(train_by_class), items(val_by_class), modality, layout, val_name,
                       ignored, test=items(splits.get("test", {})), grouping=grouping,
                       val_fraction=val_fraction if val_name == "split" else 0.0)


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
        n_val = _val_count(len(files), val_fraction)
        ranked = sorted(files, key=lambda f: _rank(seed, os.path.relpath(f, rel_root)))
        chosen = set(ranked[:n_val])
        train[name] = [f for f in files if f not in chosen]
        val[name] = [f for f in files if f in chosen]
    return train, val


def _val_count(n: int, val_fraction: float) -> int:
    """Files of a class of ``n`` that validation should get: rounded, at least one of two or more, never all."""
    return 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, int(n * val_fraction + 0.5)))


def _rank(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"{seed}:{name}".encode()).digest()


# --- groups ----------------------------------------------------------------------------------------------------


def _group_pattern(group_by: str | None) -> re.Pattern | None:
    """The compiled ``group_by`` (``None`` for none or off); a ValueError for a bad expression."""
    if group_by is None or group_by.strip().lower() in GROUP_OFF:
        return None
    try:
        pattern = re.compile(group_by)
    except re.error as e:
        raise ValueError(f"--group-by {group_by!r} is not a regular expression: {e}") from None
    if pattern.groups < 1:
        raise ValueError(f"--group-by {group_by!r} has no capture group: its first group names a file's group, "
                         r"e.g. '^([^_]+)_' for the text before the first underscore")
    return pattern


def _regex_grouper(pattern: re.Pattern, rel_root: str) -> Callable[[str], str]:
    """A file's group: the pattern's first capture group in its name, else the file itself (a group of one,
    marked with a leading NUL so it cannot collide with a real group name)."""
    def group_of(f: str) -> str:
        m = pattern.search(os.path.basename(f))
        return m.group(1) if m and m.group(1) else "\0" + os.path.relpath(f, rel_root)
    return group_of


def _grouper(splits: dict[str, dict[str, list[str]]], modality: str, rel_root: str, group_by: str | None,
             pattern: re.Pattern | None, column: dict[str, str] | None,
             carving: bool) -> tuple[Callable[[str], str] | None, Grouping | None]:
    """How files group, and whether the carved validation split follows the groups (see ``scan_dataset``)."""
    train_files = [f for files in splits["train"].values() for f in files]
    off = group_by is not None and pattern is None
    kept = "the data's own validation split is kept as it is" if "val" in splits else \
        "no validation split is carved (--val-fraction 0)"
    if pattern is not None:
        group_of = _regex_grouper(pattern, rel_root)
        if train_files and all(group_of(f).startswith("\0") for f in train_files):
            example = os.path.basename(train_files[0])
            raise DataError(f"--group-by {group_by!r} matches none of the {len(train_files)} training file names "
                            f"(e.g. {example!r}): nothing to group by")
        return group_of, Grouping("--group-by", group_by, {}, applied=carving, note="" if carving else kept)
    if off:
        return None, None
    if column is not None:
        def group_of(f: str) -> str:
            return column.get(f) or "\0" + os.path.relpath(f, rel_root)
        return group_of, Grouping("CSV group column", None, {}, applied=carving, note="" if carving else kept)
    if modality != "audio" or not carving:
        return None, None
    for name, (regex, _, unit) in GROUP_CONVENTIONS.items():
        group_of = _regex_grouper(re.compile(regex), rel_root)
        named = [group_of(f) for f in train_files]
        found = {g for g in named if not g.startswith("\0")}
        matched = sum(not g.startswith("\0") for g in named)
        if len(found) < 2 or matched < _CONVENTION_SHARE * len(named):
            continue
        test_groups = {group_of(f) for files in splits.get("test", {}).values() for f in files}
        shared = found & test_groups
        if shared:  # the data's own test split holds the training speakers: validation should too
            note = (f"not used to carve the validation split: test shares {len(shared)} of its "
                    f"{len(test_groups)} {unit}s with train, so validation holds them too (--group-by REGEX to "
                    f"group anyway)")
            return group_of, Grouping(name, regex, {}, applied=False, note=note, unit=unit)
        return group_of, Grouping(name, regex, {}, applied=True, unit=unit)
    return None, None


def _count_groups(grouping: Grouping, group_of: Callable[[str], str],
                  splits: dict[str, dict[str, list[str]]]) -> None:
    """Fill ``grouping``'s groups per split, files without a group, and groups found in two splits."""
    found: dict[str, set[str]] = {}
    unmatched = 0
    for split, by_class in splits.items():
        names = {group_of(f) for files in by_class.values() for f in files}
        alone = {g for g in names if g.startswith("\0")}
        unmatched += len(alone)
        found[split] = names - alone
    grouping.groups = {split: len(names) for split, names in found.items() if names or split == "train"}
    grouping.unmatched = unmatched
    grouping.shared = {f"train/{split}": len(found["train"] & found[split]) for split in ("val", "test")
                       if found.get(split) and found["train"] & found[split]}


def _grouped_split(by_class: dict[str, list[str]], group_of: Callable[[str], str], val_fraction: float,
                   seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Validation made of whole groups, each class as close to ``val_fraction`` as the groups allow.

    Groups are visited in a seeded order (a hash of the seed and the group's name, so the split does not depend
    on where the data lives); a group joins validation when that brings the classes' counts closer to their
    targets (the sum of each class's distance, relative to its size) and leaves every class a training file.
    When no group helped (few large groups: five speakers and a tenth to hold out), the one that comes closest
    goes anyway, so validation is never empty while two groups exist.
    """
    classes = list(by_class)
    members: dict[str, list[tuple[int, str]]] = {}
    for c, name in enumerate(classes):
        for f in by_class[name]:
            members.setdefault(group_of(f), []).append((c, f))
    sizes = [len(by_class[name]) for name in classes]
    target = [_val_count(n, val_fraction) for n in sizes]
    counts = {g: [0] * len(classes) for g in members}
    for g, items in members.items():
        for c, _ in items:
            counts[g][c] += 1

    def cost(v: list[int]) -> float:
        return sum(abs(v[c] - target[c]) / sizes[c] for c in range(len(classes)) if sizes[c])

    def fits(v: list[int], g: str) -> bool:  # every class keeps a training file
        return all(v[c] + counts[g][c] < sizes[c] for c in range(len(classes)) if counts[g][c])

    val_count = [0] * len(classes)
    chosen: set[str] = set()
    if val_fraction > 0 and len(members) >= 2:
        for g in sorted(members, key=lambda g: _rank(seed, "group:" + g)):
            new = [a + b for a, b in zip(val_count, counts[g])]
            if fits(val_count, g) and cost(new) < cost(val_count):
                val_count, chosen = new, chosen | {g}
        if not chosen:
            options = [g for g in members if fits(val_count, g)]
            if options:
                chosen = {min(options, key=lambda g: (cost(counts[g]), _rank(seed, "group:" + g)))}
    train = {name: [f for f in by_class[name] if group_of(f) not in chosen] for name in classes}
    val = {name: [f for f in by_class[name] if group_of(f) in chosen] for name in classes}
    return train, val
