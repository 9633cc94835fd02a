"""Garbage in, through the command line (``resnetlab.cli.main``, in-process): every case ends in one line on stderr
that names the cause, a non-zero exit, no traceback, and an intact run directory.

Covered: truncated / corrupt / empty / fake / decompression-bomb images and audio (skipped and listed, or refused
with ``--strict-data``), broken CSV manifests, classes a model never saw, a checkpoint whose head does not fit,
damaged checkpoints on ``--resume``, malicious pickles, a diverging loss, a full disk while saving, bad YAML and
bad option values.
"""

from __future__ import annotations

import errno
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from PIL import Image

from conftest import assert_one_line_error, run_cli, train_argv, write_class_folders
from resnetlab import fileio
from resnetlab.api import load_model
from resnetlab.training.checkpoint import read_checkpoint, save_checkpoint

# --- bad files ------------------------------------------------------------------------------------------------


def _png_bytes(size: int = 16) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid 100-byte PNG whose header declares 10 billion pixels (it would decode to 10 GB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


BAD_IMAGES = {
    "truncated.png": lambda: _png_bytes()[:60],
    "garbage.jpg": lambda: b"\xff\xd8\xff\xe0" + os.urandom(300),  # a JPEG signature, then noise
    "empty.png": lambda: b"",
    "text.png": lambda: b"this is not an image\n" * 5,
    "bomb.png": _bomb_png,
}
IMAGE_REASONS = {"truncated.png": "", "garbage.jpg": "", "empty.png": "empty file", "text.png": "not a recognised",
                 "bomb.png": "too large"}


def _wav_bytes(tmp: Path, seconds: float = 0.25, sr: int = 8000, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(tmp, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
    return tmp.read_bytes()


def _audio_dataset(root: Path) -> Path:
    for c, freq in (("low", 300.0), ("high", 2000.0)):
        (root / c).mkdir(parents=True)
        for i in range(4):
            _wav_bytes(root / c / f"{i}.wav", freq=freq * (1 + 0.05 * i))
    return root


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_strict_data_refuses_a_bad_image_naming_it(capsys, tmp_path, name):
    data = write_class_folders(tmp_path / "data")
    bad = data / "c0" / name
    bad.write_bytes(BAD_IMAGES[name]())
    code, _, err = run_cli(capsys, *train_argv(tmp_path, data, epochs=1), "--strict-data")
    assert code == 2
    assert_one_line_error(err, str(bad), IMAGE_REASONS[name])
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_bad_images_are_skipped_and_listed_and_training_goes_on(capsys, tmp_path):
    data = write_class_folders(tmp_path / "data")
    for name, make in BAD_IMAGES.items():
        (data / "c1" / name).write_bytes(make())
    code, out, err = run_cli(capsys, *train_argv(tmp_path, data, epochs=1))
    assert code == 0, err
    assert "Traceback" not in err
    skipped = [ln for ln in out.splitlines() if ln.startswith("skipped")]
    assert skipped and sum(int(ln.split()[1]) for ln in skipped) == len(BAD_IMAGES)
    read_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")


BAD_AUDIO = {
    "empty.wav": lambda tmp: b"",
    "noise.wav": lambda tmp: os.urandom(500),
    "truncated.wav": lambda tmp: _wav_bytes(tmp)[:1000],  # the header declares 4,000 bytes of samples
    "noise.flac": lambda tmp: b"fLaC" + os.urandom(200),
    "text.ogg": lambda tmp: b"OggS not really\n",
}


@pytest.mark.parametrize("name", sorted(BAD_AUDIO))
def test_strict_data_refuses_bad_audio_naming_it(capsys, tmp_path, name):
    data = _audio_dataset(tmp_path / "audio")
    bad = data / "low" / name
    bad.write_bytes(BAD_AUDIO[name](tmp_path / "scratch.wav"))
    argv = ["train", "--data", data, "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache", "--epochs", "1",
            "--device", "cpu", "--quiet", "--strict-data", "--sample-rate", "8000", "--duration", "0.25"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, str(bad))


def test_predict_on_garbage_files_reports_each_and_exits_1(capsys, tmp_path, trained_run):
    result, _ = trained_run
    files = []
    for name, make in BAD_IMAGES.items():
        files.append(tmp_path / name)
        files[-1].write_bytes(make())
    code, out, err = run_cli(capsys, "predict", result.run_dir, *files, "--device", "cpu")
    assert code == 1
    assert_one_line_error(err, f"{len(files)} of {len(files)} files could not be read")
    for f in files:
        assert f"{f}: error: " in out


# --- manifests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, fragments", [
    (["path,label", "images/c0/0.png,c0", "images/missing.png,c1"], ("line 3: file not found:", "missing.png")),
    (["path,label", "images/c0/0.png,c0", "images/c1/0.png,"], ("line 3: empty label",)),
    (["path,label", "images/c0/0.png,c0", "images/c1/0.png"], ("line 3: expected",)),
    (["path,label,split", "images/c0/0.png,c0,holdout"], ("split must be train, val or test",)),
    (["file;class", "images/c0/0.png;c0"], ("line 1",)),
    ([], ("no rows",)),
])
def test_broken_manifest_is_one_line_naming_the_line(capsys, tmp_path, make_dataset, rows, fragments):
    manifest = make_dataset("csv")
    manifest.write_text("\n".join(rows) + "\n")
    code, _, err = run_cli(capsys, *train_argv(tmp_path, manifest, epochs=1))
    assert code == 2
    assert_one_line_error(err, str(manifest), *fragments)


# --- models and checkpoints that do not fit ----------------------------------------------------------------------


def test_evaluate_on_classes_the_model_never_saw(capsys, tmp_path, trained_run):
    result, _ = trained_run
    data = write_class_folders(tmp_path / "data", classes=4)  # c0..c2 are known, c3 is not
    code, _, err = run_cli(capsys, "evaluate", result.run_dir, "--data", data, "--out", tmp_path / "eval",
                           "--device", "cpu")
    assert code == 2
    assert_one_line_error(err, "'c3'")


def test_checkpoint_whose_head_does_not_match_its_classes(capsys, tmp_path, trained_run):
    result, data = trained_run
    tensors, meta = read_checkpoint(Path(result.run_dir) / "checkpoints" / "best.safetensors")
    meta.update(num_classes=5, classes=["c0", "c1", "c2", "c3", "c4"])  # the fc layer still has 3 outputs
    bad = save_checkpoint(tmp_path / "tampered.safetensors", tensors, meta, keep_previous=False)
    code, _, err = run_cli(capsys, "evaluate", bad, "--data", data, "--out", tmp_path / "eval", "--device", "cpu")
    assert code == 2
    assert_one_line_error(err, str(bad), "does not fit the model", "fc.weight",
                          "[3, 64] in the file, [5, 64] in the model")


def test_resume_with_every_checkpoint_damaged_is_one_line(capsys, tmp_path, tiny_data):
    argv = train_argv(tmp_path, tiny_data, epochs=2)
    assert run_cli(capsys, *argv)[0] == 0
    for name in ("last.safetensors", "last.prev.safetensors"):
        path = tmp_path / "run" / "checkpoints" / name
        path.write_bytes(path.read_bytes()[:100])
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "run", "--resume", "--quiet")
    assert code == 2
    assert_one_line_error(err, "last.prev.safetensors", "truncated")


# --- malicious pickles ------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _malicious(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / ("evil.pth" if fmt == "torch" else "evil.pkl")
    if fmt == "torch":
        torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "hook": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    return path, marker


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the raw pickle's protocol
@pytest.mark.parametrize("fmt", ["torch", "pickle"])
@pytest.mark.parametrize("command", ["evaluate", "predict", "finetune"])
def test_a_malicious_pickle_is_refused_and_never_run(capsys, tmp_path, trained_run, command, fmt):
    _, data = trained_run
    evil, marker = _malicious(tmp_path, fmt)
    image = next(data.rglob("*.png"))
    argv = {"evaluate": ["evaluate", evil, "--data", data, "--out", tmp_path / "eval", "--device", "cpu"],
            "predict": ["predict", evil, image, "--device", "cpu"],
            "finetune": ["finetune", "--pretrained", evil, "--data", data, "--out", tmp_path / "ft", "--epochs", "1",
                         "--device", "cpu", "--quiet", "--cache-dir", tmp_path / "cache"]}[command]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    line = assert_one_line_error(err, str(evil))
    assert "pickle" in line or "unpickle" in line
    assert not marker.exists()  # test_the_payload_is_real shows that unpickling would create it


def test_the_payload_is_real(tmp_path):
    """The sanity check for the test above: unpickling the file does create the marker."""
    evil, marker = _malicious(tmp_path, "pickle")
    pickle.loads(evil.read_bytes())
    assert marker.exists()


# --- divergence -------------------------------------------------------------------------------------------------


def test_lr_1e30_stops_with_one_line_and_exit_1(capsys, tmp_path, tiny_data):
    code, _, err = run_cli(capsys, *train_argv(tmp_path, tiny_data, lr=1e30, epochs=2))
    assert code == 1
    line = assert_one_line_error(err, "--lr", "no checkpoint was written before it")
    assert "nan" in line.lower() or "inf" in line.lower()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 1e30
    assert not list((tmp_path / "run" / "checkpoints").glob("*.safetensors"))


def test_divergence_after_good_epochs_keeps_last_and_best(capsys, tmp_path, tiny_data):
    run = tmp_path / "run"
    assert run_cli(capsys, *train_argv(tmp_path, tiny_data, epochs=2))[0] == 0
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.safetensors")}
    config = yaml.safe_load((run / "config.yaml").read_text())
    config.update(epochs=4, lr=1e30)  # an edited config: two more epochs at an absurd rate
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, _, err = run_cli(capsys, "train", "--out", run, "--resume", "--quiet")
    assert code == 1
    assert_one_line_error(err, "at epoch 3", "checkpoints/last (end of epoch 2) is kept")
    after = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.safetensors")}
    assert after == before  # nothing written after the divergence
    model, _, meta = load_model(run, which="best")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


# --- a full disk --------------------------------------------------------------------------------------------------


class _FullDisk:
    """A file that takes half of what is written, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()


def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(capsys, tmp_path, tiny_data, monkeypatch):
    writes = {"n": 0}

    def open_filling_up(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        if "w" in mode and ".safetensors" in str(file):  # checkpoints (other files are written the same way)
            writes["n"] += 1
            if writes["n"] > 2:  # epoch 1's best and last are written; the disk is full from epoch 2 on
                return _FullDisk(f)
        return f

    monkeypatch.setattr(fileio, "open", open_filling_up, raising=False)  # the one atomic writer's open
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_argv(tmp_path, tiny_data, epochs=3))
    assert code == 1
    line = assert_one_line_error(err, "No space left on device", str(run / "checkpoints"))
    failed = Path(line.rsplit(": ", 1)[1])
    assert failed.name in ("best.safetensors", "last.safetensors")
    assert read_checkpoint(failed)[1]["epoch"] == 1  # the file being replaced is intact
    assert read_checkpoint(run / "checkpoints" / "last.safetensors")[1]["epoch"] == 1
    assert not [p.name for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.undo()
    code, _, _ = run_cli(capsys, "train", "--out", run, "--resume", "--quiet")  # space freed: the run goes on
    assert code == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


# --- bad YAML and bad option values -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, fragments", [
    ("epochs: [1,\n", ["bad YAML", "line"]),
    ("lr: fast\n", ["'lr'", "'fast'"]),
    ("lr_rate: 0.1\n", ["unknown config key 'lr_rate'"]),
    ("- epochs\n- 3\n", ["must be a mapping"]),
    ("epochs: 0\n", ["'epochs'", ">= 1"]),
    ("seed: !!python/object/apply:os.system ['true']\n", ["bad YAML"]),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", ["not a UTF-8 text"]),
])
def test_bad_yaml_is_one_line_naming_the_problem(capsys, tmp_path, tiny_data, text, fragments):
    config = tmp_path / "run.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, err = run_cli(capsys, "train", "--config", config, "--data", tiny_data, "--out", tmp_path / "run")
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, fragment", [
    ("--epochs", "0", ">= 1"),
    ("--lr", "-1", "> 0"),
    ("--lr", "nan", "expected float"),
    ("--lr", "inf", "expected float"),
    ("--batch-size", "many", "expected int"),
    ("--accum-steps", "0", ">= 1"),
    ("--checkpoint-every", "-5", ">= 0"),
    ("--val-fraction", "1.5", "[0, 1)"),
    ("--seed", "1.5", "expected int"),
    ("--mean", "0.5,nan,0.5", "expected list"),
])
def test_bad_option_values_are_one_line(capsys, tmp_path, tiny_data, option, value, fragment):
    code, _, err = run_cli(capsys, "train", "--data", tiny_data, "--out", tmp_path / "run", option, value)
    assert code == 2
    assert_one_line_error(err, fragment)
    assert not (tmp_path / "run").exists()
