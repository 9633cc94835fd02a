"""Splits through the API and the CLI: test kept apart for one evaluation at the end (eval.json), splits.json,
evaluate's overlap warning, grouped splits saved with the run, the no-validation label, and the audio
normalisation statistics drawn from the whole training set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import resnetlab
from conftest import run_cli, tiny_options, train_argv, write_class_folders


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def test_split_run(tmp_path_factory):
    """A one-epoch run on ``train/`` (3 classes x 8) + ``test/`` (3 x 2) and no ``val/``, with its log lines."""
    tmp = tmp_path_factory.mktemp("split_run")
    data = tmp / "data"
    write_class_folders(data / "train", classes=3, per_class=8, seed=0)
    write_class_folders(data / "test", classes=3, per_class=2, seed=1)
    lines: list[str] = []
    result = resnetlab.train(data=str(data), log=lines.append, **tiny_options(tmp, epochs=1, val_fraction=0.25))
    return result, data, lines


def test_test_split_is_evaluated_once_at_the_end_never_validated_on(test_split_run):
    result, data, lines = test_split_run
    run = Path(result.run_dir)
    splits = json.loads((run / "splits.json").read_text())
    assert splits["counts"] == {"train": 18, "val": 6, "test": 6}  # a quarter of each class carved out of train
    assert splits["validation"] == "carved out of train" and splits["root"] == str(data)
    assert all(f.startswith("train/") for f in splits["files"]["train"] + splits["files"]["val"])
    assert all(f.startswith("test/") for f in splits["files"]["test"])
    assert not set(splits["files"]["val"]) & set(splits["files"]["train"])

    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["split"] == "test" and evaluation["n"] == 6
    assert 0.0 <= evaluation["accuracy"] <= 1.0 and np.isfinite(evaluation["loss"])
    assert [r["class"] for r in evaluation["per_class"]] == ["c0", "c1", "c2"]
    assert result.test["accuracy"] == evaluation["accuracy"]
    val_summary = json.loads((run / "report" / "val_summary.json").read_text())
    assert val_summary["n"] == 6  # the validation figures are the carved split's, not test's

    assert lines[-2].startswith("best val accuracy") and lines[-1].startswith("test accuracy")
    assert "6 test samples" in lines[-1]
    assert any("6 test (kept for the end)" in ln for ln in lines)  # the header says where each split comes from
    html = (run / "report" / "index.html").read_text()
    assert "<h2>Test set</h2>" in html and (run / "report" / "test_confusion.png").is_file()
    assert "[validation] Confusion matrix" in html and "[test] Confusion matrix" in html


def test_evaluate_warns_when_its_data_was_trained_on(test_split_run, tmp_path, capsys):
    result, data, _ = test_split_run
    code, out, err = run_cli(capsys, "evaluate", result.run_dir, "--data", data, "--out", tmp_path / "a")
    assert code == 0 and "warning" not in err  # the data's test split: unseen
    shared = json.loads((tmp_path / "a" / "eval.json").read_text())["overlap"]
    assert (shared["train"], shared["val"]) == (0, 0)

    code, out, err = run_cli(capsys, "evaluate", result.run_dir, "--data", data / "train", "--out", tmp_path / "b")
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert code == 0 and len(warnings) == 1
    assert "24 of the 24 evaluated files were seen by this run (18 in its training split and 6 in its " \
           "validation split" in warnings[0]

    copy = tmp_path / "copy"  # the same images under another path: found by their content
    shutil.copytree(data / "train" / "c1", copy / "c1")
    shutil.copytree(data / "test" / "c2", copy / "c2")
    summary = resnetlab.evaluate(result.run_dir, str(copy), out=tmp_path / "c", log=_quiet)
    assert summary["overlap"]["train"] + summary["overlap"]["val"] == 8 and summary["overlap"]["by"] == "path+content"
    assert "matched by path or content" in capsys.readouterr().err


def test_overlap_by_resolved_path_content_and_relative_path(tmp_path):
    from resnetlab.data.splits import overlap

    data = tmp_path / "data"
    for name, body in (("a/1.png", b"one"), ("a/2.png", b"two"), ("b/3.png", b"three")):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(body)
    record = {"root": str(data), "files": {"train": ["a/1.png", "b/3.png"], "val": ["a/2.png"]}}
    link = tmp_path / "link.png"
    link.symlink_to(data / "a" / "2.png")  # the same file through a symbolic link: its resolved path
    copy = shutil.copytree(data, tmp_path / "copy")  # the same bytes elsewhere: content, else relative path
    (copy / "b" / "3.png").write_bytes(b"THREE")  # same size, other content
    files = [str(link), str(copy / "a" / "1.png"), str(copy / "b" / "3.png")]
    assert overlap(files, record, data_root=str(copy)) == {"train": 1, "val": 1, "by": "path+content"}
    # content too costly to read: relative path and size (3.png's edit keeps its size, so it counts)
    assert overlap(files, record, max_bytes=0, data_root=str(copy)) == {"train": 2, "val": 1,
                                                                        "by": "path+relative path"}


def test_no_validation_split_never_labels_train_accuracy_val(tmp_path):
    data = tmp_path / "data"
    write_class_folders(data / "train", classes=2, per_class=4, seed=0)  # train/ alone, and --val-fraction 0
    stale = tmp_path / "run" / "report" / "test_confusion.png"  # an earlier run's, in the same folder
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    (tmp_path / "run" / "eval.json").write_text(json.dumps({"split": "test", "accuracy": 0.5}))
    lines: list[str] = []
    result = resnetlab.train(data=str(data), log=lines.append, **tiny_options(tmp_path, epochs=1, val_fraction=0.0))
    assert result.best_on == "train" and not any("val accuracy" in ln for ln in lines)
    assert lines[-1].startswith("best train (no validation split) accuracy") and result.test is None
    assert any("8 train / no validation split images" in ln for ln in lines)
    assert not (tmp_path / "run" / "eval.json").exists() and not stale.exists()  # not this run's test figures
    assert "Test set" not in (tmp_path / "run" / "report" / "index.html").read_text()


def test_group_by_from_the_cli_is_saved_with_the_run(tmp_path, capsys):
    data = tmp_path / "data"
    for k in range(3):  # 3 classes x 6 "typefaces" (the file names face<N>_<i>.png)
        write_class_folders(tmp_path / f"tmp{k}", classes=3, per_class=2, seed=k)
        for png in (tmp_path / f"tmp{k}").rglob("*.png"):
            dest = data / png.parent.name / f"face{k * 2 + int(png.stem)}_{k}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            png.rename(dest)
    code, out, err = run_cli(capsys, *train_argv(tmp_path, data, epochs=1, val_fraction=0.34, quiet=True),
                             "--group-by", r"^(face\d+)_")
    assert code == 0, err
    assert r"validation split by whole groups (--group-by '^(face\d+)_'): groups 4 in train, 2 in val" in out
    run = tmp_path / "run"
    grouping = yaml.safe_load((run / "config.yaml").read_text())["grouping"]
    assert grouping["regex"] == r"^(face\d+)_" and grouping["groups"] == {"train": 4, "val": 2}
    splits = json.loads((run / "splits.json").read_text())
    assert splits["grouping"]["groups"] == {"train": 4, "val": 2}
    faces = {name: {Path(f).name.split("_")[0] for f in splits["files"][name]} for name in ("train", "val")}
    assert not faces["train"] & faces["val"] and len(faces["val"]) == 2


def test_audio_normalisation_statistics_come_from_every_class():
    """The cache is in class order: 2,000 quiet clips of class 0, then 1,000 loud ones of class 1. Statistics
    from the first 2,000 clips see only the quiet class."""
    from resnetlab.api import make_pipeline
    from resnetlab.training.config import TrainConfig

    n_samples = 400
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 30, (2000, n_samples)), rng.normal(0, 8000, (1000, n_samples))])
    x = x.astype(np.int16)
    prepared = SimpleNamespace(spec=SimpleNamespace(num_classes=2, modality="audio"), train=_Arrays(x),
                               sample_shape=(n_samples,), facts={"sample_rate": 8000, "num_samples": n_samples})
    cfg = TrainConfig(features="logmel", n_mels=16, spec_augment=False, noise_prob=0.0)
    pipe = make_pipeline(cfg, prepared, model_ndim=1, device=torch.device("cpu"))
    reference = make_pipeline(cfg, prepared, model_ndim=1, device=torch.device("cpu"))
    whole = reference.fit_normalization(torch.from_numpy(x))  # every clip
    quiet_only = reference.fit_normalization(torch.from_numpy(x[:2000]))
    assert abs(pipe.mean - whole[0]) < 0.05 * abs(whole[0] - quiet_only[0])


class _Arrays:
    def __init__(self, x: np.ndarray):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)
