"""Dataset discovery: each layout, the stratified split, class handling, every error, and the built-in digits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnetlab.data.builtin import BUILTINS, resolve_builtin
from resnetlab.data.errors import DataError
from resnetlab.data.layout import DatasetSpec, list_input_files, natural_key, scan_dataset


def _image(path: Path, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), 128 if mode == "L" else (10, 20, 30)).save(path)
    return path


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _class_folders(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    for name, n in counts.items():
        for i in range(n):
            _image(root / name / f"img{i}{ext}")
    return root


def _names(items: list[tuple[str, int]], spec: DatasetSpec) -> set[tuple[str, str]]:
    return {(os.path.basename(p), spec.classes[y]) for p, y in items}


# --- class folders ---------------------------------------------------------------------------------------------


def test_class_folders_natural_order_and_stratified_split(tmp_path):
    root = _class_folders(tmp_path / "ds", {"10": 10, "2": 2, "cat": 1, "dog": 20})
    spec = scan_dataset(root, val_fraction=0.2, seed=0)
    assert spec.classes == ["2", "10", "cat", "dog"]
    assert (spec.layout, spec.val_name, spec.modality) == ("class-folders", "split", "image")
    val_per_class = np.bincount([y for _, y in spec.val], minlength=4).tolist()
    assert val_per_class == [1, 2, 0, 4]  # at least one when a class has >= 2 files; none from a single file
    assert len(spec.train) + len(spec.val) == 33
    assert not {p for p, _ in spec.train} & {p for p, _ in spec.val}
    assert all(os.path.isabs(p) for p, _ in spec.train + spec.val)


def test_split_is_deterministic_and_independent_of_other_classes(tmp_path):
    root = _class_folders(tmp_path / "ds", {"a": 20, "b": 20})
    first, again = scan_dataset(root, seed=3, val_fraction=0.2), scan_dataset(root, seed=3, val_fraction=0.2)
    assert first.val == again.val and first.train == again.train
    assert first.val != scan_dataset(root, seed=4, val_fraction=0.2).val

    _class_folders(root, {"c": 7})  # a new class must not move files of the existing ones
    grown = scan_dataset(root, seed=3, val_fraction=0.2)
    assert {p for p, y in grown.val if y < 2} == {p for p, _ in first.val}

    moved = tmp_path / "moved"
    os.rename(root, moved)  # nor may moving the dataset folder
    assert _names(scan_dataset(moved, seed=3, val_fraction=0.2).val, grown) == _names(grown.val, grown)


def test_val_fraction_zero_keeps_everything_for_training(tmp_path):
    spec = scan_dataset(_class_folders(tmp_path, {"a": 3, "b": 3}), val_fraction=0.0)
    assert len(spec.train) == 6 and spec.val == []
    with pytest.raises(ValueError, match="val_fraction"):
        scan_dataset(tmp_path, val_fraction=1.0)


def test_hidden_entries_skipped_and_unknown_extensions_reported(tmp_path):
    root = _class_folders(tmp_path / "ds", {"a": 2, "b": 2})
    _image(root / ".hidden_class" / "x.png")
    _image(root / "a" / ".hidden.png")
    _image(root / "a" / ".cache" / "y.png")
    _image(root / "b" / "nested" / "deep.jpg")  # files are found recursively inside a class folder
    (root / "a" / "notes.txt").write_text("not data")
    (root / "README.md").write_text("loose file")
    spec = scan_dataset(root, val_fraction=0.0)
    assert spec.classes == ["a", "b"]
    assert sorted(os.path.basename(p) for p, _ in spec.train) == ["deep.jpg", "img0.png", "img0.png", "img1.png",
                                                                  "img1.png"]
    assert sorted(os.path.basename(p) for p in spec.ignored) == ["README.md", "notes.txt"]
    assert "2 other files ignored" in spec.summary()


def test_mixed_image_formats_and_audio_modality(tmp_path):
    for i, ext in enumerate([".png", ".jpg", ".jpeg", ".bmp", ".webp"]):
        _image(tmp_path / "img" / ("a" if i % 2 else "b") / f"x{i}{ext}", mode="L" if i % 2 else "RGB")
    assert scan_dataset(tmp_path / "img").modality == "image"
    for cls in ("yes", "no"):
        for ext in (".wav", ".flac", ".ogg"):
            (tmp_path / "audio" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "audio" / cls / f"clip{ext}").write_bytes(b"")  # discovery reads names, not contents
    assert scan_dataset(tmp_path / "audio").modality == "audio"


# --- split folders ---------------------------------------------------------------------------------------------


def test_split_folders_with_val(tmp_path):
    _class_folders(tmp_path / "train", {"a": 3, "b": 2, "c": 1})
    _class_folders(tmp_path / "val", {"a": 1, "b": 1})  # "c" has no held-out files: allowed
    spec = scan_dataset(tmp_path)
    assert (spec.layout, spec.val_name, spec.classes) == ("split-folders", "val", ["a", "b", "c"])
    assert len(spec.train) == 6 and len(spec.val) == 2 and spec.test == []
    assert all(f"{os.sep}val{os.sep}" in p for p, _ in spec.val)


def test_split_folders_test_is_never_train_or_val(tmp_path):
    """train/ + test/ and no val/: validation is carved out of train (stratified), test is kept apart."""
    _class_folders(tmp_path / "train", {"a": 10, "b": 20, "c": 1})
    _class_folders(tmp_path / "test", {"a": 3, "b": 3})
    spec = scan_dataset(tmp_path, val_fraction=0.2, seed=1)
    assert (spec.layout, spec.val_name) == ("split-folders", "split")
    test_dir = str(tmp_path / "test") + os.sep
    assert len(spec.test) == 6 and all(p.startswith(test_dir) for p, _ in spec.test)
    assert not any(p.startswith(test_dir) for p, _ in spec.train + spec.val)
    assert np.bincount([y for _, y in spec.val], minlength=3).tolist() == [2, 4, 0]  # 20% of each class
    assert len(spec.train) + len(spec.val) == 31
    assert scan_dataset(tmp_path, val_fraction=0.2, seed=1).val == spec.val  # seeded: the same split again
    assert scan_dataset(tmp_path, val_fraction=0.2, seed=2).val != spec.val
    assert "test (kept for the end)" in spec.summary() and "carved out of train" in spec.summary()
    assert spec.held_out() == ("test", spec.test)


def test_split_folders_train_val_test_keeps_all_three(tmp_path):
    for split in ("train", "val", "test"):
        _class_folders(tmp_path / split, {"a": 2, "b": 2})
    spec = scan_dataset(tmp_path)
    assert spec.val_name == "val"
    assert {os.path.basename(os.path.dirname(os.path.dirname(p))) for p, _ in spec.val} == {"val"}
    assert {os.path.basename(os.path.dirname(os.path.dirname(p))) for p, _ in spec.test} == {"test"}


def test_split_folders_test_only_class_is_named(tmp_path):
    _class_folders(tmp_path / "train", {"a": 2, "b": 2})
    _class_folders(tmp_path / "test", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match="class 'zebra' has test files but no training files"):
        scan_dataset(tmp_path)


def test_split_folders_class_only_in_val_is_named(tmp_path):
    _class_folders(tmp_path / "train", {"a": 1, "b": 1})
    _class_folders(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match="class 'zebra'"):
        scan_dataset(tmp_path)


# --- CSV manifests ---------------------------------------------------------------------------------------------


def _csv_dataset(tmp_path: Path, text: str) -> Path:
    for name in ("a0", "a1", "a2", "b0", "b1", "b2"):
        _image(tmp_path / "img" / f"{name}.png")
    manifest = tmp_path / "labels.csv"
    manifest.write_text(text)
    return manifest


@pytest.mark.parametrize("header", ["path,label\n", ""])
def test_csv_with_and_without_header(tmp_path, header):
    rows = "".join(f"img/{n}.png,{n[0]}\n" for n in ("a0", "a1", "a2", "b0", "b1", "b2"))
    spec = scan_dataset(_csv_dataset(tmp_path, header + "\n" + rows), val_fraction=0.34)
    assert (spec.layout, spec.val_name, spec.classes) == ("csv", "split", ["a", "b"])
    assert len(spec.train) == 4 and len(spec.val) == 2  # stratified: one of each class
    assert sorted(y for _, y in spec.val) == [0, 1]
    assert all(p.startswith(str(tmp_path / "img")) for p, _ in spec.train)  # relative to the CSV's folder


def test_csv_split_column_and_named_columns_in_any_order(tmp_path):
    text = ("label,path,split\n"
            "a,img/a0.png,train\nb,img/b0.png,train\na,img/a1.png,train\n"
            f"b,{tmp_path / 'img' / 'b1.png'},validation\n"  # an absolute path is used as is
            "a,img/a2.png,test\n")
    spec = scan_dataset(_csv_dataset(tmp_path, text))
    assert spec.val_name == "val"
    assert [(os.path.basename(p), y) for p, y in spec.val] == [("b1.png", 1)]
    assert [(os.path.basename(p), y) for p, y in spec.test] == [("a2.png", 0)]
    assert len(spec.train) == 3


def test_csv_test_rows_are_never_train_or_val(tmp_path):
    """A manifest with train and test rows but no val rows: validation is carved out of the train rows."""
    rows = "".join(f"img/{n}.png,{n[0]},train\n" for n in ("a0", "a1", "b0", "b1"))
    rows += "img/a2.png,a,test\nimg/b2.png,b,test\n"
    spec = scan_dataset(_csv_dataset(tmp_path, "path,label,split\n" + rows), val_fraction=0.5)
    assert spec.val_name == "split" and sorted(y for _, y in spec.val) == [0, 1]
    assert sorted(os.path.basename(p) for p, _ in spec.test) == ["a2.png", "b2.png"]
    assert not {p for p, _ in spec.test} & {p for p, _ in spec.train + spec.val}


@pytest.mark.parametrize(("text", "message"), [
    ("path,label\nimg/a0.png,a\nimg/missing.png,b\n", "line 3: file not found: .*missing.png"),
    ("img/a0.png,a\nimg/b0.png\n", "line 2: expected 2 columns"),
    ("img/a0.png,a,train\nimg/b0.png,b,holdout\n", "line 2: split must be train, val or test, got 'holdout'"),
    ("path,label\nimg/a0.png,\n", "line 2: empty label"),
    ("path,label\n", "no rows"),
])
def test_csv_errors_name_the_line(tmp_path, text, message):
    with pytest.raises(DataError, match=message) as info:
        scan_dataset(_csv_dataset(tmp_path, text))
    assert "labels.csv" in str(info.value) and "\n" not in str(info.value)


def test_csv_class_only_in_validation_rows(tmp_path):
    text = "img/a0.png,a,train\nimg/b0.png,b,train\nimg/a1.png,c,val\n"
    with pytest.raises(DataError, match="class 'c'"):
        scan_dataset(_csv_dataset(tmp_path, text))


# --- grouped splits --------------------------------------------------------------------------------------------


def _groups(items, pattern: str) -> set[str]:
    import re

    return {re.search(pattern, os.path.basename(p)).group(1) for p, _ in items}


def _fsdd_names(root: Path, speakers, takes: range, digits: str = "0123") -> Path:
    for d in digits:
        for s in speakers:
            for t in takes:
                _touch(root / d / f"{d}_{s}_{t}.wav")  # discovery reads names, not contents
    return root


def test_group_by_keeps_each_group_inside_one_split(tmp_path):
    for cls in ("a", "b", "c"):
        for face in range(12):
            for i in range(3):
                _touch(tmp_path / cls / f"face{face}_{cls}{i}.png")
    spec = scan_dataset(tmp_path, val_fraction=0.25, seed=0, group_by=r"^(face\d+)_")
    assert spec.grouping.applied and spec.grouping.source == "--group-by"
    train, val = _groups(spec.train, r"^(face\d+)_"), _groups(spec.val, r"^(face\d+)_")
    assert not train & val and len(val) == 3  # a quarter of the 12 typefaces, whole
    assert np.bincount([y for _, y in spec.val], minlength=3).tolist() == [9, 9, 9]
    assert spec.grouping.groups == {"train": 9, "val": 3}
    again = scan_dataset(tmp_path, val_fraction=0.25, seed=0, group_by=r"^(face\d+)_")
    assert again.val == spec.val  # seeded: the same seed, the same split
    others = [_groups(scan_dataset(tmp_path, val_fraction=0.25, seed=s, group_by=r"^(face\d+)_").val,
                      r"^(face\d+)_") for s in (1, 2, 3)]
    assert any(o != val for o in others)
    assert "validation split by whole groups (--group-by '^(face\\d+)_')" in spec.grouping.describe()


def test_fsdd_naming_groups_validation_by_speaker_without_the_option(tmp_path):
    speakers = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
    spec = scan_dataset(_fsdd_names(tmp_path / "ds", speakers, range(5)), val_fraction=0.2, seed=0)
    g = spec.grouping
    assert g is not None and g.applied and g.source == "FSDD" and g.unit == "speaker"
    pattern = r"^\d+_([a-z]+)_"
    assert not _groups(spec.train, pattern) & _groups(spec.val, pattern)
    assert len(_groups(spec.val, pattern)) == 1  # a sixth is the closest whole-speaker share to 20%
    assert "FSDD file naming DIGIT_SPEAKER_TAKE, recognised without --group-by" in g.describe()
    assert scan_dataset(tmp_path / "ds", group_by="none").grouping is None  # turned off


def test_fsdd_naming_with_a_test_split_of_the_same_speakers_is_not_grouped(tmp_path):
    """FSDD's official split tests the training speakers (takes 0-4): validation then holds them too."""
    speakers = ("jackson", "theo", "lucas")
    _fsdd_names(tmp_path / "train", speakers, range(5, 15))
    _fsdd_names(tmp_path / "test", speakers, range(5))
    spec = scan_dataset(tmp_path, val_fraction=0.2)
    assert spec.grouping.source == "FSDD" and not spec.grouping.applied
    assert "test shares 3 of its 3 speakers with train" in spec.grouping.describe()
    assert _groups(spec.val, r"^\d+_([a-z]+)_") == set(speakers)  # stratified by file, every speaker in val
    # test speakers never heard in training: validation takes whole speakers too
    _fsdd_names(tmp_path / "test2", ("unseen",), range(5))
    os.rename(tmp_path / "test", tmp_path / "old")
    os.rename(tmp_path / "test2", tmp_path / "test")
    assert scan_dataset(tmp_path, val_fraction=0.2).grouping.applied


def test_speech_commands_naming_groups_validation_by_speaker(tmp_path):
    for word in ("yes", "no", "up"):
        for k in range(10):
            for n in range(2):
                _touch(tmp_path / word / f"{k:04x}beef_nohash_{n}.wav")
    _touch(tmp_path / "yes" / "odd_name.wav")  # one file off the convention: each such file is its own group
    spec = scan_dataset(tmp_path, val_fraction=0.2, seed=5)
    assert spec.grouping.source == "Speech Commands" and spec.grouping.applied
    pattern = r"^([0-9a-f]{8})_nohash_"
    items = [(p, y) for p, y in spec.train + spec.val if "odd_name" not in p]
    assert len(items) == 60
    assert not _groups([i for i in items if i in spec.train], pattern) & _groups([i for i in items if i in spec.val],
                                                                                 pattern)
    assert 2 <= len(_groups([i for i in items if i in spec.val], pattern)) <= 3
    assert spec.grouping.unmatched == 1


def test_csv_group_column(tmp_path):
    rows = ["path,label,group"]
    for cls in ("a", "b"):
        for patient in range(8):
            for i in range(2):
                _touch(tmp_path / "img" / f"{cls}{patient}_{i}.png")
                rows.append(f"img/{cls}{patient}_{i}.png,{cls},patient{patient}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    spec = scan_dataset(tmp_path / "m.csv", val_fraction=0.25, seed=0)
    assert spec.grouping.source == "CSV group column" and spec.grouping.applied
    pattern = r"^[ab](\d+)_"
    assert not _groups(spec.train, pattern) & _groups(spec.val, pattern)
    assert len(spec.val) == 8 and len(_groups(spec.val, pattern)) == 2


def test_group_by_errors(tmp_path):
    root = _class_folders(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(ValueError, match="not a regular expression"):
        scan_dataset(root, group_by="(")
    with pytest.raises(ValueError, match="has no capture group"):
        scan_dataset(root, group_by="img")
    with pytest.raises(DataError, match="matches none of the 4 training file names"):
        scan_dataset(root, group_by=r"^speaker(\d+)")


# --- imposed classes -------------------------------------------------------------------------------------------


def test_forced_classes_set_order_and_allow_absent_classes(tmp_path):
    root = _class_folders(tmp_path, {"cat": 2, "dog": 2})
    spec = scan_dataset(root, classes=["dog", "bird", "cat"], val_fraction=0.0)
    assert spec.classes == ["dog", "bird", "cat"]
    assert {spec.classes[y] for _, y in spec.train} == {"cat", "dog"}
    assert all(spec.classes[y] == Path(p).parent.name for p, y in spec.train)


def test_forced_classes_reject_an_unseen_label(tmp_path):
    root = _class_folders(tmp_path, {"cat": 1, "dog": 1, "emu": 1})
    with pytest.raises(DataError, match="label 'emu' is not one of the 2 known classes"):
        scan_dataset(root, classes=["cat", "dog"])


def test_forced_classes_accept_an_evaluation_manifest_without_train_rows(tmp_path):
    spec = scan_dataset(_csv_dataset(tmp_path, "img/a0.png,a,test\nimg/b0.png,b,test\n"), classes=["a", "b"])
    assert spec.train == [] and spec.val == [] and len(spec.test) == 2


# --- errors ----------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="not found: .*nowhere"):
        scan_dataset(tmp_path / "nowhere")


def test_no_class_folders(tmp_path):
    _image(tmp_path / "loose.png")
    with pytest.raises(DataError, match=f"{tmp_path}: no class folders"):
        scan_dataset(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    _class_folders(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "ghost").mkdir()
    (tmp_path / "ghost" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty class folder 'ghost'"):
        scan_dataset(tmp_path)


def test_only_one_class(tmp_path):
    with pytest.raises(DataError, match="only one class"):
        scan_dataset(_class_folders(tmp_path, {"solo": 3}))


def test_mixed_image_and_audio(tmp_path):
    _class_folders(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "b" / "clip.wav").write_bytes(b"")
    with pytest.raises(DataError, match="mixes image and audio files .*clip.wav"):
        scan_dataset(tmp_path)


def test_a_file_that_is_not_a_csv(tmp_path):
    with pytest.raises(DataError, match="expected a dataset folder or a .csv manifest"):
        scan_dataset(_image(tmp_path / "one.png"))


# --- prediction inputs -----------------------------------------------------------------------------------------


def test_list_input_files(tmp_path):
    for name in ("b/img10.png", "b/img2.jpg", ".hidden/h.png", "b/.h.png"):
        _image(tmp_path / "in" / name)
    for name in ("a/x.wav", "b/notes.txt"):
        _touch(tmp_path / "in" / name)
    single = _image(tmp_path / "single.bmp")
    found = list_input_files([tmp_path / "in", single, tmp_path / "in" / "b" / "img2.jpg"])
    rel = [os.path.relpath(p, tmp_path) for p in found]
    assert rel == ["in/a/x.wav", "in/b/img2.jpg", "in/b/img10.png", "single.bmp"]  # natural order, no duplicates


def test_list_input_files_errors(tmp_path):
    with pytest.raises(DataError, match="input not found: .*gone.png"):
        list_input_files([tmp_path / "gone.png"])
    with pytest.raises(DataError, match="notes.txt: not an image or audio file"):
        list_input_files([_touch(tmp_path / "notes.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image or audio files"):
        list_input_files([tmp_path / "empty"])


def test_natural_key():
    assert sorted(["10", "2", "b", "A", "img10.png", "img9.png"], key=natural_key) == \
        ["2", "10", "A", "b", "img9.png", "img10.png"]


# --- built-in datasets -----------------------------------------------------------------------------------------


def test_builtin_digits():
    folder = resolve_builtin("builtin:digits")
    spec = scan_dataset(folder)
    assert spec.classes == [str(d) for d in range(10)]
    assert (len(spec.train), len(spec.val), len(spec.test), spec.val_name) == (4500, 500, 1000, "split")
    assert np.bincount([y for _, y in spec.train]).tolist() == [450] * 10
    assert np.bincount([y for _, y in spec.val]).tolist() == [50] * 10
    assert np.bincount([y for _, y in spec.test]).tolist() == [100] * 10
    assert "CC BY-SA 3.0" in (Path(folder) / "LICENSE.txt").read_text()


def test_builtin_names():
    assert set(BUILTINS) >= {"digits", "spoken-digits"}
    assert resolve_builtin("some/folder") == "some/folder"
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:cifar'; known: builtin:digits"):
        resolve_builtin("builtin:cifar")
