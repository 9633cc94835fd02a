"""The file formats the decoders read are the ones datasets, predict and the server take: MP3 (and whatever else
the installed libsndfile lists), TIFF (first page) and GIF (first frame), under the same header limits as the
others; and predict over many files reports each unreadable one and predicts the rest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import resnetlab
from conftest import run_cli, synthetic_image, tiny_options, train_argv
from resnetlab.data import audio, images
from resnetlab.data.errors import DataError
from resnetlab.data.layout import AUDIO_EXTS, IMAGE_EXTS, scan_dataset
from resnetlab.deploy.predictor import UPLOAD_FORMATS, sniff

HAS_MP3 = "MP3" in sf.available_formats()
needs_mp3 = pytest.mark.skipif(not HAS_MP3, reason="this libsndfile reads no MP3 (it does from 1.1.0)")


def _tone(hz: float, n: int = 4000, rate: int = 8000) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(n) / rate)).astype(np.float32)


def test_the_suffixes_are_the_decoders():
    assert {".gif", ".tif", ".tiff"} <= IMAGE_EXTS and IMAGE_EXTS == set(images.IMAGE_EXTENSIONS)
    assert AUDIO_EXTS == set(audio.AUDIO_EXTENSIONS) and {".wav", ".flac", ".ogg"} <= AUDIO_EXTS
    for fmt, ext in (("AIFF", ".aiff"), ("AU", ".au"), ("CAF", ".caf"), ("MP3", ".mp3")):
        assert (ext in AUDIO_EXTS) == (fmt in sf.available_formats())
    assert ".raw" not in AUDIO_EXTS and ".mat" not in AUDIO_EXTS


@needs_mp3
def test_mp3_decodes_under_the_same_header_limits(tmp_path, monkeypatch):
    path = tmp_path / "a.mp3"
    sf.write(path, _tone(440), 8000, format="MP3")
    wave, rate = audio.read_audio(path)
    assert rate == 8000 and abs(len(wave) - 4000) < 1200
    assert abs(np.fft.rfft(wave).__abs__().argmax() * rate / len(wave) - 440) < 10
    assert audio.decode_audio(path, 16000, 8000).shape == (8000,)
    monkeypatch.setattr(audio, "MAX_AUDIO_VALUES", 1000)  # the length limit, from the header
    with pytest.raises(DataError, match="header declares"):
        audio.read_audio(path)
    monkeypatch.undo()
    monkeypatch.setattr(audio, "MIN_SAMPLE_RATE", 10_000)  # the sample-rate limit, from the header
    with pytest.raises(DataError, match="sample rate of 8,000 Hz"):
        audio.read_audio(path)
    assert sniff(path.read_bytes())[:2] == ("audio", ".mp3") and "MP3" in UPLOAD_FORMATS["audio"]


def test_tiff_first_page_and_gif_first_frame_under_the_pixel_limit(tmp_path, monkeypatch):
    red, blue = np.zeros((12, 10, 3), np.uint8), np.zeros((12, 10, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    for name in ("a.tif", "a.gif"):
        Image.fromarray(red).save(tmp_path / name, save_all=True, append_images=[Image.fromarray(blue)])
        with Image.open(tmp_path / name) as im:
            assert im.n_frames == 2
        x = images.decode_image(tmp_path / name)
        assert x.shape == (3, 12, 10) and x[0].min() > 200 and x[2].max() < 50, name  # the red page / frame
        assert sniff((tmp_path / name).read_bytes())[0] == "image"
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    for name in ("a.tif", "a.gif"):
        with pytest.raises(DataError, match="image too large"):
            images.decode_image(tmp_path / name)


def test_train_on_tiff_and_gif_and_predict_reports_each_unreadable_file(capsys, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for label in range(2):
        (data / f"c{label}").mkdir(parents=True)
        for i in range(4):
            suffix = (".tif", ".gif", ".png", ".tiff")[i]
            Image.fromarray(synthetic_image(label, 8, rng)).save(data / f"c{label}" / f"{i}{suffix}")
    spec = scan_dataset(data, val_fraction=0.25)
    assert len(spec.train) + len(spec.val) == 8
    code, out, err = run_cli(capsys, *train_argv(tmp_path, data, img_size=8, epochs=1, val_fraction=0.25))
    assert code == 0, err
    broken, other = tmp_path / "broken.gif", tmp_path / "notes.txt"
    broken.write_bytes(b"GIF89a" + b"\x00" * 20)
    other.write_text("not an image")
    run = tiny_options(tmp_path)["out"]
    code, out, err = run_cli(capsys, "predict", run, data / "c0" / "0.tif", broken, data / "c1" / "1.gif", other,
                             "--format", "json", "--device", "cpu", "--top-k", "1")
    results = json.loads(out)
    assert code == 1 and "2 of 4 files could not be read" in err
    assert [("error" in r) for r in results] == [False, True, False, True]
    assert str(broken) in results[1]["error"] and "not an image or audio file" in results[3]["error"]


@needs_mp3
def test_train_and_predict_on_mp3(tmp_path):
    data = tmp_path / "tones"
    for label, hz in (("high", 3000.0), ("low", 300.0)):
        (data / label).mkdir(parents=True)
        for i in range(3):
            sf.write(data / label / f"{i}.mp3", _tone(hz * (1 + 0.05 * i)), 8000, format="MP3")
    opts = tiny_options(tmp_path, arch=None, sample_rate=8000, duration=0.5, epochs=1)
    del opts["img_size"]
    result = resnetlab.train(str(data), **opts)
    out = resnetlab.predict(result.run_dir, [data / "low" / "0.mp3", data / "high"], top_k=1, device="cpu")
    assert len(out) == 4 and all("top_k" in r for r in out)
